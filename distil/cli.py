"""`distil train` and `distil eval` (also `python -m distil`).

    distil train [--task T] [--objective distil|ce|grpo|sdpo|opsd] [--steps N] [--seed S]
                 [--out DIR] [--model PATH] [--device cpu|cuda] [--config FILE] [...]
    distil eval --checkpoint DIR [--task T] [--samples n]
    torchrun --nproc-per-node N -m distil train ...    (data parallel: distil/distributed.py)

With no arguments, `distil train` runs the embedded default (the addition task, the
task's oracle as expert, the built-in tiny student) on the CPU in a few minutes. A TOML
config file may set any training option (the names of `TrainConfig`); flags given on the
command line win over the file. `--resume` continues the run in OUT with the options its
checkpoint was written with: flags and file may change only `train.RESUME_MAY_CHANGE`.
Bad options are refused before anything runs, in one line naming the option.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

from .train import TrainConfig, Trainer, saved_config

_FLAG_TYPES = {"int": int, "float": float, "str": str}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(TrainConfig):
        if f.name == "task_options":
            continue
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        base = kind.split("|")[0].strip()
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            type=_FLAG_TYPES.get(base, str), help=f"default: {f.default!r}")
    parser.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the task (repeatable), e.g. --task-option digits=3")
    parser.add_argument("--config", type=Path, help="a TOML file of training options")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parse_value(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def _read_config_file(path: Path) -> dict:
    """The options of a TOML config file; a ValueError naming --config and the file."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ValueError(f"--config {path}: {reason} (a TOML file of training options)") from None
    unknown = set(values) - set(TrainConfig.field_names())
    if unknown:
        raise ValueError(f"--config {path}: unknown option(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(TrainConfig.field_names())}")
    return values


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's options: the config file's, then the flags' (which win). With --resume,
    the checkpoint's options come first, so `distil train --out DIR --resume` continues
    the run in DIR as it was started (Trainer.check_resume refuses other changes)."""
    values: dict = {}
    if args.config is not None:
        values.update(_read_config_file(args.config))
    for name in TrainConfig.field_names():
        value = getattr(args, name, None)
        if value is not None:
            values[name] = value
    if "out" not in values:
        values["out"] = f"runs/{values.get('task', 'addition')}-{values.get('objective', 'distil')}-" \
                        f"{values.get('seed', 0)}"
    if getattr(args, "resume", False):
        values = {**saved_config(values["out"]), **values}
    options = values.get("task_options", {})
    if not isinstance(options, dict):
        raise TypeError(f"task_options must be a table, got {options!r}")
    options = dict(options)
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--task-option takes KEY=VALUE, got {item!r}")
        options[key] = _parse_value(value)
    values["task_options"] = options
    return TrainConfig(**values)


def train_main(args: argparse.Namespace) -> int:
    try:
        config = config_from_args(args)
        trainer = Trainer(config, progress=not args.no_progress)
        if args.resume:
            trainer.check_resume()
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        Path(config.out).mkdir(parents=True, exist_ok=True)
    except OSError as err:  # an --out where no directory can be made
        print(f"error: out {config.out!r}: cannot create it: {err.strerror or err}", file=sys.stderr)
        return 2
    if not trainer.dist.main:  # under torchrun, rank 0 reports
        trainer.run(resume=args.resume)
        trainer.close()
        return 0
    ranks = f" ranks={trainer.dist.world}" if trainer.dist.enabled else ""
    print(f"distil train: task={config.task} objective={config.objective} expert={config.expert} "
          f"steps={config.steps} seed={config.seed} device={config.device}{ranks} out={config.out}")
    summary = trainer.run(resume=args.resume)
    trainer.close()
    final = summary["final_eval"]
    extra = ", ".join(f"{k[5:]} {v:.3f}" for k, v in final.items() if k != "eval_pass@1")
    print(f"held-out after training: {extra}")
    print(f"wrote {config.out}/metrics.jsonl, summary.json, curves.png")
    print(f"result: {config.task} {config.objective} pass@1 {summary['pass@1_before']:.3f} -> "
          f"{summary['pass@1_after']:.3f} ({summary['rollouts']} rollouts, {summary['seconds']:.0f} s)")
    return 0


def eval_main(args: argparse.Namespace) -> int:
    directory = Path(args.checkpoint)
    state_path = directory / "state.json"
    if not state_path.exists() and (directory / "checkpoint" / "state.json").exists():
        directory = directory / "checkpoint"
        state_path = directory / "state.json"
    if not state_path.exists():
        print(f"error: --checkpoint {args.checkpoint}: no state.json there (give a run's out directory or its "
              f"checkpoint/)", file=sys.stderr)
        return 2
    if args.samples is not None and args.samples < 1:
        print(f"error: --samples must be an int >= 1, got {args.samples}", file=sys.stderr)
        return 2
    try:
        saved = json.loads(state_path.read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: --checkpoint {args.checkpoint}: cannot read {state_path}: {err}", file=sys.stderr)
        return 2
    if args.task is not None and args.task != saved["task"]:
        saved["task"], saved["task_options"] = args.task, {}
    if args.samples is not None:
        saved["eval_samples"] = args.samples
    saved["out"] = str(directory.parent)
    try:
        trainer = Trainer(TrainConfig(**saved), progress=False)
    except (ValueError, TypeError, FileNotFoundError) as err:  # an unknown --task, a cuda run on a CPU machine
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        trainer.load_checkpoint(directory)
    except (OSError, ValueError, KeyError, RuntimeError) as err:  # a damaged or foreign checkpoint
        reason = " ".join(str(err).split())
        print(f"error: --checkpoint {args.checkpoint}: cannot load it: {reason[:300]}", file=sys.stderr)
        return 2
    metrics = trainer.evaluate()
    print(json.dumps({"checkpoint": str(directory), "task": saved["task"], "step": trainer.step,
                      **{k[5:]: round(v, 4) for k, v in metrics.items()}}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distil", description="DistIL: RL from rich feedback")
    sub = parser.add_subparsers(dest="command")
    train = sub.add_parser("train", help="train a student (no arguments: the embedded default)")
    _add_train_flags(train)
    ev = sub.add_parser("eval", help="evaluate a checkpoint on held-out prompts")
    ev.add_argument("--checkpoint", required=True, help="a run's out directory or its checkpoint/")
    ev.add_argument("--task", default=None)
    ev.add_argument("--samples", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "train":
        return train_main(args)
    if args.command == "eval":
        return eval_main(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
