"""Backward: each logits tile recomputed and turned into its gradient; GEMMs push it through.

Program (m, n) of `logits_grad_kernel` rebuilds the tile z[m, n] with `tl.dot`, forms

    dL/du = (row_coef * exp(z - lse) - uniform - sum_j slot_coef_j [v == id_j]) * (1 - tanh^2)

(the coefficients come from the forward's per-row statistics, temperature and upstream
gradient folded in; the slot terms from a list of the (row, id, coefficient) entries
that fall in each tile, sorted once per backward) and stores it, rounded once to the
input dtype, into a gradient buffer [rows, cols] of bounded size. Two GEMMs (cuBLAS on a GPU, fp32 accumulation)
push each buffer through: d_weight[cols] = du^T x[rows] and d_input[rows] += du W[cols];
d_bias[cols] is its column sum in fp32.

Why the kernel does not add its tile's products into d_input and d_weight itself: their
rows span the whole hidden dimension (d = 4096 fp32 values), more than a program can
hold, so each tile would add 4 (BLOCK_M + BLOCK_N) d bytes of fp32 atomics, N V d / 16
bytes at 128 x 128 tiles: 560 GB for Qwen2.5-7B's head at N = 16384. That design ran at
26% of the H100's matmul rate (bench/RESULTS.md). The buffer costs 2 bytes a logit,
written once and read by GEMMs that run at the matmul rate, and no atomics: results do
not depend on scheduling, so deterministic mode needs nothing more.

`workspace_bytes` (56 MiB by default) bounds what the backward holds. d_weight[cols]
sums the gradient of every row, d_input[rows] that of every column, so one of the two
sums over chunks, in fp32. d_input's fp32 [N, d] rides along when it fits half the
budget: one pass over vocabulary chunks (6 N V d FLOPs with the forward's 2). When it
does not (N = 16384 at d = 4096 takes 256 MiB), a 16-bit d_input's fp32 sum still rides
along, in the gradient outputs themselves: its first d/2 columns in the last N rows of
d_weight (N d 2 bytes, not yet written), the other d/2 in d_input's own N d 2 bytes.
Those N rows of d_weight wait until the sum has been rounded into d_input, and then
recompute their logits: 2 N^2 d FLOPs more (6% of the pass on Llama-3-8B's head at
N = 8192), where the pass it replaces recomputed all 2 N V d. Otherwise (d_input
alone, fp32, N > V, or d not a multiple of 16), d_input gets a pass of its own over
token chunks, each with an fp32 [rows, d] accumulator and gradient blocks that take
the other half: a second recomputation of the logits (10 N V d FLOPs) for bounded
memory at any N. Likewise d_weight sums token chunks in an fp32 [cols, d] accumulator
when N rows of a vocabulary chunk would not fit (or to undo fp16's scaling, below).

fp16: the gradient of a mean over many rows is subnormal in fp16, so it is written
times a power of two (`gemm.gradient_scale`) that its GEMMs' fp32 products take back.

With `filter_eps`, a tile whose largest softmax value (from the forward's per-block
maxima) is below it, and that holds no target id, is written as zeros without
recomputing it; with label smoothing only while its eps / V is below filter_eps too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..gemm import addmm_fp32, gradient_scale
from ..options import LossOptions
from .configs import (BACKWARD_WORKSPACE_BYTES, ENABLE_FP_FUSION, TileConfig, kernel_operands, select_config,
                      tensor_descriptors)
from .lse_forward import ForwardStats, head_kind
from .tiles import grouped_program, logits_tile


@dataclass(frozen=True)
class BackwardResult:
    d_input: Tensor | None
    d_weight: Tensor | None
    d_bias: Tensor | None
    skipped_tiles: Tensor  # [1] int32: tiles the filter skipped
    total_tiles: int  # tiles of every launch, over both passes
    passes: int  # 1, or 2 when d_input took a pass of its own
    deferred_cols: int = 0  # vocabulary ids whose d_weight waited for d_input's sum (recomputed)


@triton.jit
def logits_grad_kernel(
    # pointers: inputs, then the gradient buffer and a count of skipped tiles
    x_ptr, w_ptr, b_ptr, lse_ptr, row_coef_ptr, uniform_ptr, block_max_ptr,
    # the slot corrections by tile (`SlotCorrections`): [tiles + 1] offsets into
    # [entries] rows, ids and coefficients
    entry_offset_ptr, entry_row_ptr, entry_id_ptr, entry_coef_ptr,
    grad_ptr, skipped_ptr,
    # sizes: this launch covers rows row_start .. row_start + N - 1 (x_ptr, lse_ptr,
    # row_coef_ptr and uniform_ptr point at the first) and vocabulary ids col_start ..
    # col_start + V - 1 (w_ptr and b_ptr), both on tile boundaries; grad_ptr is [N, V]
    N, V, D, row_start, col_start, num_m_blocks, num_tiles, entry_tiles,
    fwd_block_m, fwd_block_n, fwd_num_tiles,
    stride_xn, stride_xd, stride_wv, stride_wd, stride_gn,
    # logits transform and filter
    softcap, inv_temp, log_filter_eps,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,  # chain rule through c * tanh(u / c)
    HAS_UNIFORM: tl.constexpr,  # label smoothing subtracts eps / V from every logit's gradient
    FILTER: tl.constexpr,  # skip tiles below filter_eps
    DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # x_ptr, w_ptr and grad_ptr are tensor descriptors (sm_90)
):
    pid_m, pid_n = grouped_program(tl.program_id(0), num_m_blocks, num_tiles, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    col_ok = offs_n < V
    # Padding rows get lse = +inf: their softmax is exactly 0.
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))

    # This tile's slot corrections: the (row, id, coefficient) entries of its tile of the
    # whole [N, V] grid, listed once for the backward.
    entry_offsets = entry_offset_ptr + (row_start // BLOCK_M + pid_m) * entry_tiles + col_start // BLOCK_N + pid_n

    skip = pid_m < 0
    if FILTER:
        # The forward's per-block maxima may be coarser than this tile: take every
        # forward block this tile overlaps (an upper bound, so a skip is always safe).
        fm_first = (row_start + pid_m * BLOCK_M) // fwd_block_m
        fm_last = (row_start + tl.minimum(pid_m * BLOCK_M + BLOCK_M, N) - 1) // fwd_block_m
        fn_first = (col_start + pid_n * BLOCK_N) // fwd_block_n
        fn_last = (col_start + tl.minimum(pid_n * BLOCK_N + BLOCK_N, V) - 1) // fwd_block_n
        tile_max = tl.load(block_max_ptr + fm_first * fwd_num_tiles + fn_first)
        for fm in range(fm_first, fm_last + 1):
            for fn in range(fn_first, fn_last + 1):
                tile_max = tl.maximum(tile_max, tl.load(block_max_ptr + fm * fwd_num_tiles + fn))
        no_entries = tl.load(entry_offsets + 1) == tl.load(entry_offsets)
        skip = (tile_max - tl.min(lse, axis=0) < log_filter_eps) & no_entries

    # The store's addresses and mask are formed only once the tile is done: held through
    # the dot loop they would take 128 registers a thread (64-bit addresses of 64 entries).
    if skip:
        tl.atomic_add(skipped_ptr, 1)
        store_gradient(grad_ptr, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), pid_m, pid_n, offs_m, offs_n,
                       row_ok, col_ok, stride_gn, BLOCK_M, BLOCK_N, USE_TMA)
    else:
        z, slope = logits_tile(
            x_ptr, w_ptr, b_ptr, offs_m, offs_n, pid_m * BLOCK_M, pid_n * BLOCK_N, N, V, D,
            stride_xn, stride_xd, stride_wv, stride_wd, softcap, inv_temp,
            BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, USE_TMA, SOFTCAP_SLOPE=True,
        )
        row_coef = tl.load(row_coef_ptr + offs_m, mask=row_ok, other=0.0)
        dz = tl.exp(z - lse[:, None]) * row_coef[:, None]
        if HAS_UNIFORM:
            dz -= tl.load(uniform_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
        # A few entries a tile (K per row spread over the vocabulary), each a scalar that
        # every thread reads alike. Searching the tile's rows slot by slot instead takes a
        # load and a cross-warp reduction per slot, by estimate ~500 cycles each: a third
        # of a 128x128 tile's matmul at d=3584 for K=32. Each entry's three loads are
        # issued one entry ahead: the block holds its SM alone, so a load's latency from
        # L2 (hundreds of cycles) would otherwise stall every warp once per entry.
        first, end = tl.load(entry_offsets), tl.load(entry_offsets + 1)
        entry_row, entry_col, entry_coef = load_entry(entry_row_ptr, entry_id_ptr, entry_coef_ptr, first, end)
        for e in range(first, end):
            coef = tl.where(offs_m == entry_row - row_start, entry_coef, 0.0)
            dz -= tl.where(offs_n[None, :] == entry_col - col_start, coef[:, None], 0.0)
            entry_row, entry_col, entry_coef = load_entry(entry_row_ptr, entry_id_ptr, entry_coef_ptr, e + 1, end)
        if HAS_SOFTCAP:
            dz *= slope  # 1 - tanh^2, from the tile: near saturation a rounded tanh leaves only noise
        store_gradient(grad_ptr, dz, pid_m, pid_n, offs_m, offs_n, row_ok, col_ok, stride_gn, BLOCK_M, BLOCK_N,
                       USE_TMA)


@triton.jit
def load_entry(entry_row_ptr, entry_id_ptr, entry_coef_ptr, e, end):
    """Slot-correction entry `e` (row, id, coefficient); nothing is read at or past `end`."""
    present = e < end
    return (tl.load(entry_row_ptr + e, mask=present, other=0), tl.load(entry_id_ptr + e, mask=present, other=0),
            tl.load(entry_coef_ptr + e, mask=present, other=0.0))


@triton.jit
def store_gradient(grad_ptr, dz, pid_m, pid_n, offs_m, offs_n, row_ok, col_ok, stride_gn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_TMA: tl.constexpr):
    """The tile's dL/du, rounded to the buffer's dtype; a descriptor's store clips at its edges."""
    if USE_TMA:
        grad_ptr.store([pid_m * BLOCK_M, pid_n * BLOCK_N], dz.to(grad_ptr.dtype))
    else:
        tl.store(grad_ptr + offs_m[:, None] * stride_gn + offs_n[None, :], dz.to(grad_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])


@dataclass(frozen=True)
class SlotCorrections:
    """Every row's slot corrections (id, coefficient), listed by tile of the [N, V] grid.

    Entries of tile t (row block t // tiles, vocabulary tile t % tiles) are offsets[t] ..
    offsets[t + 1] - 1, in row order and, within a row, slot order (so repeated ids of a
    row subtract in a fixed order). Built once a backward: a stable sort of N K keys.
    """

    offsets: Tensor  # [row blocks * tiles + 1] int32
    rows: Tensor  # [N K] int32
    ids: Tensor  # [N K] int32
    coefs: Tensor  # [N K] fp32
    tiles: int  # vocabulary tiles a row block spans


def slot_corrections(slot_ids: Tensor, slot_coef: Tensor, vocab: int, config: TileConfig) -> SlotCorrections:
    n, k = slot_ids.shape
    tiles = triton.cdiv(vocab, config.block_n)
    cells = triton.cdiv(max(n, 1), config.block_m) * tiles
    rows = torch.arange(n, device=slot_ids.device).repeat_interleave(k)
    ids = slot_ids.reshape(-1)
    order = torch.sort((rows // config.block_m) * tiles + ids // config.block_n, stable=True)
    offsets = torch.searchsorted(order.values, torch.arange(cells + 1, device=slot_ids.device))
    return SlotCorrections(offsets.to(torch.int32), rows[order.indices].to(torch.int32),
                           ids[order.indices].to(torch.int32), slot_coef.reshape(-1)[order.indices].float(), tiles)


# --------------------------------------------------------------------------------------
# Plan
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BackwardPlan:
    head_rows: int  # token rows per gradient buffer of the vocabulary pass (>= N: all of them)
    head_cols: int  # vocabulary columns per chunk of the vocabulary pass
    dw_accumulator: bool  # d_weight sums its token chunks (or fp16's scaled products) in fp32
    dx_rides_along: bool  # d_input's fp32 [N, d] accumulates in the vocabulary pass
    dx_rows: int  # token rows per chunk of d_input's own pass (0: no such pass)
    dx_cols: int  # vocabulary columns per gradient block of d_input's own pass
    # d_input's fp32 sum lives in the gradient outputs (d_weight's rows from `dw_deferred_from`
    # on, written after it, and d_input), not in the workspace
    dx_in_outputs: bool = False
    dw_deferred_from: int = 0  # first vocabulary id (a tile boundary) whose d_weight waits

    def workspace_bytes(self, n: int, d: int, itemsize: int) -> int:
        """The most the backward holds at once: gradient buffers and fp32 accumulators."""
        head = itemsize * min(self.head_rows, n) * self.head_cols
        head += 4 * self.head_cols * d if self.dw_accumulator else 0
        head += 4 * n * d if self.dx_rides_along and not self.dx_in_outputs else 0
        dx = (4 * d + itemsize * self.dx_cols) * self.dx_rows
        return max(head, dx)


def _whole_tiles(count: int, block: int, limit: int) -> int:
    """`count` rounded down to whole tiles, at least one, at most the tiles covering `limit`."""
    return min(max(block, count // block * block), triton.cdiv(max(limit, 1), block) * block)


def plan_backward(n: int, v: int, d: int, dtype: torch.dtype, need: tuple[bool, bool, bool], config: TileConfig,
                  workspace_bytes: int | None) -> BackwardPlan:
    """Chunks within `workspace_bytes` (default 56 MiB), whole tiles of `config` each.

    `need`: (d_input, d_weight, d_bias). A chunk is at least one tile, so a budget
    smaller than one tile's buffers is exceeded by that much.
    """
    need_dx, need_dw, need_db = need
    budget = BACKWARD_WORKSPACE_BYTES if workspace_bytes is None else workspace_bytes
    itemsize = dtype.itemsize
    dx_rides_along = need_dx and 4 * n * d <= budget // 2
    # The fp32 [N, d] sum as two [N, d/2] halves, each the bytes of N 16-bit rows of d:
    # d_weight's last N rows and d_input. d a multiple of 16 keeps the halves' columns
    # and the rows after d_weight's deferred ones 16-byte aligned for the GEMMs.
    dx_in_outputs = (need_dx and need_dw and not dx_rides_along and itemsize == 2 and d % 16 == 0
                     and 0 < n <= v)
    dx_rides_along = dx_rides_along or dx_in_outputs
    head_rows = head_cols = dx_rows = dx_cols = 0
    dw_accumulator = False
    if need_dw or need_db or dx_rides_along:
        head_budget = budget - (4 * n * d if dx_rides_along and not dx_in_outputs else 0)
        # fp16's scaled gradient needs its product in fp32 before the scale comes off.
        scaled = need_dw and dtype == torch.float16
        per_col = itemsize * n + (4 * d if scaled else 0)
        head_rows, head_cols = n, head_budget // max(per_col, 1)
        dw_accumulator = scaled
        if head_cols < config.block_n:
            # N rows of one tile's columns exceed the budget: token chunks too, d_weight
            # summing them in fp32 within half of it.
            head_cols = _whole_tiles(head_budget // 2 // (4 * max(d, 1)), config.block_n, v)
            head_rows = _whole_tiles((head_budget - 4 * d * head_cols) // (itemsize * head_cols), config.block_m, n)
            dw_accumulator = need_dw
        head_cols = _whole_tiles(head_cols, config.block_n, v)
        head_rows = max(head_rows, 1)
    if need_dx and not dx_rides_along:
        dx_rows = _whole_tiles(budget // 2 // (4 * max(d, 1)), config.block_m, n)
        dx_cols = _whole_tiles(budget // 2 // (itemsize * dx_rows), config.block_n, v)
    deferred_from = (v - n) // config.block_n * config.block_n if dx_in_outputs else v
    return BackwardPlan(head_rows, head_cols, dw_accumulator, dx_rides_along, dx_rows, dx_cols, dx_in_outputs,
                        deferred_from)


# --------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------


def backward(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, lse: Tensor, row_coef: Tensor,
             slot_coef: Tensor, uniform: Tensor | None, forward: ForwardStats, options: LossOptions,
             need: tuple[bool, bool, bool], config: TileConfig | None = None) -> BackwardResult:
    """Gradients of the loss whose per-row coefficients are given (temperature folded in).

    d_input (input dtype), d_weight (weight dtype), d_bias (fp32), or None where `need`
    says so; every sum is fp32. `config` overrides the gradient kernel's launch config.
    """
    n, d = x.shape
    v = weight.shape[0]
    need = (need[0], need[1], need[2] and bias is not None)
    need_dx, need_dw, need_db = need
    dev = x.device
    skipped = torch.zeros(1, dtype=torch.int32, device=dev)
    if not any(need):
        return BackwardResult(None, None, None, skipped, 0, 0)
    if config is None:
        kind = "gradient"
        if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9:
            kind = "gradient_plain_sm90" if head_kind(bias, options) == "plain" else "gradient_sm90"
        config = select_config(
            kind, x.dtype, (n, v, d), (bias is not None, need),
            lambda c: backward(x, weight, bias, slot_ids, lse, row_coef, slot_coef, uniform, forward, options,
                               need, c),
        )
    plan = plan_backward(n, v, d, x.dtype, need, config, options.workspace_bytes)
    scale = gradient_scale(x.dtype, row_coef, slot_coef, uniform)
    inv_scale = 1.0 / scale
    row_coef = (row_coef * scale).float().contiguous()
    corrections = slot_corrections(slot_ids, slot_coef * scale, v, config)
    uniform = None if uniform is None else (uniform * scale).float().contiguous()
    lse = lse.contiguous()
    filter_eps = options.resolved_filter_eps(x.dtype)
    if filter_eps is not None and uniform is not None and options.label_smoothing / v >= filter_eps:
        # A skipped tile is written as zeros, dropping label smoothing's eps / V on each of its
        # logits along with the softmax values: a drop filter_eps allows only below it.
        filter_eps = None
    # Contiguous whatever the inputs' strides: each vocabulary chunk of d_weight is one
    # GEMM's output, and d_input may hold half of its own fp32 sum.
    d_input = torch.empty(x.shape, dtype=x.dtype, device=dev) if need_dx else None
    d_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_dw else None
    d_bias = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    total_tiles = 0

    def gradient_block(buffer: Tensor, r0: int, r1: int, v0: int, v1: int) -> Tensor:
        """dL/du of rows r0..r1 and vocabulary ids v0..v1: the top-left corner of `buffer`.

        A narrower last chunk keeps the buffer's row stride (whole tiles, a multiple of
        16 elements): the kernel's stores and the GEMMs' loads stay aligned.
        """
        nonlocal total_tiles
        grad = buffer[: r1 - r0, : v1 - v0]
        num_m_blocks = triton.cdiv(r1 - r0, config.block_m)
        num_tiles = triton.cdiv(v1 - v0, config.block_n)
        rows = slice(r0, r1)
        x_arg, w_arg, use_tma = kernel_operands(x[rows], weight[v0:v1], config)
        # The buffer's rows are whole tiles of columns: TMA can address it whenever x and W.
        grad_arg = tensor_descriptors().from_tensor(grad, [config.block_m, config.block_n]) if use_tma else grad
        logits_grad_kernel[(num_m_blocks * num_tiles,)](
            x_arg, w_arg, bias[v0:v1] if bias is not None else lse, lse[rows], row_coef[rows],
            uniform[rows] if uniform is not None else lse, forward.block_max,
            corrections.offsets, corrections.rows, corrections.ids, corrections.coefs,
            grad_arg, skipped,
            r1 - r0, v1 - v0, d, r0, v0, num_m_blocks, num_tiles, corrections.tiles,
            forward.config.block_m, forward.config.block_n, forward.block_max.shape[1],
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), grad.stride(0),
            float(options.softcap or 1.0), 1.0 / options.temperature,
            math.log(filter_eps) if filter_eps else 0.0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None, HAS_UNIFORM=uniform is not None,
            FILTER=filter_eps is not None,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
        total_tiles += num_m_blocks * num_tiles
        return grad

    passes = 0
    deferred_cols = 0
    if n > 0 and plan.dx_in_outputs:
        passes += 1
        deferred_cols = v - plan.dw_deferred_from
        half = d // 2
        # Both halves are written (beta = 0) by the first chunk's GEMMs before anything reads them.
        dx_low = d_weight[v - n:].view(torch.float32)
        dx_high = d_input.view(torch.float32)
        _vocabulary_pass(x, weight, plan, inv_scale, gradient_block, ((dx_low, slice(0, half)),
                                                                       (dx_high, slice(half, d))),
                         d_weight, d_bias, dw_end=plan.dw_deferred_from)
        _round_split_sum(dx_low, dx_high, d_input, plan)
        _vocabulary_pass(x, weight, plan, inv_scale, gradient_block, (), d_weight, None,
                         first_col=plan.dw_deferred_from)
    elif n > 0 and plan.head_cols > 0:
        passes += 1
        dx_acc = torch.empty(n, d, dtype=torch.float32, device=dev) if need_dx and plan.dx_rides_along else None
        _vocabulary_pass(x, weight, plan, inv_scale, gradient_block, () if dx_acc is None else ((dx_acc, slice(None)),),
                         d_weight, d_bias)
        if dx_acc is not None:
            d_input.copy_(dx_acc)
    if n > 0 and plan.dx_rows > 0:
        passes += 1
        _input_pass(x, weight, plan, inv_scale, gradient_block, d_input)
    if n == 0:
        for grad in (d_input, d_weight):
            if grad is not None:
                grad.zero_()
    return BackwardResult(d_input, d_weight, d_bias, skipped, total_tiles, passes, deferred_cols)


def _vocabulary_pass(x: Tensor, weight: Tensor, plan: BackwardPlan, inv_scale: float, gradient_block,
                     dx_parts: tuple[tuple[Tensor, slice], ...], d_weight: Tensor | None, d_bias: Tensor | None,
                     first_col: int = 0, dw_end: int | None = None) -> None:
    """Vocabulary chunks from id `first_col` (a tile boundary) on, token chunks within each:
    d_bias; d_weight of the ids below `dw_end`; and d_input's fp32 sum when it rides along,
    each (accumulator, columns of d) of `dx_parts` taking du @ W[chunk, columns]."""
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    dw_end = v if dw_end is None else dw_end
    rows = min(plan.head_rows, n)
    buffer = torch.empty(rows, plan.head_cols, dtype=x.dtype, device=dev)
    dw_acc = None
    if d_weight is not None and plan.dw_accumulator:
        dw_acc = torch.empty(plan.head_cols, d, dtype=torch.float32, device=dev)
    for v0 in range(first_col, v, plan.head_cols):
        v1 = min(v, v0 + plan.head_cols)
        dw_cols = max(0, min(v1, dw_end) - v0) if d_weight is not None else 0
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            grad = gradient_block(buffer, r0, r1, v0, v1)
            if d_bias is not None:
                # From the same rounded gradient the weight's GEMM reads (a bias is a weight
                # column against a constant 1 input), summed in fp32.
                d_bias[v0:v1].add_(grad.sum(dim=0, dtype=torch.float32), alpha=inv_scale)
            if dw_cols:
                if dw_acc is None:  # every row in one buffer, unscaled: one GEMM, rounded once
                    torch.mm(grad[:, :dw_cols].T, x[r0:r1], out=d_weight[v0:v0 + dw_cols])
                else:
                    addmm_fp32(dw_acc[:dw_cols], grad[:, :dw_cols].T, x[r0:r1], inv_scale, 0.0 if r0 == 0 else 1.0)
            for acc, columns in dx_parts:
                addmm_fp32(acc[r0:r1], grad, weight[v0:v1, columns], inv_scale, 0.0 if v0 == first_col else 1.0)
        if dw_acc is not None and dw_cols:
            d_weight[v0:v0 + dw_cols].copy_(dw_acc[:dw_cols])


def _round_split_sum(dx_low: Tensor, dx_high: Tensor, d_input: Tensor, plan: BackwardPlan) -> None:
    """d_input = [dx_low | dx_high] rounded to its dtype, where dx_high is d_input's own bytes.

    Row r of dx_high is exactly the bytes of row r of d_input, so each block of rows has
    its high half copied out (rounded) before either half is written over it.
    """
    n, d = d_input.shape
    half = d // 2
    itemsize = d_input.element_size()
    rows = max(1, min(n, plan.workspace_bytes(n, d, itemsize) // (itemsize * half)))
    high = torch.empty(rows, half, dtype=d_input.dtype, device=d_input.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        high[: r1 - r0].copy_(dx_high[r0:r1])
        d_input[r0:r1, :half].copy_(dx_low[r0:r1])
        d_input[r0:r1, half:].copy_(high[: r1 - r0])


def _input_pass(x: Tensor, weight: Tensor, plan: BackwardPlan, inv_scale: float, gradient_block,
                d_input: Tensor) -> None:
    """Token chunks, each summing the gradient blocks of the whole vocabulary into fp32."""
    n, d = x.shape
    v = weight.shape[0]
    rows = min(plan.dx_rows, n)
    buffer = torch.empty(rows, plan.dx_cols, dtype=x.dtype, device=x.device)
    dx_acc = torch.empty(rows, d, dtype=torch.float32, device=x.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        acc = dx_acc[: r1 - r0]
        for v0 in range(0, v, plan.dx_cols):
            v1 = min(v, v0 + plan.dx_cols)
            addmm_fp32(acc, gradient_block(buffer, r0, r1, v0, v1), weight[v0:v1], inv_scale,
                       0.0 if v0 == 0 else 1.0)
        d_input[r0:r1].copy_(acc)
