"""`python -m bench sample`: sampling one token per row from hidden states.

Providers: `matmul` (the bare logits GEMM: the floor), `ours` (`linear_sample`, no
[B, V] logits) and `ours-top_p`, `torch` (matmul, softmax, multinomial) and
`torch-compile` (the same under `torch.compile`), and `torch-top_p` /
`torch-compile-top_p` (sort, cumsum, mask, as transformers' top-p warper does). All at
temperature 0.8; `ours-top_p` compares with the `torch-top_p` rows, and both again on
hidden states scaled by 2 (`-peaked`: small nuclei, settled by the candidates alone).
`logits-top_p` (`sample_from_logits`) and `torch-logits-top_p` sample from fp32 logits
formed before the timed call: the top-p sampling alone.
CPU default shapes: B in (64, 256), d=896, V=151936.

On CUDA (B in (64, 256), d=3584, V=152064: Qwen2.5-7B's head) also `triton` and
`chunked` (`linear_sample` with that backend by name), and FlashInfer when installed:
`flashinfer` (`flashinfer.sampling.sampling_from_logits` on the fp32 logits / 0.8) and
`flashinfer-top_p` (`top_p_sampling_from_probs` on their softmax; FlashInfer >= 0.2.3,
whose samplers draw their own uniforms). The CUDA run ends with a PASS/FAIL line per
target of the issue. `--quick` on CUDA: B=64 only, bf16, ~25 ms of timed calls per
provider, no `torch.compile` providers.
"""

from __future__ import annotations

import argparse
import inspect

import torch

from distil_kernels import linear_sample, sample_from_logits
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

CUDA_SHAPES = [(64, 3584, 152064), (256, 3584, 152064)]


def _torch_sample(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax((x @ weight.T).float() / 0.8, dim=-1)
    return torch.multinomial(probs, 1)


def _torch_sample_top_p(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return _torch_top_p_from_logits((x @ weight.T).float())


def _torch_top_p_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Nucleus sampling as transformers' TopPLogitsWarper writes it: sort, cumsum, mask."""
    logits = logits / 0.8
    sorted_logits, order = torch.sort(logits, dim=-1)
    dropped = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - 0.95
    dropped[:, -1] = False
    logits = logits.masked_fill(dropped.scatter(1, order, dropped), -float("inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1)


def _ours(**backend) -> Provider:
    name = backend.get("backend", "ours")
    return Provider(name, lambda x, w: (lambda: linear_sample(x, w, temperature=0.8, seed=1, **backend)))


def flashinfer_providers() -> list[Provider]:
    """FlashInfer's fused samplers after the same logits GEMM (probabilities or logits in fp32)."""
    flashinfer = flashinfer_module("sample")
    if flashinfer is None:
        return []
    sampling = flashinfer.sampling
    if "uniform_samples" in inspect.signature(sampling.top_p_sampling_from_probs).parameters \
            or not hasattr(sampling, "sampling_from_logits"):
        print(f"sample: FlashInfer providers skipped (flashinfer {getattr(flashinfer, '__version__', '?')} "
              f"predates 0.2.3's samplers, which draw their own uniforms)")
        return []

    def plain(x, w):
        return lambda: sampling.sampling_from_logits((x @ w.T).float() / 0.8)

    def top_p(x, w):
        return lambda: sampling.top_p_sampling_from_probs(torch.softmax((x @ w.T).float() / 0.8, dim=-1), 0.95)

    return [Provider("flashinfer", plain, optional=True), Provider("flashinfer-top_p", top_p, optional=True)]


def _ours_top_p(x: torch.Tensor, weight: torch.Tensor):
    return lambda: linear_sample(x, weight, temperature=0.8, top_p=0.95, seed=1)


def _from_logits(sample):
    """`sample(logits)` on the fp32 logits, formed once outside the timed call: the
    sampling alone (for ours, the truncation and draw kernels of `sample_from_logits`)."""
    def build(x, w):
        logits = (x @ w.T).float()
        return lambda: sample(logits)
    return build


def _peaked(make):
    """`make` on hidden states scaled by 2: logits about N(0, 64), whose nuclei at top_p=0.95
    hold a few dozen ids at most (at N(0, 16) they hold ~150-550 of 152k, so about half the
    rows outgrow the 256 candidates and take the dense fallback)."""
    return lambda x, w: make(x * 2.0, w)


def providers(device: str = "cpu", quick: bool = False) -> list[Provider]:
    cuda = device == "cuda"
    out = [
        Provider("matmul", lambda x, w: (lambda: x @ w.T)),
        _ours(),
        Provider("ours-top_p", _ours_top_p),
        Provider("ours-top_p-peaked", _peaked(_ours_top_p)),
    ]
    if cuda:
        out += [_ours(backend="triton"), _ours(backend="chunked")]
    out += torch_providers("torch", "torch-compile", _torch_sample, not (cuda and quick))
    out += torch_providers("torch-top_p", "torch-compile-top_p", _torch_sample_top_p, not (cuda and quick))
    out.append(Provider("torch-top_p-peaked", _peaked(lambda x, w: (lambda: _torch_sample_top_p(x, w)))))
    out += [Provider("logits-top_p", _from_logits(lambda z: sample_from_logits(z, temperature=0.8, top_p=0.95,
                                                                                seed=1))),
            Provider("torch-logits-top_p", _from_logits(_torch_top_p_from_logits))]
    if cuda:
        out += flashinfer_providers()
        # Last: a fault in a kernel is sticky for the process, and the csrc/ kernels have had
        # the least time on a GPU.
        if extension_available():
            out.append(_ours(backend="cuda"))
    return out


def report_targets(rows: list[dict]) -> None:
    """The issue's targets on an H100, bf16, d=3584, V=152064: one line each."""
    print("\ntargets (bf16, d=3584, V=152064; set for an H100):")
    for shape in CUDA_SHAPES:
        ours, matmul, naive = (find_row(rows, p, "bf16", shape) for p in ("ours", "matmul", "torch"))
        batch = shape[0]
        print_target(f"linear_sample B={batch} time vs bare matmul",
                     ours["time_ms"] / matmul["time_ms"] if ours and matmul else None, "<=", 1.1)
        print_target(f"linear_sample B={batch} speed-up over matmul+softmax+multinomial",
                     naive["time_ms"] / ours["time_ms"] if ours and naive else None, ">=", 1.5)
    ours = find_row(rows, "ours", "bf16", CUDA_SHAPES[0])
    print_target("linear_sample B=64 temporary memory", ours["temp_mib"] if ours else None, "<=", 1.0, " MiB")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="one shape, 3 repeats (CUDA: B=64, bf16, short timings, no torch.compile)")
    parser.add_argument("--dtypes", default=None, help="comma-separated: fp32,bf16 (default both; bf16 with "
                                                       "--quick on CUDA)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--profile", action="store_true",
                        help="cuda only: print where each call's time goes (bench/gpu_profile.py)")


def main(args: argparse.Namespace) -> int:
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        print("bench sample --device cuda: no CUDA device here")
        return 2
    if cuda:
        shapes = CUDA_SHAPES[:1] if args.quick else CUDA_SHAPES
    else:
        shapes = [(64, 896, 32000)] if args.quick else [(64, 896, 151936), (256, 896, 151936)]
    names = args.dtypes or ("bf16" if cuda and args.quick else "fp32,bf16")
    dtypes = [d for d in names.split(",") if d in DTYPES]
    rows, failures = run_suite("sample", providers(args.device, args.quick), shapes, dtypes, args.device,
                     3 if args.quick else args.repeats, args.csv, rep_ms=25 if args.quick else 100,
                                     profile=args.profile)
    if cuda:
        report_targets(rows)
    return 1 if failures else 0
