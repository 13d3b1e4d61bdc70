"""`python -m bench topk`: an expert's top-k (k=64) with exact log-probs from hidden states.

Providers: `matmul` (the bare logits GEMM), `ours` (`linear_topk`, no [N, V] logits),
`torch` (matmul, log_softmax, topk) and `torch-compile`. CPU default shape: N=1024,
d=896, V=151936; CUDA: N=8192, d=3584, V=152064.

On CUDA also `triton` and `chunked` (`linear_topk` with that backend by name) and, when
installed, `flashinfer`: `flashinfer.top_k` (radix top-k returning values and ids, in
recent FlashInfer) on the fp32 logits, minus their log-sum-exp. FlashInfer's older
top-k functions (`top_k_renorm_probs`, `top_k_mask_logits`) return dense [N, V] tensors,
not ids, so without `flashinfer.top_k` the provider is skipped. The CUDA run ends with a
PASS/FAIL line for the issue's target. `--quick` on CUDA: bf16 only, ~25 ms of timed
calls per provider, no `torch.compile`.
"""

from __future__ import annotations

import argparse
import os

import torch

from distil_kernels import linear_topk
from distil_kernels.cuda_ext import extension_available

from .sampling_suite import (
    DTYPES,
    Provider,
    find_row,
    flashinfer_module,
    print_target,
    run_suite,
    torch_providers,
)

K = 64
CUDA_SHAPES = [(8192, 3584, 152064)]


def _torch_topk(x: torch.Tensor, weight: torch.Tensor):
    return torch.log_softmax((x @ weight.T).float(), dim=-1).topk(K, dim=-1)


def _merge_kernel_topk(x: torch.Tensor, weight: torch.Tensor):
    """The triton backend's exact fallback on every row: what the threshold pass saves."""
    from distil_kernels.loss.options import LossOptions
    from distil_kernels.sampling.triton.topk import merged_topk

    return merged_topk(x, weight, None, K, LossOptions())


def flashinfer_providers() -> list[Provider]:
    flashinfer = flashinfer_module("topk")
    if flashinfer is None:
        return []
    if not hasattr(flashinfer, "top_k"):
        print(f"topk: FlashInfer provider skipped (flashinfer {getattr(flashinfer, '__version__', '?')} has no "
              f"flashinfer.top_k; its top_k_renorm_probs / top_k_mask_logits give dense tensors, not ids)")
        return []

    def top_k(x, w):
        def call():
            logits = (x @ w.T).float()
            values, ids = flashinfer.top_k(logits, K, sorted=True)
            return values - torch.logsumexp(logits, dim=-1, keepdim=True), ids
        return call

    return [Provider("flashinfer", top_k, optional=True)]


def providers(device: str = "cpu", quick: bool = False) -> list[Provider]:
    cuda = device == "cuda"
    out = [
        Provider("matmul", lambda x, w: (lambda: x @ w.T)),
        Provider("ours", lambda x, w: (lambda: linear_topk(x, w, K))),
    ]
    if cuda:
        out += [Provider(backend, lambda x, w, backend=backend: (lambda: linear_topk(x, w, K, backend=backend)))
                for backend in ("triton", "chunked")]
        out.append(Provider("triton-merge", lambda x, w: (lambda: _merge_kernel_topk(x, w))))
    out += torch_providers("torch", "torch-compile", _torch_topk, not (cuda and quick))
    if cuda:
        out += flashinfer_providers()
        # Last: a fault in a kernel is sticky for the process, and the csrc/ kernels have had
        # the least time on a GPU.
        if extension_available():
            out.append(Provider("cuda", lambda x, w: (lambda: linear_topk(x, w, K, backend="cuda"))))
            if torch.cuda.get_device_capability()[0] >= 9:
                out.append(Provider("cuda-one-pass", lambda x, w: (lambda: _one_pass_topk(x, w))))
    return out


def _one_pass_topk(x, w):
    """The cuda backend with its sm_90 one-pass top-k kernel (DISTIL_KERNELS_CUDA_TOPK=one-pass)."""
    from distil_kernels.sampling.cuda import TOPK_ENV

    previous = os.environ.get(TOPK_ENV)
    os.environ[TOPK_ENV] = "one-pass"
    try:
        return linear_topk(x, w, K, backend="cuda")
    finally:
        if previous is None:
            del os.environ[TOPK_ENV]
        else:
            os.environ[TOPK_ENV] = previous


def report_targets(rows: list[dict]) -> None:
    print("\ntargets (bf16, d=3584, V=152064; set for an H100):")
    ours, matmul = (find_row(rows, p, "bf16", CUDA_SHAPES[0]) for p in ("ours", "matmul"))
    print_target(f"linear_topk k={K} N=8192 time vs bare matmul",
                 ours["time_ms"] / matmul["time_ms"] if ours and matmul else None, "<=", 1.2)
    for name in ("cuda", "cuda-one-pass"):
        row = find_row(rows, name, "bf16", CUDA_SHAPES[0])
        if row is not None and matmul:
            print_target(f"linear_topk k={K} N=8192 time vs bare matmul, backend {name}",
                         row["time_ms"] / matmul["time_ms"], "<=", 1.2)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="one small shape, 3 repeats (CUDA: bf16, short timings, no torch.compile)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16 (default both; bf16 with "
                                                       "--quick on CUDA)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="cuda only: print where each call's time goes (bench/gpu_profile.py)")


def main(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench topk --device cuda: no CUDA device here")
        return 2
    if cuda:
        shapes = CUDA_SHAPES
    else:
        shapes = [(256, 896, 32000)] if args.quick else [(1024, 896, 151936)]
    names = args.dtypes or ("bf16" if cuda and args.quick else "fp32,bf16")
    dtypes = [d for d in names.split(",") if d in DTYPES]
    rows, failures = run_suite("topk", providers(args.device, args.quick), shapes, dtypes, args.device,
                     3 if args.quick else args.repeats, args.csv, rep_ms=25 if args.quick else 100,
                                     profile=args.profile)
    if cuda:
        report_targets(rows)
    return 1 if failures else 0
