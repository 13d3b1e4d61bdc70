"""Top-k kernels: the k most probable ids of each row, exactly, and its log-sum-exp.

Two kernels, one pass over the vocabulary each; the first does the work, the second is
its exact fallback.

Threshold pass (`threshold_kernel`). Logits strictly below a row's k-th largest can
never be in its top k, so a pass that knows a lower bound of the k-th largest only has
to emit the entries at or above it. The bound comes from a subset of the vocabulary:
every `step`-th row of W (a strided view, one GEMM of V / step columns). As the subset
is a sample of the vocabulary, about j * step logits of a row lie at or above the
subset's j-th largest, whatever the distribution (order statistics), and fewer than k
only with the probability that k - 1 trials of odds 1 / step hit the subset j times:
`subset_rank` takes the least j that makes this 1e-6: 17 for k = 64 and step 16, which
lets 272 entries of a row through where the subset's k-th largest let 1024 through,
and the tiles' emit rounds and the host's sort shrink with them. Program (m, s) takes
row block m through vocabulary split s, folds each tile into a running (max, sum-exp)
and takes the tile's entries at or above the bound, largest first, a round of row
maxima at a time (a quarter of an entry per row in a 128-column tile, on average), into
the (row, split)'s own list: no atomics, no sort, and only [BLOCK_M] vectors stored.
The host then orders each row's candidates with one `torch.topk` of int64 keys.

Exactness rests on neither the odds nor the bound's rounding. A row whose list holds at
least k entries holds every entry at or above its k-th largest (that value is at or
above the bound, so all of them were emitted); a row with fewer than k (a subset that
holds j of the row's k - 1 largest, or a subset GEMM that rounded its bound above
the pass's k-th value), more than fit a list, or a NaN or -inf among its entries is
redone by the second kernel.

Merge pass (`topk_kernel`). Each logits tile is turned into int64 keys that order
entries by (value descending, id ascending): the fp32 bits, flipped so that integer
order is float order, in the high word and 2**32 - 1 - id in the low word. Integer
comparisons then break ties to the lower id exactly, and one sort orders values and ids
together (`sort_rows`). Each row keeps its best K keys (k padded to a power of two,
K <= BLOCK_N) in registers, sorted ascending. A tile that can change them is sorted
descending and cut to its first K keys; the elementwise maximum of an ascending and a
descending sequence of K holds the K largest of their union (Batcher's half-cleaner),
which one more sort of K puts back in order. Each split stores its K best keys and
(max, sum-exp) per row; the host takes the top k of the num_splits * K keys of a row
and merges the log-sum-exp. Exact for any row, but the two int64 sorts per tile cost
several times the tile's matmul: on an H100 (bench/RESULTS.md, 2026-11-26) it took
7.3x the bare matmul at k=64, which is why it is only the fallback.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...loss.options import LossOptions
from ...loss.triton.lse_forward import merge_lse
from ...loss.triton.tiles import finish_logits, fold_lse, tile_products
from ...loss.triton.configs import ENABLE_FP_FUSION, kernel_operands, triton_version
from ..topk import Candidates
from .configs import MAX_TOPK, TileConfig, select_threshold_config, select_topk_config
from .splits import SplitPlan, merged_lse, plan_splits, split_range
from .wide_tiles import pass_accumulator, slice_products_tma, wide_products, zero_accumulators

# The key of a masked entry: below the key of every float, -inf and NaN included.
EMPTY_KEY = tl.constexpr(-(2**63))
# The finish kernel reads a row's k keys and its splits' partials: a warp a row.
FINISH_THRESHOLD_WARPS = 1


@triton.jit
def ordered_keys(z, ids):
    """int64 keys of fp32 values `z` at int64 `ids` (broadcast against `z`): larger key =
    (larger z, or equal z and lower id)."""
    bits = z.to(tl.int32, bitcast=True)
    # -0.0 equals +0.0, so both take +0.0's key and tie by id; NaN ranks above +inf,
    # as in a descending torch.sort.
    bits = tl.where(z == 0.0, 0, bits)
    bits = tl.where(z != z, 0x7FC00000, bits)
    # Negative floats order backwards as integers: flipping their magnitude bits fixes it.
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.to(tl.int64) << 32) | (0xFFFFFFFF - ids)


@triton.jit
def _compare_exchange(x, RUN_BIT: tl.constexpr, DESCENDING: tl.constexpr, M: tl.constexpr, N: tl.constexpr,
                      J: tl.constexpr, RUNS: tl.constexpr):
    """One bitonic step on the rows of `x` [M, N]: each column meets the one 2**J apart and
    keeps the min or the max. Runs of 2**RUN_BIT columns alternate ascending and
    descending by bit RUN_BIT of the column (RUNS), else all go the DESCENDING way."""
    G: tl.constexpr = N >> (J + 1)
    # [M, groups, the pair, 2**J]: partners lie along axis 2. Shapes are list literals:
    # Triton 3.2 and 3.3 compile no list arithmetic in a kernel.
    h = tl.reshape(x, [M, G, 2, 1 << J])
    # a + b - a = b holds in wrapping int64 arithmetic, so a sum finds the partner.
    partner = tl.sum(h, axis=2, keep_dims=True) - h
    right = tl.reshape(tl.arange(0, 2), [1, 1, 2, 1])
    if RUNS:
        # Bit RUN_BIT of column g 2**(J+1) + r 2**J + t is bit RUN_BIT - J - 1 of g.
        descending = tl.reshape((tl.arange(0, G) >> (RUN_BIT - J - 1)) & 1, [1, G, 1, 1]) ^ DESCENDING
    else:
        descending = DESCENDING
    return tl.reshape(tl.where((h > partner) != (right ^ descending), partner, h), [M, N])


@triton.jit
def sort_rows(x, DESCENDING: tl.constexpr):
    """Each row of int64 `x` [M, N] (N a power of two, at most 2048) sorted, by a bitonic network.

    The network of `tl.sort`, but partners are found by a sum over a size-2 axis instead
    of an xor: Triton's interpreter runs numpy sums at once but reductions with a custom
    combine element by element (seconds per tile, hours per test run), and the compiled
    code is the same shuffles. (`tl.sort` itself, under Triton 3.2, spilled 5-17 KB a
    thread in the merge kernel's tiles; this network none.)
    """
    M: tl.constexpr = x.shape[0]
    N: tl.constexpr = x.shape[1]
    # log2(N) from constexpr comparisons: Triton 3.2 wraps int(N) in a constexpr, which
    # has no bit_length.
    LOG_N: tl.constexpr = ((N > 1) + (N > 2) + (N > 4) + (N > 8) + (N > 16) + (N > 32) + (N > 64) + (N > 128)
                           + (N > 256) + (N > 512) + (N > 1024))
    tl.static_assert((N & (N - 1)) == 0, "sort_rows takes rows of a power of two entries")
    tl.static_assert(N <= 2048, "sort_rows takes rows of at most 2048 entries")
    for stage in tl.static_range(1, LOG_N + 1):
        # Stage s merges runs of 2**s, alternately ascending and descending (by bit s of
        # the column) until the last stage, which runs the requested way.
        for i in tl.static_range(stage):
            x = _compare_exchange(x, stage, DESCENDING, M, N, stage - 1 - i, stage < LOG_N)
    return x


@triton.jit
def empty_lse(BLOCK_M: tl.constexpr):
    """Running (max, sum-exp) of z and of the raw logits [BLOCK_M] before any tile."""
    return (tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_M,), dtype=tl.float32),
            tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32), tl.zeros((BLOCK_M,), dtype=tl.float32))


@triton.jit
def folded_tile(
    x_ptr, w_ptr, b_ptr, offs_m, tile, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd, softcap, inv_temp,
    run_max, run_sum, raw_max, raw_sum,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, RAW_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr = False,  # x_ptr and w_ptr are tensor descriptors (sm_90)
):
    """Logits tile `tile` (z, -inf past V), its ids and their mask, with the tile folded
    into the running (max, sum-exp) of z and, with RAW_LSE, of the raw logits."""
    offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    acc = tile_products(x_ptr, w_ptr, offs_m, offs_n, tl.program_id(0) * BLOCK_M, tile * BLOCK_N, N, V, D,
                        stride_xn, stride_xd, stride_wv, stride_wd, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION, USE_TMA)
    return folded_products(acc, tile, b_ptr, V, softcap, inv_temp, run_max, run_sum, raw_max, raw_sum,
                           BLOCK_N, HAS_BIAS, HAS_SOFTCAP, RAW_LSE)


@triton.jit
def folded_products(
    acc, tile, b_ptr, V, softcap, inv_temp, run_max, run_sum, raw_max, raw_sum,
    BLOCK_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RAW_LSE: tl.constexpr,
):
    """`folded_tile` of the tile's products `acc` = x W^T."""
    offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = offs_n < V
    z, tanh = finish_logits(acc, b_ptr, offs_n, col_ok, softcap, inv_temp, HAS_BIAS, HAS_SOFTCAP)
    z = tl.where(col_ok[None, :], z, float("-inf"))
    run_max, run_sum = fold_lse(run_max, run_sum, z)
    if RAW_LSE:
        raw = tanh * softcap if HAS_SOFTCAP else tanh
        raw_max, raw_sum = fold_lse(raw_max, raw_sum, tl.where(col_ok[None, :], raw, float("-inf")))
    return z, offs_n, col_ok, run_max, run_sum, raw_max, raw_sum


def skip_unbeaten_tiles() -> bool:
    """Whether the merge kernel skips the sorts of tiles that beat no row's K-th key. Not
    under Triton 3.3: its compiler crashes (a segmentation fault lowering to LLVM IR,
    3.3.1) on the sorts inside that data-dependent branch for 2 <= K < 64, so there every
    tile is sorted: the same result, more instructions."""
    return triton_version() != (3, 3)


@triton.jit
def topk_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr,
    keys_ptr,  # [N, num_splits, K] int64: each split's best keys per row
    part_ptr,  # [N, num_splits, 4] fp32: (max, sum-exp) of z, then of the raw logits
    # sizes
    N, V, D, tiles_per_split, longer_splits, num_splits,  # splits: `SplitPlan`
    # strides
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform
    softcap, inv_temp,
    # meta-parameters
    K: tl.constexpr,  # keys kept per row: k padded to a power of two, <= BLOCK_N
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,  # bias added in the tile
    HAS_SOFTCAP: tl.constexpr,  # c * tanh(u / c) applied in the tile
    RAW_LSE: tl.constexpr,  # truncated sampling at T != 1 also needs the lse at temperature 1
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: no silent TF32
    SKIP_UNBEATEN: tl.constexpr = True,  # `skip_unbeaten_tiles`
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64: offs_m * stride_xn passes 2**31 for N * d beyond 2G elements.
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    best = tl.full((BLOCK_M, K), EMPTY_KEY, dtype=tl.int64)  # ascending
    kth = tl.full((BLOCK_M,), EMPTY_KEY, dtype=tl.int64)  # best[:, 0]
    run_max, run_sum, raw_max, raw_sum = empty_lse(BLOCK_M)
    first_tile, last_tile = split_range(pid_s, tiles_per_split, longer_splits)
    for tile in range(first_tile, last_tile):
        z, offs_n, col_ok, run_max, run_sum, raw_max, raw_sum = folded_tile(
            x_ptr, w_ptr, b_ptr, offs_m, tile, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd, softcap,
            inv_temp, run_max, run_sum, raw_max, raw_sum,
            BLOCK_M, BLOCK_N, BLOCK_K, HAS_BIAS, HAS_SOFTCAP, RAW_LSE, DOT_PRECISION,
        )
        keys = ordered_keys(z, offs_n[None, :])
        keys = tl.where(row_ok[:, None] & col_ok[None, :], keys, EMPTY_KEY)
        # Two int64 sorts cost far more instructions than the keys: skip them when no
        # row's K-th key is beaten, as in most tiles once the running keys are filled.
        needed = 1
        if SKIP_UNBEATEN:
            needed = tl.max(tl.where(tl.max(keys, axis=1) > kth, 1, 0), axis=0)
        if needed > 0:
            top = sort_rows(keys, True)
            if K < BLOCK_N:
                # Chunks of a descending row: the first is the elementwise maximum of all.
                top = tl.max(tl.reshape(top, (BLOCK_M, BLOCK_N // K, K)), axis=1)
            best = sort_rows(tl.maximum(best, top), False)
            kth = tl.min(best, axis=1)
    out = offs_m * num_splits + pid_s
    offs_k = tl.arange(0, K)
    tl.store(keys_ptr + out[:, None] * K + offs_k[None, :], best, mask=row_ok[:, None])
    tl.store(part_ptr + out * 4, run_max, mask=row_ok)
    tl.store(part_ptr + out * 4 + 1, run_sum, mask=row_ok)
    if RAW_LSE:
        tl.store(part_ptr + out * 4 + 2, raw_max, mask=row_ok)
        tl.store(part_ptr + out * 4 + 3, raw_sum, mask=row_ok)


@triton.jit
def emit_hits(z, tile, bound, key_ptr, out, capacity, found, unsettled, BLOCK_N: tl.constexpr):
    """Append tile `tile`'s entries of `z` at or above each row's `bound` to the row's list
    at `key_ptr` + `out` * `capacity` (slots past `capacity` are counted, not stored).
    Returns the updated (found, unsettled) [BLOCK_M]."""
    cols = tl.arange(0, BLOCK_N)
    hit = z >= bound[:, None]
    left = tl.sum(hit.to(tl.int32), axis=1)
    hits = tl.where(hit, z, float("-inf"))
    # Take the hits a row at a time, largest first: a quarter of one per row in a
    # 128-wide tile, so two or three rounds of row maxima, and every store is a
    # [BLOCK_M] vector. A tile of addresses (an atomic slot per entry) would take
    # registers the matmul needs.
    while tl.max(left, axis=0) > 0:
        best, at = tl.max(hits, axis=1, return_indices=True, return_indices_tie_break_left=True)
        emit = left > 0
        # A -inf hit (a bound of -inf, from -inf biases) cannot be told from a taken
        # entry: such a row goes to the merge kernel too.
        unsettled |= (emit & (best == float("-inf"))).to(tl.int32)
        slot = out * capacity + found
        keep = emit & (found < capacity)
        # The key itself (one store, not a value and an id): the host sorts the lists
        # as they are, with no pass of its own to build keys.
        tl.store(key_ptr + slot, ordered_keys(best, (tile * BLOCK_N + at).to(tl.int64)), mask=keep)
        found += emit.to(tl.int32)
        left -= emit.to(tl.int32)
        hits = tl.where(cols[None, :] == at[:, None], float("-inf"), hits)
    return found, unsettled


@triton.jit
def threshold_pass(
    acc0, acc1, acc2, acc3, tile, b_ptr, V, num_tiles, softcap, inv_temp, bound, key_ptr, out, capacity, found,
    unsettled, run_max, run_sum, raw_max, raw_sum,
    BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    RAW_LSE: tl.constexpr,
):
    """Each of a pass's SPLIT_N tiles (the first `tile`, products `acc0` ..) in turn: folded
    into the running (max, sum-exp) and its hits emitted. Tiles past the vocabulary (in
    the last pass) are skipped: all -inf, they would fold and emit nothing."""
    for j in tl.static_range(SPLIT_N):
        if j == 0 or tile + j < num_tiles:
            z, _, _, run_max, run_sum, raw_max, raw_sum = folded_products(
                pass_accumulator(acc0, acc1, acc2, acc3, j), tile + j, b_ptr, V, softcap, inv_temp,
                run_max, run_sum, raw_max, raw_sum, BLOCK_N, HAS_BIAS, HAS_SOFTCAP, RAW_LSE,
            )
            found, unsettled = emit_hits(z, tile + j, bound, key_ptr, out, capacity, found, unsettled, BLOCK_N)
    return found, unsettled, run_max, run_sum, raw_max, raw_sum


@triton.jit
def threshold_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr,
    bound_ptr,  # [N] fp32: each row's bound (`subset_bounds`): entries at or above it are emitted
    count_ptr,  # [N, num_splits] int32: entries found per row and split (may pass `capacity`; -1: unsettled)
    key_ptr,  # [N, num_splits, capacity] int64: each row and split's candidates as `ordered_keys`
    part_ptr,  # [N, num_splits, 4] fp32: (max, sum-exp) of z, then of the raw logits
    # sizes: the vocabulary is num_tiles tiles of BLOCK_N, taken SPLIT_N at a time (a step);
    # splits of steps as `SplitPlan`
    N, V, D, num_tiles, steps_per_split, longer_splits, num_splits, capacity,
    # strides
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform
    softcap, inv_temp,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RAW_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,  # x_ptr and w_ptr are tensor descriptors (sm_90)
    FLAT: tl.constexpr = False,  # with USE_TMA: one loop over (pass, K slice)
    SPLIT_N: tl.constexpr = 1,  # adjacent tiles per pass over x (1 or 2): `wide_tiles`
    X_REGISTERS: tl.constexpr = False,  # with USE_TMA: each x slice from registers (`wide_tiles`)
):
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    # Rows past N get NaN, which no comparison passes: nothing of theirs is ever emitted.
    bound = tl.load(bound_ptr + offs_m, mask=row_ok, other=float("nan"))
    out = offs_m * num_splits + pid_s  # this program's (row, split) slot
    found = tl.zeros((BLOCK_M,), dtype=tl.int32)
    unsettled = tl.zeros((BLOCK_M,), dtype=tl.int32)
    run_max, run_sum, raw_max, raw_sum = empty_lse(BLOCK_M)
    first_step, last_step = split_range(pid_s, steps_per_split, longer_splits)
    if FLAT:
        # One loop over (pass, K slice), the epilogue in the branch of a pass's last slice:
        # the pipeliner issues the next pass's first slices before it, so the next pass's
        # products start on loaded operands instead of waiting out a load's latency.
        k_slices = tl.cdiv(D, BLOCK_K)
        acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
        for it in range(first_step * k_slices, last_step * k_slices):
            step = it // k_slices
            k0 = (it - step * k_slices) * BLOCK_K
            acc0, acc1, acc2, acc3 = slice_products_tma(x_ptr, w_ptr, pid_m * BLOCK_M, step * (SPLIT_N * BLOCK_N), k0,
                                                        acc0, acc1, acc2, acc3, BLOCK_N, SPLIT_N, DOT_PRECISION,
                                                        X_REGISTERS)
            if k0 + BLOCK_K >= D:
                found, unsettled, run_max, run_sum, raw_max, raw_sum = threshold_pass(
                    acc0, acc1, acc2, acc3, step * SPLIT_N, b_ptr, V, num_tiles, softcap, inv_temp, bound, key_ptr,
                    out, capacity, found, unsettled, run_max, run_sum, raw_max, raw_sum,
                    BLOCK_N, SPLIT_N, HAS_BIAS, HAS_SOFTCAP, RAW_LSE,
                )
                acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
    else:
        for step in range(first_step, last_step):
            acc0, acc1, acc2, acc3 = wide_products(
                x_ptr, w_ptr, offs_m, step * SPLIT_N, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
                BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_N, DOT_PRECISION, USE_TMA, X_REGISTERS,
            )
            found, unsettled, run_max, run_sum, raw_max, raw_sum = threshold_pass(
                acc0, acc1, acc2, acc3, step * SPLIT_N, b_ptr, V, num_tiles, softcap, inv_temp, bound, key_ptr, out,
                capacity, found, unsettled, run_max, run_sum, raw_max, raw_sum,
                BLOCK_N, SPLIT_N, HAS_BIAS, HAS_SOFTCAP, RAW_LSE,
            )
    tl.store(count_ptr + out, tl.where(unsettled > 0, -1, found), mask=row_ok)
    tl.store(part_ptr + out * 4, run_max, mask=row_ok)
    tl.store(part_ptr + out * 4 + 1, run_sum, mask=row_ok)
    if RAW_LSE:
        tl.store(part_ptr + out * 4 + 2, raw_max, mask=row_ok)
        tl.store(part_ptr + out * 4 + 3, raw_sum, mask=row_ok)


@triton.jit
def finish_threshold_kernel(
    top_ptr,  # [n, kk] int64: each row's largest keys (torch.topk of its lists), descending
    count_ptr,  # [n, num_splits] int32: each list's hits (-1 after a -inf hit)
    part_ptr,  # [n, num_splits, 4] fp32: (max, sum-exp) of z, then of the raw logits
    values_ptr, ids_ptr,  # [n, stride_out] fp32 / int64 out: the first kk of each row
    lse_ptr, lse_raw_ptr, settled_ptr,  # [n] out
    kk, k, num_splits, capacity, stride_out,
    RAW_LSE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Program `row` decodes its top keys into values and ids, merges its lse partials and
    says whether the threshold pass settled it: what took ~40 small torch ops a call.

    Settled: no -inf hit (count -1), no list past its capacity, k hits at or above the
    bound, and no NaN logit. NaN is no hit (no comparison passes), but it makes its row's
    sum of exponentials NaN and so its lse: the threshold kernel needs no NaN test.
    """
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_K)
    col_ok = cols < kk
    keys = tl.load(top_ptr + row * kk + cols, mask=col_ok, other=0)
    # `ordered_keys` undone: the low word holds 0xFFFFFFFF - id, the high word the value's order key.
    ordered = (keys >> 32).to(tl.int32)
    values = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True)
    tl.store(values_ptr + row * stride_out + cols, values, mask=col_ok)
    tl.store(ids_ptr + row * stride_out + cols, 0xFFFFFFFF - (keys & 0xFFFFFFFF), mask=col_ok)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    part = part_ptr + (row * num_splits + splits) * 4
    lse = merged_lse(tl.load(part, mask=split_ok, other=float("-inf")), tl.load(part + 1, mask=split_ok, other=0.0))
    tl.store(lse_ptr + row, lse)
    if RAW_LSE:
        tl.store(lse_raw_ptr + row, merged_lse(tl.load(part + 2, mask=split_ok, other=float("-inf")),
                                               tl.load(part + 3, mask=split_ok, other=0.0)))
    count = tl.load(count_ptr + row * num_splits + splits, mask=split_ok, other=0)
    settled = ((tl.min(count, axis=0) >= 0) & (tl.max(count, axis=0) <= capacity) & (tl.sum(count, axis=0) >= k)
               & (lse == lse))
    tl.store(settled_ptr + row, settled)


def encode_keys(z: Tensor, ids: Tensor) -> Tensor:
    """`ordered_keys` in torch ops, for fp32 `z` without NaN at int64 `ids` (broadcast)."""
    from ..sample import _order_keys

    return (_order_keys(z).to(torch.int64) << 32) | (0xFFFFFFFF - ids)


def decode_keys(keys: Tensor) -> tuple[Tensor, Tensor]:
    """(fp32 values, int64 ids) of keys made by `ordered_keys` or `encode_keys`."""
    ids = 0xFFFFFFFF - (keys & 0xFFFFFFFF)
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), ids


def padded_k(k: int) -> int:
    return triton.next_power_of_2(k)


def merged_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                raw_lse: bool = False, config: TileConfig | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(values z [N, k], ids [N, k], lse [N], raw lse [N] or None) by the merge kernel, exact for any row."""
    n, d = x.shape
    v = weight.shape[0]
    K = padded_k(k)
    if config is None:
        config = select_topk_config(x.dtype, K, n, v, lambda c: merged_topk(x, weight, bias, k, options, raw_lse, c))
    plan = plan_splits(n, v, config.block_m, config.block_n)
    dev = x.device
    keys = torch.empty(n, plan.num_splits, K, dtype=torch.int64, device=dev)
    part = torch.empty(n, plan.num_splits, 4, dtype=torch.float32, device=dev)
    if n > 0:
        topk_kernel[(plan.num_m_blocks, plan.num_splits)](
            x, weight, bias if bias is not None else x,
            keys, part,
            n, v, d, plan.tiles_per_split, plan.longer_splits, plan.num_splits,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            float(options.softcap or 1.0), 1.0 / options.temperature,
            K=K, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None, RAW_LSE=raw_lse,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SKIP_UNBEATEN=skip_unbeaten_tiles(),
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
    # Keys are distinct but for EMPTY_KEY, which ranks last and k <= V keeps it out.
    top = torch.topk(keys.view(n, plan.num_splits * K), k, dim=1).values
    values, ids = decode_keys(top)
    lse = merge_lse(part[..., 0], part[..., 1])
    lse_raw = merge_lse(part[..., 2], part[..., 3]) if raw_lse else None
    return values, ids, lse, lse_raw


# The bound comes from every SUBSET_STEP-th row of W: a GEMM over 1/16 of the head.
SUBSET_STEP = 16
# The odds that a row's count at or above the bound falls short of k (the row is then
# redone by the merge kernel, at several times the threshold pass's cost per row).
SHORT_COUNT_PROBABILITY = 1e-6
# Device memory of one launch's temporaries (the subset's logits, the candidate lists and
# their keys): rows are taken in groups that fit it.
CANDIDATE_BUDGET_BYTES = 256 << 20


def subset_step(vocab: int, k: int) -> int:
    """Stride of the vocabulary subset: at most SUBSET_STEP, and a subset of at least 2k ids."""
    return max(1, min(SUBSET_STEP, vocab // (2 * k)))


@functools.lru_cache(maxsize=None)
def subset_rank(k: int, step: int) -> int:
    """The rank j <= k of the subset's logit that bounds a row: the least j for which fewer
    than k of the row's logits lie at or above it with odds at most SHORT_COUNT_PROBABILITY.

    Each of the row's k - 1 largest logits is in the 1-in-`step` subset with odds
    1 / step, as if at random, and the count falls short of k exactly when j of them are:
    a binomial tail, summed from the top. A larger j lets more entries through (about
    j * step a row), each a candidate the kernel emits and the host sorts.
    """
    trials, p = k - 1, 1.0 / step
    if p >= 1.0:  # the subset is the vocabulary: its k-th largest is the row's
        return k
    log_p, log_q = math.log(p), math.log1p(-p)
    tail = 0.0  # P(Binomial(trials, p) >= j), for j from trials down
    for j in range(trials, 0, -1):
        log_pmf = math.lgamma(trials + 1) - math.lgamma(j + 1) - math.lgamma(trials - j + 1) + j * log_p
        tail += math.exp(log_pmf + (trials - j) * log_q)
        if tail > SHORT_COUNT_PROBABILITY:
            return j + 1
    return 1


def split_capacity(rank: int, step: int, split_columns: int, vocab: int) -> int:
    """Candidate list length of one (row, split) of `split_columns` vocabulary ids.

    A row's count at or above the `rank`-th largest of a 1-in-`step` sample has mean
    rank * step over the vocabulary, so rank * step * split_columns / V in a split. The
    bound's own randomness (an order statistic: a relative spread of about
    1 / sqrt(rank)) moves every split of the row together; given the bound, the split's
    count is about Poisson. Eight of the first and six of the second spreads, and a row
    past the capacity in any split goes to the merge kernel.
    """
    mean = rank * step * split_columns / vocab
    return min(split_columns, math.ceil(mean * (1 + 8 / math.sqrt(rank)) + 6 * math.sqrt(mean) + 8))


def subset_bounds(x: Tensor, weight: Tensor, bias: Tensor | None, rank: int, options: LossOptions,
                  step: int) -> Tensor:
    """[n] fp32: each row's `rank`-th largest z among the ids 0, step, 2 step, ..., lowered
    to stay at or below the kernel's own value of that logit.

    The GEMM runs in the input dtype (fp32 accumulation) and rounds to it, so the bound
    is lowered by a few ulps of bf16 before the monotone softcap and temperature; a row
    whose bound still lands above the kernel's own k-th value is caught by its count.
    """
    u = torch.mm(x, weight[::step].t())
    if bias is not None:
        u = u.float() + bias[::step]
    # Without a bias the selection runs on the GEMM's own rounded values: their order is
    # the fp32 copy's, and a 16-bit radix select takes half the passes over no extra copy
    # of the [n, V / step] block (on an H100 the fp32 selection's kernels took ~1.2 ms of
    # a 24 ms k=64 call at N=8192, bench/RESULTS.md).
    bound = torch.topk(u, rank, dim=1, sorted=False).values.amin(dim=1).float()
    bound = bound - (bound.abs() * 2.0**-7 + 2.0**-10)
    if options.softcap is not None:
        bound = options.softcap * torch.tanh(bound / options.softcap)
    return bound * (1.0 / options.temperature)


def candidate_lists(rows: int, vocab: int, k: int, step: int, config: TileConfig, capacity: int | None
                    ) -> tuple[SplitPlan, int]:
    """The split plan of a threshold launch over `rows` rows and the length of each (row,
    split)'s list (`capacity` when given)."""
    # Splits are cut in passes of split_n tiles: a pass never straddles two programs.
    plan = plan_splits(rows, vocab, config.block_m, config.block_n * config.split_n)
    if capacity is None:
        capacity = split_capacity(subset_rank(k, step), step, plan.most_tiles * config.block_n * config.split_n,
                                  vocab)
    return plan, capacity


def threshold_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                   raw_lse: bool, config: TileConfig, step: int, capacity: int | None,
                   out: tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]) -> None:
    """One group of rows into `out`: (values z [n, k], ids [n, k], lse [n], raw lse [n] or
    None, settled [n] bool), views of the call's outputs; the values and ids of a row that
    is not settled are meaningless."""
    n, d = x.shape
    v = weight.shape[0]
    dev = x.device
    bound = subset_bounds(x, weight, bias, subset_rank(k, step), options, step)
    plan, capacity = candidate_lists(n, v, k, step, config, capacity)
    count = torch.empty(n, plan.num_splits, dtype=torch.int32, device=dev)
    # Slots a list does not fill keep EMPTY_KEY, which sorts below every candidate.
    keys = torch.full((n, plan.num_splits * capacity), EMPTY_KEY.value, dtype=torch.int64, device=dev)
    part = torch.empty(n, plan.num_splits, 4, dtype=torch.float32, device=dev)
    x_arg, w_arg, use_tma = kernel_operands(x, weight, config)
    threshold_kernel[(plan.num_m_blocks, plan.num_splits)](
        x_arg, w_arg, bias if bias is not None else x,
        bound, count, keys, part,
        n, v, d, triton.cdiv(v, config.block_n), plan.tiles_per_split, plan.longer_splits, plan.num_splits, capacity,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        float(options.softcap or 1.0), 1.0 / options.temperature,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=options.softcap is not None, RAW_LSE=raw_lse,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
        FLAT=use_tma and config.flat, SPLIT_N=config.split_n, X_REGISTERS=use_tma and config.x_registers,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    top = torch.topk(keys, min(k, keys.shape[1]), dim=1).values
    values, ids, lse, lse_raw, settled = out
    finish_threshold_kernel[(n,)](
        top, count, part, values, ids, lse, lse_raw if raw_lse else lse, settled,
        top.shape[1], k, plan.num_splits, capacity, values.stride(0),
        RAW_LSE=raw_lse, BLOCK_K=triton.next_power_of_2(top.shape[1]), BLOCK_S=triton.next_power_of_2(plan.num_splits),
        num_warps=FINISH_THRESHOLD_WARPS, num_stages=1,
    )


def triton_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                raw_lse: bool = False, config: TileConfig | None = None, capacity: int | None = None,
                settle: bool = True) -> Candidates:
    """Top-k of 2-D `x` [N, d] (fp16, bf16 or fp32) against `weight` [V, d]; `bias` fp32 or None.

    The threshold pass with the merge kernel for the rows it cannot settle (with
    `settle=False` those rows are only flagged, in `Candidates.settled`); `capacity`
    overrides the candidate list length per (row, split) (tests use it to send rows to
    the fallback).
    k above `MAX_TOPK` (256) takes the chunked sweep: the fallback keeps each row's keys
    in registers, and more than 256 int64 keys per row next to the key tile would spill.
    """
    if k > MAX_TOPK:
        from ..topk import chunked_topk

        top = chunked_topk(x, weight, bias, k, options, raw_lse)
        lse_raw = None if top.lse_raw is None else top.lse_raw.float()
        return Candidates(top.ids, top.values.float(), top.lse.float(), lse_raw)
    n = x.shape[0]
    v = weight.shape[0]
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    step = subset_step(v, k)
    if config is None:
        plain = bias is None and options.softcap is None and not raw_lse
        config = select_threshold_config(
            x.dtype, n, v, x.device, lambda c: triton_topk(x, weight, bias, k, options, raw_lse, c, capacity, settle),
            plain)
    dev = x.device
    values = torch.empty(n, k, dtype=torch.float32, device=dev)
    ids = torch.empty(n, k, dtype=torch.int64, device=dev)
    lse = torch.empty(n, dtype=torch.float32, device=dev)
    lse_raw = torch.empty(n, dtype=torch.float32, device=dev) if raw_lse else None
    settled = torch.empty(n, dtype=torch.bool, device=dev)

    def row_bytes(rows: int) -> int:
        """A row's temporaries in a launch of `rows` rows: the subset's logits (input dtype,
        then fp32) and the lists' keys with torch.topk's copy."""
        plan, lists = candidate_lists(rows, v, k, step, config, capacity)
        return triton.cdiv(v, step) * (x.element_size() + 4) + plan.num_splits * lists * 16

    group = max(1, CANDIDATE_BUDGET_BYTES // row_bytes(n))
    if group < n:  # fewer rows a launch take more splits, so more list slots a row
        group = max(1, CANDIDATE_BUDGET_BYTES // row_bytes(group))
    for r0 in range(0, n, group):
        r1 = min(r0 + group, n)
        threshold_topk(x[r0:r1], weight, bias, k, options, raw_lse, config, step, capacity,
                       (values[r0:r1], ids[r0:r1], lse[r0:r1], None if lse_raw is None else lse_raw[r0:r1],
                        settled[r0:r1]))
    if not settle:
        return Candidates(ids, values, lse, lse_raw, settled)
    # The rows the threshold pass could not settle, found once for all groups: a host sync
    # per group would leave the GPU idle while the next group's launches are issued.
    redo = (~settled).nonzero()[:, 0]
    if redo.numel() > 0:
        values[redo], ids[redo], _, _ = merged_topk(x[redo], weight, bias, k, options)
    return Candidates(ids, values, lse, lse_raw)
