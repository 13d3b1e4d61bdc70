"""Forward statistics kernel: per-row log-sum-exp (and logit sum) without the logits.

Program (m, s) takes token block m through vocabulary split s: it builds each logits
tile with `tl.dot` (fp32 accumulation), folds it into a running (max, sum-exp) in
registers, and writes one partial (max, sum-exp, sum) per row and split. Splitting the
vocabulary gives enough programs to fill the GPU at small N without atomics, so the
result does not depend on scheduling; the partials are merged on the host side (a few
KB). Each tile's maximum over the block's rows goes to a small [num_m_blocks, num_tiles]
map that the backward uses to skip tiles under `filter_eps`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import LossOptions
from .configs import ENABLE_FP_FUSION, TileConfig, kernel_operands, select_config
from .tiles import fold_lse, logits_tile

# Enough programs to cover the SMs of an H100 (132) a few times over.
_TARGET_PROGRAMS = 4 * 132


@triton.jit
def lse_forward_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr,
    part_max_ptr, part_sum_ptr, part_zsum_ptr, block_max_ptr,
    # sizes
    N, V, D, num_tiles, tiles_per_split, num_splits,
    # strides
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform
    softcap, inv_temp,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # bias added in the tile
    HAS_SOFTCAP: tl.constexpr,  # c * tanh(u / c) applied in the tile
    LOGIT_SUM: tl.constexpr,  # label smoothing needs sum_v z
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: no silent TF32
    USE_TMA: tl.constexpr,  # x_ptr and w_ptr are tensor descriptors (sm_90)
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64: offs_m * stride_xn passes 2**31 for N * d beyond 2G elements.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    run_zsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_tile = pid_s * tiles_per_split
    last_tile = tl.minimum(first_tile + tiles_per_split, num_tiles)
    for tile in range(first_tile, last_tile):
        offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = offs_n < V
        z, _ = logits_tile(
            x_ptr, w_ptr, b_ptr, offs_m, offs_n, pid_m * BLOCK_M, tile * BLOCK_N, N, V, D,
            stride_xn, stride_xd, stride_wv, stride_wd, softcap, inv_temp,
            BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, USE_TMA,
        )
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        block_max = tl.max(tl.where(row_ok, tile_max, float("-inf")), axis=0)
        tl.store(block_max_ptr + pid_m * num_tiles + tile, block_max)
        run_max, run_sum = fold_lse(run_max, run_sum, z)
        if LOGIT_SUM:
            run_zsum += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
    out = offs_m * num_splits + pid_s
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    if LOGIT_SUM:
        tl.store(part_zsum_ptr + out, run_zsum, mask=row_ok)


@dataclass(frozen=True)
class ForwardStats:
    lse: Tensor  # [N] fp32
    logit_sum: Tensor | None  # [N] fp32, with label smoothing
    block_max: Tensor  # [num_m_blocks, num_tiles] fp32: max of z over the block's rows
    config: TileConfig


def merge_lse(part_max: Tensor, part_sum: Tensor) -> Tensor:
    """log-sum-exp [N] from per-split (max, sum of exp(z - max)) [N, num_splits].

    A split that saw only -inf contributes 0; a row that saw only -inf gets lse -inf.
    """
    row_max = part_max.amax(dim=1, keepdim=True)
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    return (shift + (part_sum * (part_max - shift).exp()).sum(dim=1, keepdim=True).log()).squeeze(1)


def head_kind(bias: Tensor | None, options: LossOptions) -> str | None:
    """"plain" (no bias, softcap or label smoothing), "softcap" (a softcap alone), or None:
    the epilogue's live values, which decide the tiles that fit the registers."""
    if bias is not None or options.label_smoothing:
        return None
    return "plain" if options.softcap is None else "softcap"


def lse_forward(x: Tensor, weight: Tensor, bias: Tensor | None, options: LossOptions,
                config: TileConfig | None = None) -> ForwardStats:
    """Launch the statistics kernel on 2-D `x` [N, d]; merge the per-split partials."""
    if config is None:
        sm90 = x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9
        kind = "forward"
        if sm90:
            kind = {None: "forward_sm90", "plain": "forward_plain_sm90", "softcap": "forward_softcap_sm90"}[
                head_kind(bias, options)]
        config = select_config(kind, x.dtype, (x.shape[0], weight.shape[0], x.shape[1]),
                               (bias is not None, options.softcap is not None, bool(options.label_smoothing)),
                               lambda c: lse_forward(x, weight, bias, options, c))
    n, d = x.shape
    v = weight.shape[0]
    num_m_blocks = max(triton.cdiv(n, config.block_m), 1)
    num_tiles = triton.cdiv(v, config.block_n)
    wanted_splits = max(1, min(num_tiles, _TARGET_PROGRAMS // num_m_blocks))
    tiles_per_split = triton.cdiv(num_tiles, wanted_splits)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    smoothing = bool(options.label_smoothing)
    dev = x.device
    part_max = torch.empty(n, num_splits, dtype=torch.float32, device=dev)
    part_sum = torch.empty(n, num_splits, dtype=torch.float32, device=dev)
    part_zsum = torch.empty(n, num_splits, dtype=torch.float32, device=dev) if smoothing else part_sum
    block_max = torch.empty(num_m_blocks, num_tiles, dtype=torch.float32, device=dev)
    if n > 0:
        grid = (num_m_blocks, num_splits)
        x_arg, w_arg, use_tma = kernel_operands(x, weight, config)
        lse_forward_kernel[grid](
            x_arg, w_arg, bias if bias is not None else x,
            part_max, part_sum, part_zsum, block_max,
            n, v, d, num_tiles, tiles_per_split, num_splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            float(options.softcap or 1.0), 1.0 / options.temperature,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None, LOGIT_SUM=smoothing,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
    lse = merge_lse(part_max, part_sum)
    logit_sum = part_zsum.sum(dim=1) if smoothing else None
    return ForwardStats(lse, logit_sum, block_max, config)
