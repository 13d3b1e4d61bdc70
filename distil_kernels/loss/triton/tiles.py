"""Device functions shared by the Triton kernels: the logits tile, its log-sum-exp fold, program order."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_program(pid, num_m_blocks, num_n_tiles, GROUP_M: tl.constexpr):
    """(token block, vocabulary tile) of program `pid`.

    GROUP_M token blocks walk the vocabulary together, so each W tile is read from HBM
    once per group and from L2 by the rest. Within a group consecutive programs differ
    in their token block.
    """
    per_group = GROUP_M * num_n_tiles
    group = pid // per_group
    first_m = group * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    local = pid % per_group
    pid_m = first_m + local % group_size
    pid_n = local // group_size
    return pid_m, pid_n


@triton.jit
def tanh_fp32(y):
    """tanh(y) to a few ulps relative (see `tanh_and_slope_fp32`)."""
    tanh, _ = tanh_and_slope_fp32(y)
    return tanh


@triton.jit
def tanh_and_slope_fp32(y):
    """(tanh(y), 1 - tanh(y)^2) in fp32, each to a few ulps relative, for any y.

    Both come from r = 1 - tanh|y| = 2 / (exp(2|y|) + 1), in (0, 1] with no overflow
    (exp = inf gives r = 0: tanh = +-1, slope 0). The slope r (2 - r) is a product of
    two accurate factors, where 1 - tanh^2 of a rounded tanh cancels as |y| grows (at
    |y| = 8 the true 4.5e-7 is a few ulps of 1: errors of 10% and more).
    1 - r cancels the other way, as |y| -> 0: an error of an ulp of 1, not of tanh, which
    the softcap's c / T then scales (c = 30, T = 0.05: 4e-5 in z). Below |y| = 0.625 an
    odd polynomial takes over, y + y^3 P(y^2), a relative minimax fit (4e-9) that is
    exact for tiny y; above it tanh > 0.55 and 1 - r loses nothing.
    """
    a = tl.abs(y)
    # exp(2a) as exp2(a * 2 log2(e)): tl.exp's own lowering on a GPU (ex2 of x log2(e)), less a product by 2
    r = 2.0 / (tl.exp2(a * 2.8853900817779268) + 1.0)
    # The polynomial of y clamped to its interval: past it the value goes unused, and
    # y = +-inf (ids masked by a -inf bias) would make it inf - inf.
    c = tl.minimum(tl.maximum(y, -0.625), 0.625)
    s = c * c
    p = -0.00570524717 * s + 0.0206393152
    p = p * s - 0.0537397824
    p = p * s + 0.133314431
    p = p * s - 0.333332807
    tanh = tl.where(a < 0.625, c + (c * s) * p, tl.where(y < 0.0, r - 1.0, 1.0 - r))
    return tanh, r * (2.0 - r)


@triton.jit
def fold_lse(run_max, run_sum, z):
    """A tile `z` [M, N] folded into a running (max, sum of exp(z - max)) per row.

    While a row has seen only -inf (a bias masking ids, a split of nothing but padded
    columns) its max stays -inf and its sum 0: the exponents shift by 0, not by the max,
    where -inf - -inf would make them NaN.
    """
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    run_sum = run_sum * tl.exp(run_max - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return new_max, run_sum


@triton.jit
def logits_tile(
    x_ptr, w_ptr, b_ptr,
    offs_m, offs_n,  # int64 row and vocabulary indices of the tile
    first_row, first_col,  # the same tile's first row and column, for TMA descriptors
    N, V, D,
    stride_xn, stride_xd, stride_wv, stride_wd,
    softcap, inv_temp,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,  # x_ptr and w_ptr are tensor descriptors (sm_90)
    SOFTCAP_SLOPE: tl.constexpr = False,  # return 1 - tanh(u / c)^2 in place of tanh(u / c)
):
    """z = softcap(x W^T + b) / T for one [BLOCK_M, BLOCK_N] tile, fp32, and tanh(u / c)
    (or, with SOFTCAP_SLOPE, the softcap's derivative 1 - tanh(u / c)^2; see `finish_logits`).

    Rows past N and columns past V load zeros (no out-of-bounds read); callers mask them.
    """
    acc = tile_products(x_ptr, w_ptr, offs_m, offs_n, first_row, first_col, N, V, D, stride_xn, stride_xd,
                        stride_wv, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA)
    return finish_logits(acc, b_ptr, offs_n, offs_n < V, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP, SOFTCAP_SLOPE)


@triton.jit
def tile_products(
    x_ptr, w_ptr, offs_m, offs_n, first_row, first_col, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    """x W^T [BLOCK_M, BLOCK_N] of one tile, fp32: by TMA descriptors or masked pointer loads."""
    if USE_TMA:
        acc = descriptor_products(x_ptr, w_ptr, first_row, first_col, D, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    else:
        acc = pointer_products(x_ptr, w_ptr, offs_m, offs_n, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
                               BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    return acc


@triton.jit
def pointer_products(
    x_ptr, w_ptr, offs_m, offs_n, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """x W^T of the tile by masked loads of its x and W slices."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    col_ok = offs_n < V
    x_ptrs = x_ptr + offs_m[:, None] * stride_xn + offs_k[None, :] * stride_xd
    w_ptrs = w_ptr + offs_n[None, :] * stride_wv + offs_k[:, None] * stride_wd
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    return acc


@triton.jit
def descriptor_products(
    x_desc, w_desc, first_row, first_col, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """x W^T of the tile with its x and W slices loaded by the tensor-memory accelerator.

    The descriptors' blocks are [BLOCK_M, BLOCK_K] of x and [BLOCK_N, BLOCK_K] of W; TMA
    fills what lies past N, V or D with zeros, so there are no masks and no per-thread
    addresses: the registers they held are left to the tile.
    """
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        a = x_desc.load([first_row, k0])
        b = w_desc.load([first_col, k0])
        acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def finish_logits(acc, b_ptr, offs_n, col_ok, softcap, inv_temp, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  SOFTCAP_SLOPE: tl.constexpr = False):
    """(z, tanh(u / c)) of a tile of products `acc` = x W^T: bias, softcap and temperature applied.

    With SOFTCAP_SLOPE the second value is the chain factor 1 - tanh(u / c)^2 instead,
    formed before tanh is rounded (it cannot be recovered from a rounded tanh near +-1).
    Without a softcap it is the raw logit u. Triton drops whichever a kernel leaves unused.
    """
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    second = acc
    if HAS_SOFTCAP:
        tanh, slope = tanh_and_slope_fp32(acc / softcap)
        acc = tanh * (softcap * inv_temp)
        second = slope if SOFTCAP_SLOPE else tanh
    else:
        acc = acc * inv_temp
    return acc, second
