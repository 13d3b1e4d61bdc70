"""Target logits kernel: z at the K slot ids of every row, as dot products.

A sparse row needs only k logits of its V; computing them as x[n] . W[id] costs
O(N*k*d), noise beside the O(N*V*d) sweep, and keeps the sweep free of per-tile
id matching. The transform (bias, softcap, temperature) is the sweep's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import LossOptions
from .configs import ENABLE_FP_FUSION, INDEXED_DOT_BLOCK_D, INDEXED_DOT_BLOCK_P
from .tiles import tanh_fp32


@triton.jit
def indexed_dot_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr, ids_ptr, out_ptr,
    # sizes
    num_pairs, K, D,
    # strides
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform
    softcap, inv_temp,
    # meta-parameters
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pair_ok = offs_p < num_pairs
    rows = offs_p // K
    # Ids arrive in [0, V): padding was replaced by 0 before the launch.
    ids = tl.load(ids_ptr + offs_p, mask=pair_ok, other=0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d_ok = offs_d < D - d0
        mask = pair_ok[:, None] & d_ok[None, :]
        a = tl.load(x_ptr + rows[:, None] * stride_xn + (d0 + offs_d)[None, :] * stride_xd, mask=mask, other=0.0)
        b = tl.load(w_ptr + ids[:, None] * stride_wv + (d0 + offs_d)[None, :] * stride_wd, mask=mask, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + ids, mask=pair_ok, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        acc = tanh_fp32(acc / softcap) * softcap
    tl.store(out_ptr + offs_p, acc * inv_temp, mask=pair_ok)


def indexed_dot(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, options: LossOptions) -> Tensor:
    """z[n, j] at `slot_ids` [N, K] (int64, in range), fp32."""
    n, k = slot_ids.shape
    out = torch.empty(n, k, dtype=torch.float32, device=x.device)
    ids = slot_ids.contiguous()
    num_pairs = n * k
    if num_pairs == 0:
        return out
    grid = (triton.cdiv(num_pairs, INDEXED_DOT_BLOCK_P),)
    indexed_dot_kernel[grid](
        x, weight, bias if bias is not None else x, ids, out,
        num_pairs, k, x.shape[1],
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        float(options.softcap or 1.0), 1.0 / options.temperature,
        BLOCK_P=INDEXED_DOT_BLOCK_P, BLOCK_D=INDEXED_DOT_BLOCK_D,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None,
        enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return out
