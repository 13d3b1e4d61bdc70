"""The `cuda` backend: cuBLAS GEMMs into a bounded workspace, finished by csrc/'s fused epilogue.

The algorithm of `chunked` with whole-row chunks: rows are taken `rows` at a time, so
that a chunk's logits [rows, V] fit `workspace_bytes` (2 GiB by default). Each chunk's
logits u come from one GEMM with bf16/fp16 operands and an fp32 output (the tensor
cores' fp32 accumulator, never rounded to the input dtype), and two CUDA kernels finish
it (csrc/loss_epilogue.cu), each reading u once and applying bias, softcap and
temperature on the fly: `chunk_stats` returns each row's log-sum-exp terms, logit sum
and the logits at its slot ids; `logits_grad` writes dL/du once, rounded into the input
dtype for the two gradient GEMMs, in place: over the first bytes of each row of u (row
stride 2V in bf16), so the workspace holds fp32 logits alone. d_input rows come from one
GEMM over the whole vocabulary; d_weight accumulates over chunks in fp32 (an
fp32-output GEMM added into an fp32 buffer). A scalar loss that needs gradients gets
them in the forward (the shared autograd Function of `chunked`): 6*N*V*d FLOPs, nothing
recomputed, and per logit the GEMM's 4-byte write, two 4-byte reads and a 2-byte write.

On sm_90, with `DISTIL_KERNELS_CUDA_EPILOGUE=one-pass`, the forward of a scalar loss
that needs gradients finishes each chunk in one kernel instead (csrc/row_epilogue.cu):
a thread-block cluster holds each row in shared memory, so the logits are read once and
the per-row algebra runs on the device: per logit 4 + 2 bytes after the GEMM's write
instead of 4 + 4 + 2. Not the default until a GPU run measures it (bench provider
`cuda-one-pass`).

The device operations are gathered in `EpilogueOps`: the extension's on CUDA, and
`REFERENCE_OPS`, the same contract in PyTorch ops on any device, which the tests use to
check this orchestration on the CPU and the kernels against it on a GPU.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .chunked import CoefFn, Grads, SweepStats, TermsCoefFn, chunked_gradients, chunked_linear_cross_entropy
from .gemm import CUDA_FP32_OUTPUT_MM, addmm_fp32, gradient_scale, mm_fp32
from .options import BUCKET_CLAMP, LossOptions
from .reference import LossStats
from .targets import Slots, TargetWeights, target_weights, weighted_row_terms

# A chunk of Qwen2.5-7B's vocabulary (152064) at 4 bytes a logit (fp32 logits, their
# gradient written over them) is 0.6 MB a row: 2 GiB hold ~3530 rows, a GEMM that fills
# an H100, and N = 16384 takes 5 chunks (7 when the gradient had a buffer of its own:
# each chunk reads and writes d_weight's 2.2 GB fp32 accumulator once).
DEFAULT_WORKSPACE = 2 << 30
# "one-pass" or "two-pass": which epilogue finishes a forward's chunks where both can.
EPILOGUE_ENV = "DISTIL_KERNELS_CUDA_EPILOGUE"


@dataclass(frozen=True)
class EpilogueOps:
    # (logits u fp32 [r, c], bias [c] | None, softcap | None, inv_temp, write_z,
    #  ids [r, K], vocab_start, slot_logits [r, K] out, partial [r, 3] out)
    chunk_stats: Callable[..., None]
    # (logits u fp32 [r, c], bias [c] | None, softcap | None, inv_temp, row_coef [r], lse [r],
    #  uniform [r] | None, ids [r, K], slot_coef [r, K], slot_scratch [r, K] fp32 workspace,
    #  vocab_start, out [r, c] dL/du: over u row by row (`in_place_gradient`) or apart from it)
    logits_grad: Callable[..., None]
    mm_fp32: Callable[[Tensor, Tensor, Tensor], None]  # out (fp32) = a @ b
    # c (fp32) = beta * c + alpha * (a @ b), beta 0 or 1 (0: c's old values are never read)
    addmm_fp32: Callable[[Tensor, Tensor, Tensor, float, float], None]
    # Statistics and gradient in one pass over whole rows, the coefficients from the
    # targets' weights: (logits u fp32 [r, V], bias | None, softcap | None, inv_temp,
    #  ids [r, K], slot_weight [r, K], slot_valid [r, K] bool, rest [r], upstream [r] (1/T
    #  folded in), num_target, smoothing, z_loss, bucket_clamp, lse [r] out,
    #  slot_logits [r, K] out, logit_sum [r] out | None, out: dL/du over u row by row).
    # None where the ops have no such pass.
    row_epilogue: Callable[..., None] | None = None
    # (vocab_size, num_slots, dtype, device) -> whether `row_epilogue` takes these rows.
    row_epilogue_fits: Callable[[int, int, torch.dtype, torch.device], bool] | None = None


# --------------------------------------------------------------------------------------
# Reference ops: the kernels' contract in PyTorch
# --------------------------------------------------------------------------------------


def _transform(u: Tensor, bias: Tensor | None, softcap: float | None, inv_temp: float) -> tuple[Tensor, Tensor | None]:
    """(z, tanh(u / c) or None) of raw logits u, as the kernels compute them."""
    if bias is not None:
        u = u + bias
    if softcap is None:
        return u * inv_temp, None
    tanh = torch.tanh(u * (1.0 / softcap))  # as the kernels: a product with the reciprocal
    return tanh * (softcap * inv_temp), tanh


def reference_chunk_stats(logits: Tensor, bias: Tensor | None, softcap: float | None, inv_temp: float,
                          write_z: bool, ids: Tensor, vocab_start: int, slot_logits: Tensor, partial: Tensor) -> None:
    z, _ = _transform(logits, bias, softcap, inv_temp)
    row_max = z.amax(dim=1)
    partial[:, 0] = row_max
    # A row whose max is -inf sums to 0 (log: -inf), not NaN.
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    partial[:, 1] = (z - shift[:, None]).exp().sum(dim=1)
    partial[:, 2] = z.sum(dim=1)
    local = ids - vocab_start
    inside = (local >= 0) & (local < z.shape[1])
    gathered = z.gather(1, local.clamp(0, z.shape[1] - 1))
    slot_logits.copy_(torch.where(inside, gathered, slot_logits))
    if write_z:
        logits.copy_(z)


def reference_logits_grad(logits: Tensor, bias: Tensor | None, softcap: float | None, inv_temp: float,
                          row_coef: Tensor, lse: Tensor, uniform: Tensor | None, ids: Tensor, slot_coef: Tensor,
                          slot_scratch: Tensor, vocab_start: int, out: Tensor) -> None:
    # The whole gradient is formed before `out`, which may be `logits` itself, is written:
    # the kernel's slot_scratch (u at the slot ids, kept from its stores) has no role here.
    z, tanh = _transform(logits, bias, softcap, inv_temp)
    grad = row_coef[:, None] * (z - lse[:, None]).exp()
    if uniform is not None:
        grad -= uniform[:, None]
    local = ids - vocab_start
    inside = (local >= 0) & (local < z.shape[1])
    # The kernel sums a column's coefficients first, then subtracts them once.
    correction = torch.zeros_like(grad).scatter_add_(1, local.clamp(0, z.shape[1] - 1),
                                                     torch.where(inside, slot_coef, 0.0))
    grad -= correction
    if tanh is not None:
        grad *= 1.0 - tanh * tanh
    out.copy_(grad)


def reference_row_epilogue(logits: Tensor, bias: Tensor | None, softcap: float | None, inv_temp: float, ids: Tensor,
                           slot_weight: Tensor, slot_valid: Tensor, rest: Tensor, upstream: Tensor, num_target: int,
                           smoothing: float, z_loss: float, bucket_clamp: float, lse: Tensor, slot_logits: Tensor,
                           logit_sum: Tensor | None, out: Tensor) -> None:
    """The one-pass contract: `reference_chunk_stats`, the shared algebra
    (`weighted_row_terms`, a bucket's rest given for every tail: 0 makes it the others'),
    then `reference_logits_grad`."""
    if bucket_clamp != BUCKET_CLAMP:
        raise ValueError(f"the reference algebra clamps a bucket at {BUCKET_CLAMP}, got bucket_clamp={bucket_clamp}")
    rows = logits.shape[0]
    partial = logits.new_empty(rows, 3)
    reference_chunk_stats(logits, bias, softcap, inv_temp, False, ids, 0, slot_logits, partial)
    lse.copy_(partial[:, 0] + partial[:, 1].log())
    if logit_sum is not None:
        logit_sum.copy_(partial[:, 2])
    terms = weighted_row_terms(TargetWeights(slot_weight, rest, slot_valid, num_target), lse, slot_logits, logit_sum,
                               LossOptions(label_smoothing=smoothing, z_loss=z_loss), logits.shape[1])
    uniform = None if terms.uniform is None else terms.uniform * upstream
    reference_logits_grad(logits, bias, softcap, inv_temp, terms.row_coef * upstream,
                          lse, uniform, ids, terms.slot_coef * upstream[:, None], torch.empty_like(slot_logits), 0, out)


def _reference_row_epilogue_fits(vocab_size: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> bool:
    return dtype != torch.float16  # fp16 gradients need a scale known before the pass


def _reference_mm(a: Tensor, b: Tensor, out: Tensor) -> None:
    torch.mm(a.float(), b.float(), out=out)


def _reference_addmm(c: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float) -> None:
    c.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)


REFERENCE_OPS = EpilogueOps(reference_chunk_stats, reference_logits_grad, _reference_mm, _reference_addmm)
REFERENCE_ONE_PASS_OPS = EpilogueOps(reference_chunk_stats, reference_logits_grad, _reference_mm, _reference_addmm,
                                     reference_row_epilogue, _reference_row_epilogue_fits)


# --------------------------------------------------------------------------------------
# Extension ops
# --------------------------------------------------------------------------------------


def extension_ops() -> EpilogueOps:
    """The compiled kernels (a RuntimeError saying how to build them when missing)."""
    from ..cuda_ext import extension

    ext = extension()
    if not CUDA_FP32_OUTPUT_MM:
        raise RuntimeError(f"backend='cuda' needs torch's fp32-output mm for bf16/fp16 operands "
                           f"(aten::mm.dtype_out, torch >= 2.8), which torch {torch.__version__} lacks")

    def stream(t: Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream

    def chunk_stats(logits, bias, softcap, inv_temp, write_z, ids, vocab_start, slot_logits, partial):
        ext.chunk_stats(logits, bias, float(softcap or 0.0), float(inv_temp), bool(write_z), ids, int(vocab_start),
                        slot_logits, partial, stream(logits))

    def logits_grad(logits, bias, softcap, inv_temp, row_coef, lse, uniform, ids, slot_coef, slot_scratch,
                    vocab_start, out):
        ext.logits_grad(logits, bias, float(softcap or 0.0), float(inv_temp), row_coef, lse, uniform, ids, slot_coef,
                        slot_scratch, int(vocab_start), out, stream(logits))

    def row_epilogue(logits, bias, softcap, inv_temp, ids, slot_weight, slot_valid, rest, upstream, num_target,
                     smoothing, z_loss, bucket_clamp, lse, slot_logits, logit_sum, out):
        ext.row_epilogue(logits, bias, float(softcap or 0.0), float(inv_temp), ids, slot_weight, slot_valid, rest,
                         upstream, int(num_target), float(smoothing), float(z_loss), float(bucket_clamp), lse,
                         slot_logits, logit_sum, out, stream(logits))

    def row_epilogue_fits(vocab_size, num_slots, dtype, device):
        # Thread-block clusters and distributed shared memory: sm_90 and later.
        return (one_pass_requested() and dtype != torch.float16 and device.type == "cuda"
                and torch.cuda.get_device_capability(device)[0] >= 9
                and ext.row_epilogue_cluster(vocab_size, num_slots) > 0)

    return EpilogueOps(chunk_stats, logits_grad, mm_fp32, addmm_fp32, row_epilogue, row_epilogue_fits)


def one_pass_requested() -> bool:
    """Whether `DISTIL_KERNELS_CUDA_EPILOGUE` asks for the one-pass epilogue (default: two passes)."""
    value = os.environ.get(EPILOGUE_ENV, "two-pass")
    if value not in ("one-pass", "two-pass"):
        raise ValueError(f"{EPILOGUE_ENV} must be 'one-pass' or 'two-pass', got {value!r}")
    return value == "one-pass"


# --------------------------------------------------------------------------------------
# Sweep
# --------------------------------------------------------------------------------------


def chunk_rows(num_rows: int, vocab_size: int, workspace_bytes: int | None) -> int:
    """Rows per chunk: whole rows of fp32 logits (their gradient overwrites them); at least one."""
    budget = DEFAULT_WORKSPACE if workspace_bytes is None else workspace_bytes
    return max(1, min(max(num_rows, 1), budget // (4 * vocab_size)))


def in_place_gradient(logits: Tensor, dtype: torch.dtype) -> Tensor:
    """The [r, c] `dtype` view whose row i starts at row i of the fp32 `logits` [r, c]:
    where `logits_grad` writes dL/du over the logits it reads (bf16/fp16 in the first
    half of each row's bytes), and the gradient GEMMs read it (row stride 2c)."""
    if dtype == torch.float32:
        return logits
    return logits.view(dtype)[:, : logits.shape[1]]


def cuda_sweep(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, options: LossOptions, *,
               stats: SweepStats | None = None, coef_fn: CoefFn | None = None, grads: Grads | None = None,
               ops: EpilogueOps | None = None) -> SweepStats:
    """`chunked.sweep`'s contract (statistics, and gradients for `coef_fn`) on whole-row chunks.

    Given `stats` (the gradient pass of a loss whose statistics came first), the chunks go
    straight from the GEMM to `logits_grad`. A loss's own coefficients (`TermsCoefFn`)
    with no statistics yet take the one-pass epilogue where the ops have one that fits.
    """
    ops = ops if ops is not None else extension_ops()
    num_rows, vocab_size = x.shape[0], weight.shape[0]
    num_slots = slot_ids.shape[1]
    dev = x.device
    rows = chunk_rows(num_rows, vocab_size, options.workspace_bytes)
    logits_buf = torch.empty(rows * vocab_size, dtype=torch.float32, device=dev)
    slot_scratch = torch.empty(rows, num_slots, dtype=torch.float32, device=dev) if coef_fn is not None else None
    partial = torch.empty(rows, 3, dtype=torch.float32, device=dev)
    # fp16's scaled gradients take d_input's product in fp32 (see below).
    input_buf = None
    if coef_fn is not None and grads.input is not None and x.dtype == torch.float16:
        input_buf = torch.empty(rows * x.shape[1], dtype=torch.float32, device=dev)
    need_stats = stats is None
    if need_stats:
        stats = SweepStats(
            torch.empty(num_rows, dtype=torch.float32, device=dev),
            torch.zeros(num_rows, num_slots, dtype=torch.float32, device=dev),
            torch.zeros(num_rows, dtype=torch.float32, device=dev) if options.label_smoothing else None,
        )
    bias32 = None if bias is None else bias.float().contiguous()
    ids = slot_ids.contiguous()
    inv_t = 1.0 / options.temperature
    weight_t = weight.T
    one_pass = None
    if (need_stats and isinstance(coef_fn, TermsCoefFn) and ops.row_epilogue is not None
            and ops.row_epilogue_fits(vocab_size, num_slots, x.dtype, dev)):
        one_pass = _OnePassInputs.of(coef_fn, inv_t)
    for r0 in range(0, num_rows, rows):
        r1 = min(r0 + rows, num_rows)
        n = r1 - r0
        logits = logits_buf[: n * vocab_size].view(n, vocab_size)
        ops.mm_fp32(x[r0:r1], weight_t, logits)
        if one_pass is not None:
            grad = in_place_gradient(logits, x.dtype)
            try:
                one_pass.run(ops, logits, bias32, ids, r0, r1, stats, grad)
            except RuntimeError as error:
                # A cluster launch the device refuses (the kernel never ran, the logits are
                # intact): the two passes finish this chunk and the rest.
                warnings.warn(f"the one-pass loss epilogue failed ({error}); using two passes", stacklevel=2)
                one_pass = None
            else:
                coef_fn(r0, r1, stats.lse[r0:r1], stats.slot_logits[r0:r1],
                        None if stats.logit_sum is None else stats.logit_sum[r0:r1])  # the loss's terms, for its sink
                backpropagate_chunk(grad, 1.0, x, weight, r0, r1, grads, ops, input_buf)
                continue
        if need_stats:
            ops.chunk_stats(logits, bias32, options.softcap, inv_t, False, ids[r0:r1], 0, stats.slot_logits[r0:r1],
                            partial[:n])
            stats.lse[r0:r1] = partial[:n, 0] + partial[:n, 1].log()
            if stats.logit_sum is not None:
                stats.logit_sum[r0:r1] = partial[:n, 2]
        if coef_fn is None:
            continue
        lse = stats.lse[r0:r1]
        row_coef, slot_coef, uniform = coef_fn(
            r0, r1, lse, stats.slot_logits[r0:r1], None if stats.logit_sum is None else stats.logit_sum[r0:r1]
        )
        grad = in_place_gradient(logits, x.dtype)
        row_coef = (row_coef * inv_t).float()
        slot_coef = (slot_coef * inv_t).float()
        uniform = None if uniform is None else (uniform * inv_t).float()
        scale = gradient_scale(grad.dtype, row_coef, slot_coef, uniform)
        if scale != 1.0:
            row_coef, slot_coef = row_coef * scale, slot_coef * scale
            uniform = None if uniform is None else uniform * scale
        ops.logits_grad(
            logits, bias32, options.softcap, inv_t, row_coef.contiguous(), lse.float().contiguous(),
            None if uniform is None else uniform.contiguous(), ids[r0:r1], slot_coef.contiguous(), slot_scratch[:n],
            0, grad,
        )
        backpropagate_chunk(grad, scale, x, weight, r0, r1, grads, ops, input_buf)
    if grads is not None and grads.weight_unwritten:  # no rows: nothing was written
        grads.weight.zero_()
        grads.weight_unwritten = False
    return stats


@dataclass(frozen=True)
class _OnePassInputs:
    """What `row_epilogue` reads of a loss's targets, for every row, made once a sweep."""

    slot_weight: Tensor  # [N, K] fp32
    slot_valid: Tensor  # [N, K] bool
    rest: Tensor  # [N] fp32, zeros but for a bucket tail
    upstream: Tensor  # [N] fp32, 1/T folded in
    num_target: int
    options: LossOptions

    @staticmethod
    def of(coef_fn: TermsCoefFn, inv_t: float) -> "_OnePassInputs":
        targets = target_weights(coef_fn.slots, coef_fn.options)
        rest = targets.rest if targets.rest is not None else torch.zeros_like(coef_fn.upstream)
        return _OnePassInputs(targets.weights.float().contiguous(), targets.valid.contiguous(),
                              rest.float().contiguous(), (coef_fn.upstream * inv_t).float().contiguous(),
                              targets.num_target, coef_fn.options)

    def run(self, ops: EpilogueOps, logits: Tensor, bias32: Tensor | None, ids: Tensor, r0: int, r1: int,
            stats: SweepStats, grad: Tensor) -> None:
        ops.row_epilogue(
            logits, bias32, self.options.softcap, 1.0 / self.options.temperature, ids[r0:r1], self.slot_weight[r0:r1],
            self.slot_valid[r0:r1], self.rest[r0:r1], self.upstream[r0:r1], self.num_target,
            self.options.label_smoothing, self.options.z_loss, BUCKET_CLAMP, stats.lse[r0:r1],
            stats.slot_logits[r0:r1], None if stats.logit_sum is None else stats.logit_sum[r0:r1], grad,
        )


def backpropagate_chunk(grad: Tensor, scale: float, x: Tensor, weight: Tensor, r0: int, r1: int, grads: Grads,
                   ops: EpilogueOps, input_buf: Tensor | None) -> None:
    """Push a chunk's dL/du (written times `scale`) through the linear layer into `grads`."""
    n = r1 - r0
    if grads.bias is not None:
        # From the same rounded gradient the weight's GEMM reads (a bias is a weight
        # column against a constant 1 input), summed in fp32.
        grads.bias.add_(grad.sum(dim=0, dtype=torch.float32), alpha=1.0 / scale)
    if grads.input is not None:
        if scale == 1.0:
            torch.mm(grad, weight, out=grads.input[r0:r1])
        else:
            # An fp32 product: an fp16 one may sum in fp16 (PyTorch allows reduced-
            # precision reductions by default), which the scaled gradient overflows.
            product = input_buf[: n * x.shape[1]].view(n, x.shape[1])
            ops.mm_fp32(grad, weight, product)
            torch.mul(product, 1.0 / scale, out=grads.input[r0:r1])
    if grads.weight is not None:
        ops.addmm_fp32(grads.weight, grad.T, x[r0:r1], 1.0 / scale, 0.0 if grads.weight_unwritten else 1.0)
        grads.weight_unwritten = False


def cuda_gradients(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, stats: SweepStats,
                   row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None, options: LossOptions,
                   need: tuple[bool, bool, bool], ops: EpilogueOps | None = None
                   ) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One gradient sweep for per-row coefficients already scaled by the upstream gradient."""
    return chunked_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need,
                             sweep_fn=_bind(ops))


def cuda_linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, slots: Slots, options: LossOptions,
                              ops: EpilogueOps | None = None) -> tuple[Tensor, LossStats]:
    """Loss (fp32) and stats of 2-D `x` [N, d] by the cuda backend."""
    return chunked_linear_cross_entropy(x, weight, bias, slots, options, sweep_fn=_bind(ops))


def _bind(ops: EpilogueOps | None) -> Callable[..., SweepStats]:
    """`cuda_sweep` with its ops resolved once (the extension's unless given)."""
    resolved = ops if ops is not None else extension_ops()

    def sweep_fn(*args, **kwargs) -> SweepStats:
        return cuda_sweep(*args, ops=resolved, **kwargs)

    return sweep_fn
