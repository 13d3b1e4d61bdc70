"""The `cuda` backend's orchestration on the CPU, with the epilogue's reference ops.

`distil_kernels.loss.cuda` drives four device operations (an fp32-output GEMM, an fp32
addmm, the `chunk_stats` and `logits_grad` kernels of csrc/), and on sm_90 optionally a
fifth (`row_epilogue`, both passes in one). `REFERENCE_OPS` and `REFERENCE_ONE_PASS_OPS`
are their contract in PyTorch; with them the chunking, the fused forward gradients, the
recompute path and distil_loss's two passes run here against the float64 reference. The kernels
themselves are checked against `REFERENCE_OPS` on a GPU (tests/loss/test_gpu.py) and
compiled by nvcc in tests/csrc.
"""

from __future__ import annotations

import dataclasses
import importlib
import math

import pytest
import torch

from distil_kernels import linear_cross_entropy
from distil_kernels.backends import resolve_backend
from distil_kernels.cuda_ext import extension_available
from distil_kernels.loss import cuda as cuda_backend
from distil_kernels.loss.cuda import (
    REFERENCE_ONE_PASS_OPS,
    REFERENCE_OPS,
    EpilogueOps,
    chunk_rows,
    cuda_linear_cross_entropy,
    in_place_gradient,
)
from distil_kernels.loss.gemm import gradient_scale
from distil_kernels.loss.options import LossOptions
from distil_kernels.loss.reference import compute_dtype
from distil_kernels.loss.targets import make_slots
from loss_problems import (
    assert_fp16_gradient_keeps_its_small_values,
    assert_masked_problem_matches,
    assert_within_dtype_error,
    fp16_small_gradient_problem,
    make_distil_problem,
    make_problem,
    max_error,
    run,
    run_distil,
    same_dtype_pytorch,
)


class CountingOps:
    """`ops` with each call of the one-pass epilogue and of chunk_stats counted."""

    def __init__(self, ops: EpilogueOps):
        self.calls = {"row_epilogue": 0, "chunk_stats": 0}

        def counted(name):
            def call(*args):
                self.calls[name] += 1
                return getattr(ops, name)(*args)
            return call

        self.ops = dataclasses.replace(ops, chunk_stats=counted("chunk_stats"),
                                       row_epilogue=None if ops.row_epilogue is None else counted("row_epilogue"))


def run_cuda_orchestration(x, w, b, target, ops=REFERENCE_OPS, **options):
    """`run` (loss, stats, grads) through cuda_linear_cross_entropy with reference ops."""
    opts = LossOptions(**options)
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    slots = make_slots(target, w.shape[0], opts.ignore_index, compute_dtype(x.dtype))
    bias = None if leaves[2] is None else leaves[2].to(compute_dtype(x.dtype))
    loss, stats = cuda_linear_cross_entropy(leaves[0], leaves[1], bias, slots, opts, ops=ops)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * grad_out).sum().backward()
    return loss.detach(), stats, [t.grad if t is not None else None for t in leaves]


OPTIONS = [
    dict(),
    dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-3, temperature=0.8),
    dict(tail="renormalize", reduction="sum"),
    dict(tail="ignore", reduction="none"),  # no gradients in the forward: the recompute path
]


@pytest.mark.parametrize("epilogue", ["two-pass", "one-pass"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "all-options", "renormalize-sum", "ignore-none"])
@pytest.mark.parametrize("kind", ["hard", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_reference(dtype, kind, options, epilogue):
    """N=61, V=203 in chunks of 21 rows: a workspace of 17 KiB, the gradient written over
    the fp32 logits it comes from. One pass: the forward's chunks take `row_epilogue`, the
    recompute path (reduction "none") the two kernels."""
    k = None if kind == "hard" else 5
    x64, w64, b64, target = make_problem(61, 24, 203, k=k, seed=31, ignore_rows=(4,), scale=3.0)
    options = dict(options, workspace_bytes=17 * 1024)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    assert chunk_rows(61, 203, options["workspace_bytes"]) < 61
    counting = CountingOps(REFERENCE_ONE_PASS_OPS if epilogue == "one-pass" else REFERENCE_OPS)
    got = run_cuda_orchestration(x, w, b, target, ops=counting.ops, **options)
    one_pass = epilogue == "one-pass" and options.get("reduction") != "none"
    assert counting.calls == ({"row_epilogue": 3, "chunk_stats": 0} if one_pass else
                              {"row_epilogue": 0, "chunk_stats": 3})
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)
    # Stats: within 4x the chunked backend's own error in the same dtype.
    chunked = run(x, w, b, target, "chunked", **options)
    for name in ("lse", "token_loss", "target_logprobs"):
        ref = getattr(want[1], name).double()
        tol = 4 * max_error(getattr(chunked[1], name), ref) + 1e-6 * (ref.abs().max().item() + 1)
        assert max_error(getattr(got[1], name), ref) <= tol, name


@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_ids_masked_by_the_bias(monkeypatch, kind):
    """-inf logits add nothing to the chunk statistics (the kernels' reference ops say so)."""
    monkeypatch.setattr(cuda_backend, "extension_ops", lambda: REFERENCE_OPS)
    # The named backend on the CPU tensors, the float64 reference's "torch" included.
    monkeypatch.setattr(importlib.import_module("distil_kernels.loss.linear_cross_entropy"), "resolve_backend",
                        lambda backend, device, dtype=None: backend)
    assert_masked_problem_matches("cuda", kind, torch.float32, workspace_bytes=17 * 1024)


def test_chunk_rows_fit_the_workspace():
    # fp32 logits, their gradient written over them: 4 bytes a logit.
    assert chunk_rows(10_000, 152_064, 2 << 30) == (2 << 30) // (4 * 152_064) == 3530
    assert chunk_rows(10_000, 152_064, None) == 3530
    assert chunk_rows(5, 1000, None) == 5
    assert chunk_rows(5, 1000, 4096) == 1  # at least one row, whatever the budget


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_in_place_gradient_starts_each_row_at_its_logits_row(dtype):
    logits = torch.arange(3 * 5, dtype=torch.float32).view(3, 5)
    grad = in_place_gradient(logits, dtype)
    assert grad.shape == (3, 5) and grad.dtype == dtype
    assert grad.stride(0) * grad.element_size() == logits.stride(0) * 4 and grad.data_ptr() == logits.data_ptr()


def test_distil_loss_through_the_cuda_passes(monkeypatch):
    """distil_loss's statistics and gradient passes on the cuda orchestration."""
    problem = make_distil_problem(3, 6, 11, 41, 4, seed=32)
    kwargs = dict(group=torch.tensor([0, 0, 1]), discount=0.9, future_credit=0.5, softcap=5.0, temperature=0.8,
                  workspace_bytes=4096)
    reference = run_distil(problem, "torch", torch.float64, **kwargs)
    # The module, not the function the package exports under the same name.
    monkeypatch.setattr(importlib.import_module("distil_kernels.loss.distil_loss"), "resolve_backend",
                        lambda *a, **kw: "cuda")
    monkeypatch.setattr(cuda_backend, "extension_ops", lambda: REFERENCE_OPS)
    for got, want in zip(run_distil(problem, "cuda", torch.float32, **kwargs), reference):
        torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-6)


def test_fp16_gradient_keeps_its_small_values():
    """See `assert_fp16_gradient_keeps_its_small_values`; the unscaled fp16 gradient misses
    its bounds by orders of magnitude."""
    x, w, b, y = fp16_small_gradient_problem()
    assert gradient_scale(torch.float16, torch.full((x.shape[0],), 1 / x.shape[0]), torch.zeros(x.shape[0], 1),
                          None) > 1
    got = run_cuda_orchestration(x, w, b, y, workspace_bytes=64 * 1024)
    assert_fp16_gradient_keeps_its_small_values(got[2], x, w, b, y, upstream=0.5)


def test_weight_accumulator_is_never_read_before_its_first_write(monkeypatch):
    """d_weight's fp32 accumulator comes unfilled: the cuda sweep's first GEMM overwrites it
    (beta = 0), the chunked sweep zeroes it. Poisoned with NaN, both still match the float64
    reference; a chunk order that read it first would spread the NaN."""
    from distil_kernels.loss import chunked

    allocate = chunked.Grads.allocate

    def poisoned(*args):
        grads = allocate(*args)
        if grads.weight is not None:
            grads.weight.fill_(math.nan)
        return grads

    monkeypatch.setattr(chunked.Grads, "allocate", staticmethod(poisoned))
    x64, w64, b64, target = make_problem(61, 24, 203, k=None, seed=35, ignore_rows=(4,), scale=3.0)
    options = dict(label_smoothing=0.1, workspace_bytes=17 * 1024)
    want = run(x64, w64, b64, target, "torch", **options)
    for got in (run_cuda_orchestration(x64.float(), w64.float(), b64.float(), target, **options),
                run(x64.float(), w64.float(), b64.float(), target, "chunked", **options)):
        # fp32 against float64, |d_weight| < 0.04: a few ulps (3.7e-9 there) of 61-row sums.
        torch.testing.assert_close(got[2][1].double(), want[2][1], rtol=1e-5, atol=1e-7)


def test_gradient_scale_is_a_power_of_two_within_fp16():
    """1 but for fp16; there the power of two that keeps the largest possible |dL/du| at or
    below 2**14, never below 1 (a bound already near fp16's top is left alone) and 1 when the
    bound is 0 or not finite (nothing to lift, or a NaN that must show)."""
    scale = gradient_scale
    rows = torch.full((4,), 1e-3)
    slots = torch.tensor([[0.25, -0.25]] * 4)
    assert scale(torch.bfloat16, rows, slots, None) == 1.0
    assert scale(torch.float32, rows, slots, None) == 1.0
    got = scale(torch.float16, rows, slots, torch.full((4,), 1e-4))
    bound = 1e-3 + 0.5 + 1e-4
    assert got == 2.0 ** math.floor(math.log2(2.0**14 / bound)) and got * bound <= 2.0**14 < 2 * got * bound
    assert scale(torch.float16, torch.full((4,), 6e4), slots, None) == 1.0
    assert scale(torch.float16, torch.zeros(4), torch.zeros(4, 2), None) == 1.0
    assert scale(torch.float16, torch.tensor([1.0, math.nan, 1.0, 1.0]), slots, None) == 1.0
    assert scale(torch.float16, torch.empty(0), torch.empty(0, 2), None) == 1.0


@pytest.mark.skipif(extension_available(), reason="this install has the compiled extension")
def test_missing_extension_is_a_clear_error():
    with pytest.raises(RuntimeError, match="distil_kernels._C.*pip install -e"):
        resolve_backend("cuda", None)
    x, w = torch.randn(3, 8), torch.randn(20, 8)
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        linear_cross_entropy(x, w, torch.tensor([1, 2, 3]), backend="cuda")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_one_pass_matches_two_passes(tail):
    """The one-pass epilogue (the per-row algebra from the targets' weights, on the rows'
    statistics) against the two kernels with Python's algebra between them, on sparse rows
    whose bucket keeps mass outside the ids: fp32, the same numbers to a few ulps."""
    x64, w64, b64, target = make_problem(61, 24, 203, k=7, seed=33, ignore_rows=(4, 9), scale=3.0)
    target = type(target)(target.ids, target.probs * 0.8)
    x, w, b = x64.float(), w64.float(), b64.float()
    options = dict(tail=tail, label_smoothing=0.05, z_loss=1e-3, softcap=5.0, temperature=0.9,
                   workspace_bytes=17 * 1024)
    two = run_cuda_orchestration(x, w, b, target, ops=REFERENCE_OPS, **options)
    one = run_cuda_orchestration(x, w, b, target, ops=REFERENCE_ONE_PASS_OPS, **options)
    torch.testing.assert_close(one[0], two[0], rtol=1e-6, atol=1e-6)
    # |gradients| < 0.02, where an fp32 ulp is 1.9e-9.
    for got, want in zip(one[2], two[2]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_fp16_keeps_two_passes():
    """fp16 gradients are written times a scale found from the coefficients, before the
    pass that writes them: the one-pass epilogue is not taken."""
    x, w, b, y = fp16_small_gradient_problem()
    counting = CountingOps(REFERENCE_ONE_PASS_OPS)
    got = run_cuda_orchestration(x, w, b, y, ops=counting.ops, workspace_bytes=64 * 1024)
    assert counting.calls["row_epilogue"] == 0 and counting.calls["chunk_stats"] > 0
    assert_fp16_gradient_keeps_its_small_values(got[2], x, w, b, y, upstream=0.5)


def test_one_pass_refused_falls_back_to_two_passes():
    """A launch the device refuses (a RuntimeError before the kernel runs) warns once and
    finishes every chunk with the two kernels."""
    def refused(*args):
        raise RuntimeError("row_epilogue failed: cluster misconfiguration")

    ops = dataclasses.replace(REFERENCE_ONE_PASS_OPS, row_epilogue=refused)
    x64, w64, b64, target = make_problem(61, 24, 203, k=None, seed=34, scale=3.0)
    x, w, b = x64.float(), w64.float(), b64.float()
    with pytest.warns(UserWarning, match="one-pass loss epilogue failed .*cluster misconfiguration"):
        got = run_cuda_orchestration(x, w, b, target, ops=ops, workspace_bytes=17 * 1024)
    want = run_cuda_orchestration(x, w, b, target, ops=REFERENCE_OPS, workspace_bytes=17 * 1024)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    for g, h in zip(got[2], want[2]):
        torch.testing.assert_close(g, h, rtol=0, atol=0)


def test_epilogue_choice_is_checked(monkeypatch):
    monkeypatch.setenv(cuda_backend.EPILOGUE_ENV, "one-pass")
    assert cuda_backend.one_pass_requested()
    monkeypatch.delenv(cuda_backend.EPILOGUE_ENV)
    assert not cuda_backend.one_pass_requested()
    monkeypatch.setenv(cuda_backend.EPILOGUE_ENV, "fused")
    with pytest.raises(ValueError, match="DISTIL_KERNELS_CUDA_EPILOGUE must be 'one-pass' or 'two-pass', got 'fused'"):
        cuda_backend.one_pass_requested()


def test_bench_floor_runs_the_backends_gemms(monkeypatch):
    """`python -m bench loss`'s `cuda-gemms` row (the cuda backend's three GEMMs alone, its
    floor) computes what its GEMMs would: over 7-row chunks of a 20-row batch, d_input =
    G W and d_weight = G^T x summed over chunks, scaled by the upstream gradient, from its
    fixed gradient chunk G. The bench runs only on a GPU (in bf16); this keeps its calls in
    step with the backend's, in fp32, where the CPU's GEMMs sum as cuBLAS does."""
    from bench.loss_gpu import _CudaGemms, _floor_gradient

    monkeypatch.setattr(cuda_backend, "DEFAULT_WORKSPACE", 4 * 50 * 7)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(20, 16, generator=gen).requires_grad_()
    w = torch.randn(50, 16, generator=gen).requires_grad_()
    loss = _CudaGemms.apply(x, w)
    (3.0 * loss).backward()
    chunk = _floor_gradient(7, 50, torch.float32, x.device).double()
    grad = torch.cat([chunk, chunk, chunk[:6]])
    assert loss.item() == 0.0
    # fp32 sums of at most 50 products of size ~0.1 (G is softmax-sized: <= 2 / (7 * 50)).
    torch.testing.assert_close(x.grad.double(), 3.0 * grad @ w.double(), rtol=1e-5, atol=5e-7)
    torch.testing.assert_close(w.grad.double(), 3.0 * grad.T @ x.double(), rtol=1e-5, atol=5e-7)
