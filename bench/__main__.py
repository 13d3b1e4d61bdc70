"""`python -m bench SUITE [options]`: run one benchmark suite.

A suite is a module of this package with `add_arguments(parser)` and
`main(args) -> int` (the exit status). Adding one is a line in `SUITES`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# suite name -> one-line description; the module is bench.<name>
SUITES: dict[str, str] = {
    "loss": "linear cross-entropy, forward + backward: time and memory overhead per provider",
    "sample": "sampling a token per row from hidden states: ours vs matmul + softmax + multinomial",
    "topk": "an expert's top-k with exact log-probs from hidden states: ours vs matmul + log_softmax + topk",
    "trainer": "distil vs grpo, ce, sdpo, opsd at equal rollout budgets; step time split; the bandit counterexample",
    "tune": "each main Triton kernel's launch-config candidates timed at the issues' shapes (GPU)",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="suite", required=True, metavar="SUITE")
    for name, summary in SUITES.items():
        module = importlib.import_module(f"bench.{name}")
        sub = subparsers.add_parser(name, help=summary, description=module.__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
