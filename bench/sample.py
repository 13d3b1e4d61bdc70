"""`python -m bench sample`: sampling one token per row from hidden states.

Providers: `matmul` (the bare logits GEMM: the floor), `ours` (`linear_sample`, no
[B, V] logits) and `ours-top_p`, `torch` (matmul, softmax, multinomial) and
`torch-compile` (the same under `torch.compile`), and `torch-top_p` /
`torch-compile-top_p` (sort, cumsum, mask, as transformers' top-p warper does). All at
temperature 0.8; `ours-top_p` compares with the `torch-top_p` rows. CPU default shapes: B in (64, 256), d=896, V=151936.
"""

from __future__ import annotations

import argparse

import torch

from distil_kernels import linear_sample

from .sampling_suite import DTYPES, Provider, compiled, run_suite


def _torch_sample(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax((x @ weight.T).float() / 0.8, dim=-1)
    return torch.multinomial(probs, 1)


def _torch_sample_top_p(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling as transformers' TopPLogitsWarper writes it: sort, cumsum, mask."""
    logits = (x @ weight.T).float() / 0.8
    sorted_logits, order = torch.sort(logits, dim=-1)
    dropped = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - 0.95
    dropped[:, -1] = False
    logits = logits.masked_fill(dropped.scatter(1, order, dropped), -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)


def providers() -> list[Provider]:
    torch_compiled = compiled(_torch_sample)
    torch_top_p_compiled = compiled(_torch_sample_top_p)
    return [
        Provider("matmul", lambda x, w: (lambda: x @ w.T)),
        Provider("ours", lambda x, w: (lambda: linear_sample(x, w, temperature=0.8, seed=1))),
        Provider("ours-top_p", lambda x, w: (lambda: linear_sample(x, w, temperature=0.8, top_p=0.95, seed=1))),
        Provider("torch", lambda x, w: (lambda: _torch_sample(x, w))),
        Provider("torch-compile", lambda x, w: (lambda: torch_compiled(x, w))),
        Provider("torch-top_p", lambda x, w: (lambda: _torch_sample_top_p(x, w))),
        Provider("torch-compile-top_p", lambda x, w: (lambda: torch_top_p_compiled(x, w))),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--csv", default=None)


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        shapes = [(64, 3584, 152064), (256, 3584, 152064)]
    else:
        shapes = [(64, 896, 32000)] if args.quick else [(64, 896, 151936), (256, 896, 151936)]
    dtypes = [d for d in args.dtypes.split(",") if d in DTYPES]
    return run_suite("sample", providers(), shapes, dtypes, args.device, 3 if args.quick else args.repeats, args.csv)
