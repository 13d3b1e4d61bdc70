"""`python -m bench topk`: an expert's top-k (k=64) with exact log-probs from hidden states.

Providers: `matmul` (the bare logits GEMM), `ours` (`linear_topk`, no [N, V] logits),
`torch` (matmul, log_softmax, topk) and `torch-compile`. CPU default shape: N=1024,
d=896, V=151936; CUDA: N=8192, d=3584, V=152064.
"""

from __future__ import annotations

import argparse

import torch

from distil_kernels import linear_topk

from .sampling_suite import DTYPES, Provider, compiled, run_suite

K = 64


def _torch_topk(x: torch.Tensor, weight: torch.Tensor):
    return torch.log_softmax((x @ weight.T).float(), dim=-1).topk(K, dim=-1)


def providers() -> list[Provider]:
    torch_compiled = compiled(_torch_topk)
    return [
        Provider("matmul", lambda x, w: (lambda: x @ w.T)),
        Provider("ours", lambda x, w: (lambda: linear_topk(x, w, K))),
        Provider("torch", lambda x, w: (lambda: _torch_topk(x, w))),
        Provider("torch-compile", lambda x, w: (lambda: torch_compiled(x, w))),
    ]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true", help="one small shape, 3 repeats")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32,bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=None)


def main(args: argparse.Namespace) -> int:
    if args.device == "cuda":
        shapes = [(8192, 3584, 152064)]
    else:
        shapes = [(256, 896, 32000)] if args.quick else [(1024, 896, 151936)]
    dtypes = [d for d in args.dtypes.split(",") if d in DTYPES]
    return run_suite("topk", providers(), shapes, dtypes, args.device, 3 if args.quick else args.repeats, args.csv)
