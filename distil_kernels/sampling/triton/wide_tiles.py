"""Passes of several adjacent vocabulary tiles over one block of rows, shared by the
sampler and the threshold top-k.

A program that holds a block of rows reads their x slices from L2 for every pass over the
hidden dim, next to the tile's W slices. With SPLIT_N adjacent tiles a pass, each x slice
serves SPLIT_N products, while each tile's products stay an accumulator of their own that
the kernel's epilogue consumes and frees in turn: a [BLOCK_M, SPLIT_N * BLOCK_N] tile of
epilogue temporaries would not fit the registers. Up to four accumulators; the unused ones
are zeros the compiler drops.

Tiles this narrow make small wgmma instructions: a 32-wide tile over 8 warps is two
warpgroups of m64n16k16 each, and with both operands in shared memory every one of them
reads its x slice (64 x 16, 2 KiB) again beside 0.5 KiB of W. Per 128-wide K slice of a
64x128 pass that is 160 KiB of shared memory reads for 1M multiply-adds: ~1250 cycles at
128 B a cycle an SM, where the tensor cores need ~512, so the products run at about 40% of
their peak, which a batch of 256 rows (a GEMM more than a GEMV) feels. With X_REGISTERS
each warpgroup reads its x slice into registers once a K slice (ldmatrix) and the wgmmas
take it from there (their RS form): 64 KiB a K slice, no longer above the tensor cores'
time. An opaque copy (`register_operand`) is what makes Triton keep the operand in
registers; the interpreter has no inline assembly and needs no such hint. But where the
loop leaves these wgmmas in flight past other writes of the accumulators (the flat
loops' epilogue and reset), ptxas serializes them: sampling/triton/configs.py has the
measurements, and `aot.serialized_wgmmas` tells from a compiled kernel's SASS.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...loss.triton.configs import interpreting


@triton.jit
def _opaque_copy(a):
    if a.dtype.primitive_bitwidth == 32:
        out = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [a], dtype=a.dtype, is_pure=True, pack=1)
    else:  # two 16-bit values to a 32-bit register
        out = tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [a], dtype=a.dtype, is_pure=True, pack=2)
    return out


@triton.jit
def _same_operand(a):
    return a


register_operand = _same_operand if interpreting() else _opaque_copy


@triton.jit
def wide_products(
    x_ptr, w_ptr, offs_m, first_tile, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,  # x_ptr and w_ptr are tensor descriptors (`wide_products_tma`)
    X_REGISTERS: tl.constexpr = False,  # with USE_TMA: each x slice from registers (module docstring)
):
    """The products x W^T [BLOCK_M, BLOCK_N] of tiles first_tile .. first_tile + SPLIT_N - 1,
    from one pass over x."""
    if USE_TMA:
        acc0, acc1, acc2, acc3 = wide_products_tma(x_ptr, w_ptr, first_tile, D, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_N,
                                                   DOT_PRECISION, X_REGISTERS)
    else:
        acc0, acc1, acc2, acc3 = wide_products_pointers(x_ptr, w_ptr, offs_m, first_tile, N, V, D, stride_xn,
                                                        stride_xd, stride_wv, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K,
                                                        SPLIT_N, DOT_PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def zero_accumulators(BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Four fp32 [BLOCK_M, BLOCK_N] accumulators, one per tile of a pass (unused ones are dropped)."""
    zeros = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    return zeros, zeros, zeros, zeros


@triton.jit
def wide_products_pointers(
    x_ptr, w_ptr, offs_m, first_tile, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`wide_products` by masked pointer loads."""
    offs_k = tl.arange(0, BLOCK_K)
    row_ok = offs_m < N
    cols = (first_tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xn + offs_k[None, :] * stride_xd
    w_ptrs = w_ptr + cols[None, :] * stride_wv + offs_k[:, None] * stride_wd
    tile_rows = BLOCK_N * stride_wv
    acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
    for k0 in range(0, D, BLOCK_K):
        k_ok = offs_k < D - k0
        a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptrs, mask=k_ok[:, None] & (cols < V)[None, :], other=0.0)
        acc0 = tl.dot(a, b, acc0, input_precision=DOT_PRECISION)
        if SPLIT_N >= 2:
            b = tl.load(w_ptrs + tile_rows, mask=k_ok[:, None] & (cols + BLOCK_N < V)[None, :], other=0.0)
            acc1 = tl.dot(a, b, acc1, input_precision=DOT_PRECISION)
        if SPLIT_N >= 4:
            b = tl.load(w_ptrs + 2 * tile_rows, mask=k_ok[:, None] & (cols + 2 * BLOCK_N < V)[None, :], other=0.0)
            acc2 = tl.dot(a, b, acc2, input_precision=DOT_PRECISION)
            b = tl.load(w_ptrs + 3 * tile_rows, mask=k_ok[:, None] & (cols + 3 * BLOCK_N < V)[None, :], other=0.0)
            acc3 = tl.dot(a, b, acc3, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xd
        w_ptrs += BLOCK_K * stride_wd
    return acc0, acc1, acc2, acc3


@triton.jit
def wide_products_tma(
    x_desc, w_desc, first_tile, D,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, X_REGISTERS: tl.constexpr = False,
):
    """`wide_products` with the x and W slices loaded by TMA (sm_90): W streams from HBM in
    [BLOCK_N, BLOCK_K] boxes, one instruction each instead of per-thread masked loads,
    zero-filled past V and d."""
    first_row = tl.program_id(0) * BLOCK_M
    first_col = first_tile * BLOCK_N
    acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
    for k0 in range(0, D, BLOCK_K):
        acc0, acc1, acc2, acc3 = slice_products_tma(x_desc, w_desc, first_row, first_col, k0, acc0, acc1, acc2, acc3,
                                                    BLOCK_N, SPLIT_N, DOT_PRECISION, X_REGISTERS)
    return acc0, acc1, acc2, acc3


@triton.jit
def slice_products_tma(x_desc, w_desc, first_row, first_col, k0, acc0, acc1, acc2, acc3,
                       BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       X_REGISTERS: tl.constexpr = False):
    """The products of K slice [k0, k0 + BLOCK_K) added to a pass's SPLIT_N accumulators, by TMA."""
    a = x_desc.load([first_row, k0])
    if X_REGISTERS:
        a = register_operand(a)
    acc0 = tl.dot(a, w_desc.load([first_col, k0]).T, acc0, input_precision=DOT_PRECISION)
    if SPLIT_N >= 2:
        acc1 = tl.dot(a, w_desc.load([first_col + BLOCK_N, k0]).T, acc1, input_precision=DOT_PRECISION)
    if SPLIT_N >= 4:
        acc2 = tl.dot(a, w_desc.load([first_col + 2 * BLOCK_N, k0]).T, acc2, input_precision=DOT_PRECISION)
        acc3 = tl.dot(a, w_desc.load([first_col + 3 * BLOCK_N, k0]).T, acc3, input_precision=DOT_PRECISION)
    return acc0, acc1, acc2, acc3


@triton.jit
def pass_accumulator(acc0, acc1, acc2, acc3, J: tl.constexpr):
    """Accumulator `J` of a pass (tile first_tile + J)."""
    if J == 0:
        acc = acc0
    elif J == 1:
        acc = acc1
    elif J == 2:
        acc = acc2
    else:
        acc = acc3
    return acc
