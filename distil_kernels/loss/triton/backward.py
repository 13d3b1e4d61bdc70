"""Backward kernel: recompute each logits tile, turn it into its gradient, push it through.

Program (m, n) rebuilds the tile z[m, n] with `tl.dot`, forms

    dL/du = (row_coef * exp(z - lse) - uniform - sum_j slot_coef_j [v == id_j]) * (1 - tanh^2)

(the coefficients come from the forward's per-row statistics, temperature and upstream
gradient folded in), and adds `du @ W[n]` to d_input[m] and `du^T @ x[m]` to d_weight[n]
one hidden-dim slice at a time, into fp32 accumulators. Those sums cross programs. By
default each slice is one relaxed fp32 `atomic_add` (a reduction in L2: no program waits
on another). In deterministic mode a slice is a read-modify-write under a ticket that
admits program (m, n) to d_input[m] only after (m, n - 1) and to d_weight[n] only after
(m - 1, n), a fixed summation order. Programs are dispatched in pid order and
`grouped_program` orders (m, n - 1) and (m - 1, n) before (m, n), so a program only
ever waits on programs that are already running.

The fp32 accumulators are bounded by `workspace_bytes` each (28 MiB by default, which
the H100's 50 MB L2 holds while the atomics land in it). The launcher walks the
vocabulary in chunks, one launch each: the d_weight accumulator is one chunk
[V_chunk, d], rounded into the weight-dtype gradient when its chunk is done, never a
[V, d] fp32 copy of the head. d_input sums over the whole vocabulary, so it stays fp32
[N, d] across those launches when that fits the budget too (one pass, 6 N V d FLOPs).
When it does not (N = 16384 at d = 4096 would take 256 MiB), d_input gets a pass of
its own over token chunks [N_chunk, d] and the whole vocabulary, and the vocabulary
chunks compute d_weight and d_bias only: a second recomputation of the logits
(8 N V d FLOPs), for 2 x `workspace_bytes` of fp32 state at any N.

With `filter_eps`, a tile whose largest softmax value (from the forward's per-block
maxima) is below it, and that holds no target id, is skipped without recomputing it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..options import LossOptions
from .configs import ACCUMULATOR_BYTES, ENABLE_FP_FUSION, TileConfig, select_config
from .lse_forward import ForwardStats
from .tiles import grouped_program, logits_tile


@dataclass(frozen=True)
class BackwardResult:
    d_input: Tensor | None
    d_weight: Tensor | None
    d_bias: Tensor | None
    skipped_tiles: Tensor  # [1] int32: tiles the filter skipped
    total_tiles: int  # tiles of every launch, over both passes
    passes: int  # 1, or 2 when d_input took a pass of its own


@dataclass(frozen=True)
class BackwardPlan:
    dx_rows: int  # token rows per d_input accumulator: N when it rides along with d_weight
    dw_rows: int  # vocabulary rows per d_weight accumulator
    separate_dx: bool  # d_input in a pass of its own over token chunks

    def fp32_workspace_bytes(self, d: int, need_dx: bool, need_dw: bool) -> int:
        return 4 * d * ((self.dx_rows if need_dx else 0) + (self.dw_rows if need_dw else 0))


@triton.jit
def _acquire(lock_ptr, ticket):
    while tl.atomic_add(lock_ptr, 0) != ticket:
        pass


@triton.jit
def _release(lock_ptr, ticket):
    tl.atomic_xchg(lock_ptr, ticket + 1)


@triton.jit
def _accumulate(ptrs, value, mask, lock_ptr, ticket, DETERMINISTIC: tl.constexpr):
    if DETERMINISTIC:
        _acquire(lock_ptr, ticket)
        # .cg reads L2, where the previous holder's stores landed, not a stale L1 line.
        current = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
        tl.store(ptrs, current + value, mask=mask)
        _release(lock_ptr, ticket)
    else:
        tl.atomic_add(ptrs, value, mask=mask, sem="relaxed")


@triton.jit
def _pass_ticket(lock_ptr, ticket, DETERMINISTIC: tl.constexpr):
    # A skipped tile still takes its turn, or the programs after it would wait forever.
    if DETERMINISTIC:
        _acquire(lock_ptr, ticket)
        _release(lock_ptr, ticket)


@triton.jit
def backward_kernel(
    # pointers: inputs
    x_ptr, w_ptr, b_ptr, ids_ptr, slot_coef_ptr, lse_ptr, row_coef_ptr, uniform_ptr, block_max_ptr,
    # pointers: fp32 accumulators, their tickets (deterministic mode), a count of skipped tiles
    dx_ptr, dw_ptr, db_ptr, lock_x_ptr, lock_w_ptr, lock_b_ptr, skipped_ptr,
    # sizes: this launch covers rows row_start .. row_start + N - 1 (x_ptr, ids_ptr,
    # slot_coef_ptr, lse_ptr, row_coef_ptr, uniform_ptr and dx_ptr point at the first) and
    # vocabulary ids col_start .. col_start + V - 1 (w_ptr, b_ptr, dw_ptr and db_ptr)
    N, V, D, K, row_start, col_start, num_m_blocks, num_tiles, num_d_slices,
    fwd_block_m, fwd_block_n, fwd_num_tiles,
    # strides (accumulators are contiguous [N, D] and [V, D])
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform and filter
    softcap, inv_temp, log_filter_eps,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,  # chain rule through c * tanh(u / c)
    HAS_UNIFORM: tl.constexpr,  # label smoothing subtracts eps / V from every logit's gradient
    NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
    FILTER: tl.constexpr,  # skip tiles below filter_eps
    DETERMINISTIC: tl.constexpr,  # ticket-ordered read-modify-writes: a fixed summation order
    DOT_PRECISION: tl.constexpr,
):
    pid_m, pid_n = grouped_program(tl.program_id(0), num_m_blocks, num_tiles, GROUP_M)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_m < N
    col_ok = offs_n < V
    # Padding rows get lse = +inf: their softmax is exactly 0.
    lse = tl.load(lse_ptr + offs_m, mask=row_ok, other=float("inf"))

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
        hits = pid_m * 0
        for j in range(0, K):
            # Ids outside this chunk (padding -1 too) land outside [0, V) and match no tile.
            ids_j = tl.load(ids_ptr + offs_m * K + j, mask=row_ok, other=-1) - col_start
            hits += tl.sum(((ids_j >= pid_n * BLOCK_N) & (ids_j < pid_n * BLOCK_N + BLOCK_N)).to(tl.int32), axis=0)
        skip = (tile_max - tl.min(lse, axis=0) < log_filter_eps) & (hits == 0)

    offs_k = tl.arange(0, BLOCK_K)
    if skip:
        tl.atomic_add(skipped_ptr, 1)
        for s in range(0, num_d_slices):
            if NEED_DX:
                _pass_ticket(lock_x_ptr + pid_m * num_d_slices + s, pid_n, DETERMINISTIC)
            if NEED_DW:
                _pass_ticket(lock_w_ptr + pid_n * num_d_slices + s, pid_m, DETERMINISTIC)
        if NEED_DB:
            _pass_ticket(lock_b_ptr + pid_n, pid_m, DETERMINISTIC)
    else:
        z, tanh = logits_tile(
            x_ptr, w_ptr, b_ptr, offs_m, offs_n, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
            softcap, inv_temp, BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION,
        )
        row_coef = tl.load(row_coef_ptr + offs_m, mask=row_ok, other=0.0)
        dz = tl.exp(z - lse[:, None]) * row_coef[:, None]
        if HAS_UNIFORM:
            dz -= tl.load(uniform_ptr + offs_m, mask=row_ok, other=0.0)[:, None]
        for j in range(0, K):
            ids_j = tl.load(ids_ptr + offs_m * K + j, mask=row_ok, other=-1) - col_start
            in_tile = (ids_j >= pid_n * BLOCK_N) & (ids_j < pid_n * BLOCK_N + BLOCK_N)
            # Most slots miss most tiles: test the block before touching the whole tile.
            if tl.max(in_tile.to(tl.int32), axis=0) > 0:
                coef_j = tl.load(slot_coef_ptr + offs_m * K + j, mask=row_ok, other=0.0)
                dz -= tl.where(offs_n[None, :] == ids_j[:, None], coef_j[:, None], 0.0)
        if HAS_SOFTCAP:
            dz *= 1.0 - tanh * tanh
        dz = tl.where(row_ok[:, None] & col_ok[None, :], dz, 0.0)
        du = dz.to(x_ptr.dtype.element_ty)
        if NEED_DB:
            _accumulate(db_ptr + offs_n, tl.sum(dz, axis=0), col_ok, lock_b_ptr + pid_n, pid_m, DETERMINISTIC)
        for s in range(0, num_d_slices):
            offs_d = s * BLOCK_K + offs_k
            d_ok = offs_d < D
            if NEED_DX:
                w = tl.load(w_ptr + offs_n[:, None] * stride_wv + offs_d[None, :] * stride_wd,
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                part = tl.dot(du, w, input_precision=DOT_PRECISION)
                _accumulate(dx_ptr + offs_m[:, None] * D + offs_d[None, :], part, row_ok[:, None] & d_ok[None, :],
                            lock_x_ptr + pid_m * num_d_slices + s, pid_n, DETERMINISTIC)
            if NEED_DW:
                xs = tl.load(x_ptr + offs_m[:, None] * stride_xn + offs_d[None, :] * stride_xd,
                             mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                part = tl.dot(tl.trans(du), xs, input_precision=DOT_PRECISION)
                _accumulate(dw_ptr + offs_n[:, None] * D + offs_d[None, :], part, col_ok[:, None] & d_ok[None, :],
                            lock_w_ptr + pid_n * num_d_slices + s, pid_m, DETERMINISTIC)


def separate_dx_pass(n: int, d: int, need_dx: bool, workspace_bytes: int | None) -> bool:
    """Whether d_input takes a pass of its own: its fp32 [N, d] exceeds the budget."""
    budget = ACCUMULATOR_BYTES if workspace_bytes is None else workspace_bytes
    return need_dx and n * 4 * max(d, 1) > budget


def _whole_tiles(rows: int, block: int, limit: int) -> int:
    return min(max(block, rows // block * block), triton.cdiv(limit, block) * block)


def plan_backward(n: int, v: int, d: int, need_dx: bool, dx_config: TileConfig, head_config: TileConfig,
                  workspace_bytes: int | None) -> BackwardPlan:
    """Chunk sizes of the fp32 accumulators: each within `workspace_bytes` (default 28 MiB).

    `dx_config` tiles d_input's own pass, `head_config` the vocabulary chunks (the
    one-pass config when d_input rides along). Chunks are whole tiles of their pass.
    """
    budget = ACCUMULATOR_BYTES if workspace_bytes is None else workspace_bytes
    rows = budget // (4 * max(d, 1))
    separate_dx = separate_dx_pass(n, d, need_dx, workspace_bytes)
    dx_rows = min(n, _whole_tiles(rows, dx_config.block_m, n)) if separate_dx else n
    return BackwardPlan(dx_rows, _whole_tiles(rows, head_config.block_n, v), separate_dx)


def backward(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, lse: Tensor, row_coef: Tensor,
             slot_coef: Tensor, uniform: Tensor | None, forward: ForwardStats, options: LossOptions,
             need: tuple[bool, bool, bool], configs: dict[str, TileConfig] | None = None) -> BackwardResult:
    """Gradients of the loss whose per-row coefficients are given (temperature folded in).

    d_input (input dtype), d_weight (weight dtype), d_bias (fp32), or None where `need`
    says so; accumulation is fp32 throughout. `configs` overrides the launch config of
    a pass kind ("backward": one pass; "backward_dx" and "backward_dw": two passes).
    """
    configs = dict(configs or {})
    n, d = x.shape
    v = weight.shape[0]
    need_dx, need_dw, need_db = need[0], need[1], need[2] and bias is not None
    separate_dx = separate_dx_pass(n, d, need_dx, options.workspace_bytes)

    def config_for(kind: str) -> TileConfig:
        if kind not in configs:
            configs[kind] = select_config(
                kind, x.dtype, (n, v, d), (bias is not None, tuple(need)),
                lambda c: backward(x, weight, bias, slot_ids, lse, row_coef, slot_coef, uniform, forward, options,
                                   need, {**configs, kind: c}),
            )
        return configs[kind]

    head_pass = need_dw or need_db or (need_dx and not separate_dx)
    dx_config = config_for("backward_dx") if separate_dx else None
    head_config = config_for("backward_dw" if separate_dx else "backward") if head_pass else None
    pass_configs = [c for c in (dx_config, head_config) if c is not None]
    if not pass_configs:
        return BackwardResult(None, None, None, torch.zeros(1, dtype=torch.int32, device=x.device), 0, 0)
    plan = plan_backward(n, v, d, need_dx, pass_configs[0], pass_configs[-1], options.workspace_bytes)
    k = slot_ids.shape[1]
    dev = x.device
    deterministic = torch.are_deterministic_algorithms_enabled()
    d_input = torch.empty_like(x) if need_dx else None
    # An fp32 head accumulates straight into its gradient; a bf16/fp16 one through an fp32 chunk.
    d_weight = None
    if need_dw:
        d_weight = torch.zeros_like(weight) if weight.dtype == torch.float32 else torch.empty_like(weight)
    db = torch.zeros(v, dtype=torch.float32, device=dev) if need_db else None
    dx_acc = torch.empty(plan.dx_rows, d, dtype=torch.float32, device=dev) if need_dx else None
    dw_acc = None
    if need_dw and weight.dtype != torch.float32:
        dw_acc = torch.empty(min(plan.dw_rows, v), d, dtype=torch.float32, device=dev)
    filter_eps = options.resolved_filter_eps(x.dtype)
    skipped = torch.zeros(1, dtype=torch.int32, device=dev)
    # Tickets of deterministic mode: one per (row block, d slice) and (vocabulary tile, d
    # slice) of a launch, for the finest tiles either pass uses.
    slices = max(triton.cdiv(d, c.block_k) for c in pass_configs)
    lock_x = torch.zeros(max(triton.cdiv(plan.dx_rows, c.block_m) for c in pass_configs) * slices,
                         dtype=torch.int32, device=dev)
    head_tiles = triton.cdiv(plan.dw_rows, pass_configs[-1].block_n)
    lock_w = torch.zeros(head_tiles * slices, dtype=torch.int32, device=dev)
    lock_b = torch.zeros(head_tiles, dtype=torch.int32, device=dev)
    ids, slot_coef, lse, row_coef = slot_ids.contiguous(), slot_coef.contiguous(), lse.contiguous(), \
        row_coef.contiguous()
    total_tiles = 0

    def launch(config: TileConfig, r0: int, r1: int, v0: int, v1: int, dx: Tensor | None, dw: Tensor | None,
               with_db: bool) -> None:
        """One launch over rows r0..r1 and vocabulary v0..v1 into the given accumulators."""
        nonlocal total_tiles
        num_m_blocks = triton.cdiv(r1 - r0, config.block_m)
        num_tiles = triton.cdiv(v1 - v0, config.block_n)
        num_d_slices = triton.cdiv(d, config.block_k)
        if deterministic:  # each launch's tickets start at 0
            for lock in (lock_x, lock_w, lock_b):
                lock.zero_()
        rows = slice(r0, r1)
        backward_kernel[(num_m_blocks * num_tiles,)](
            x[rows], weight[v0:v1], bias[v0:v1] if bias is not None else lse, ids[rows], slot_coef[rows],
            lse[rows], row_coef[rows], uniform[rows] if uniform is not None else lse, forward.block_max,
            dx if dx is not None else lse, dw if dw is not None else lse, db[v0:v1] if with_db else lse,
            lock_x, lock_w, lock_b, skipped,
            r1 - r0, v1 - v0, d, k, r0, v0, num_m_blocks, num_tiles, num_d_slices,
            forward.config.block_m, forward.config.block_n, forward.block_max.shape[1],
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            float(options.softcap or 1.0), 1.0 / options.temperature,
            math.log(filter_eps) if filter_eps else 0.0,
            BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, GROUP_M=config.group_m,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None, HAS_UNIFORM=uniform is not None,
            NEED_DX=dx is not None, NEED_DW=dw is not None, NEED_DB=with_db, FILTER=filter_eps is not None,
            DETERMINISTIC=deterministic,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
        total_tiles += num_m_blocks * num_tiles

    passes = 0
    if n > 0 and plan.separate_dx:
        passes += 1
        for r0 in range(0, n, plan.dx_rows):
            r1 = min(n, r0 + plan.dx_rows)
            launch(dx_config, r0, r1, 0, v, dx_acc[: r1 - r0].zero_(), None, False)
            d_input[r0:r1].copy_(dx_acc[: r1 - r0])
    if n > 0 and head_pass:
        passes += 1
        dx = None
        if need_dx and not plan.separate_dx:
            dx = dx_acc.zero_()
        for v0 in range(0, v, plan.dw_rows):
            v1 = min(v, v0 + plan.dw_rows)
            dw = None
            if need_dw:
                dw = d_weight[v0:v1] if dw_acc is None else dw_acc[: v1 - v0].zero_()
            launch(head_config, 0, n, v0, v1, dx, dw, need_db)
            if dw_acc is not None:
                d_weight[v0:v1].copy_(dw)
        if dx is not None:
            d_input.copy_(dx)
    if n == 0:
        if d_weight is not None:
            d_weight.zero_()
        if d_input is not None:
            d_input.zero_()
    return BackwardResult(d_input, d_weight, db, skipped, total_tiles, passes)
