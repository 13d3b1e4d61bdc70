"""fp32-output GEMMs and the fp16 gradient scale, shared by the backends whose backward
pushes a bounded buffer of logits gradients through GEMMs (`cuda`, `triton`).

A logits gradient buffer holds dL/du rounded once to the input dtype. Its two GEMMs
accumulate in fp32 (the tensor cores' accumulator); where their result must add to an
earlier one (d_input over vocabulary chunks, d_weight over token chunks) the sum stays
fp32 too: an fp32-output GEMM adds into an fp32 buffer.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

# fp16's smallest normal number is 6.1e-5: the gradient of a mean over N rows holds
# softmax values over N, far below it on a large vocabulary (1/V/N), where fp16 keeps a
# few bits or none. Its fp16 copy is written times a power of two that lifts the largest
# value it can take to 2**14 (65504 is fp16's largest), and the GEMMs and the bias sum
# take the inverse power as their scale: exact, so only fp16's relative rounding is left.
FP16_GRADIENT_CEILING = 2.0**14


def gradient_scale(dtype: torch.dtype, row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None) -> float:
    """The power of two a logits gradient is written times (1 but for fp16).

    |dL/du| <= |row_coef| + |uniform| + sum |slot_coef| (a softmax value is at most 1 and
    the softcap's chain factor too), so the scaled gradient stays within the ceiling.
    """
    if dtype != torch.float16 or row_coef.numel() == 0:
        return 1.0
    bound = row_coef.abs() + slot_coef.abs().sum(dim=1)
    if uniform is not None:
        bound = bound + uniform.abs()
    top = float(bound.max())  # one host sync, fp16 only
    if not (math.isfinite(top) and top > 0.0):
        return 1.0
    return 2.0 ** min(64, max(0, math.floor(math.log2(FP16_GRADIENT_CEILING / top))))


# CUDA torch's GEMM with an fp32 output for bf16/fp16 operands (aten::mm.dtype_out,
# torch >= 2.8).
CUDA_FP32_OUTPUT_MM = "dtype_out" in torch.ops.aten.mm.overloads()


def mm_fp32(a: Tensor, b: Tensor, out: Tensor) -> None:
    """out (fp32) = a @ b, a bf16/fp16 product never rounded to the operands' dtype.

    CUDA has the fused form (mm with an fp32 out_dtype); the CPU computes it from fp32
    copies of the operands.
    """
    if a.dtype == torch.float32:
        torch.mm(a, b, out=out)
    elif a.is_cuda:
        torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    else:
        torch.mm(a.float(), b.float(), out=out)


# Rows of `c` per fp32 product when the fused form is refused (32 MiB slices at d=4096).
_ADDMM_SLICE_BYTES = 32 << 20
_fused_addmm = [True]


def addmm_fp32(c: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float) -> None:
    """c = beta * c + alpha * (a @ b) into the fp32 `c` from bf16/fp16 operands, the product
    never rounded to them; beta is 1, or 0 for a `c` that holds nothing yet (never read).

    The fused form (addmm with an fp32 out_dtype, adding inside the GEMM) is CUDA torch's
    since 2.8; where a build refuses it, and on the CPU, fp32 products of bounded row
    slices are added instead.
    """
    if a.dtype == torch.float32:
        c.addmm_(a, b, beta=beta, alpha=alpha)
        return
    if not a.is_cuda:
        c.addmm_(a.float(), b.float(), beta=beta, alpha=alpha)
        return
    if _fused_addmm[0]:
        try:
            torch.ops.aten.addmm.dtype_out(c, a, b, torch.float32, beta=beta, alpha=alpha, out=c)
            return
        except RuntimeError as error:
            _fused_addmm[0] = False
            warnings.warn(f"addmm with an fp32 out_dtype failed ({error}); fp32 accumulators add fp32 "
                          f"products of row slices instead", stacklevel=2)
    step = max(1, _ADDMM_SLICE_BYTES // (4 * max(c.shape[1], 1)))
    for r0 in range(0, c.shape[0], step):
        product = torch.ops.aten.mm.dtype(a[r0:r0 + step], b, torch.float32)
        if beta == 0.0:
            torch.mul(product, alpha, out=c[r0:r0 + step])
        else:
            c[r0:r0 + step].add_(product, alpha=alpha)
