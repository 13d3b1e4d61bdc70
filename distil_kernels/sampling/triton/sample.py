"""Gumbel-max sample kernel: untruncated or greedy draws without the [B, V] logits.

Program (m, s, j) takes row block m through vocabulary split s for samples
SAMPLES*j .. SAMPLES*(j+1)-1, SPLIT_N adjacent tiles per pass over the rows' hidden
states (`wide_products`). Each logits tile is computed once and serves all of the
program's samples (`sample_tile`): its raw logits and z = raw / T are folded into running (max,
sum-exp) pairs (one pair at T = 1, where z is the raw logit), and for each sample the
Philox noise of the tile is added to z and the tile's argmax (ties to the lower id)
competes with the sample's running best.

The noise is the torch backend's stream (sampling/sample.py): id v of sample n takes
word v % 4 of Philox4x32-10 keyed by the row's seed at counter (v // 4, position low
word, n, position high word), so one `tl.philox` call on [BLOCK_M, BLOCK_N / 4] groups
gives the whole tile; its four words are interleaved back into id order. The transform
to g = -log(-log(u)) is the torch backend's, taken in fp32 where that backend takes the
inner log in float64 (`gumbel_from_words`: the same E to a few ulps, and g to a few
ulps of its magnitude), so both backends draw the same ids unless two scores tie to
within the last bits of their math.

Each split stores its best (score, id) per row and sample and its partials;
`finish_draws_kernel` keeps the best split per sample (the earlier split on equal
scores, as its ids are lower), merges the log-sum-exps, recomputes each drawn id's logit
(one dot of length d) and writes the Sample.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

try:
    from triton.language.extra import libdevice
except ImportError:  # Triton builds without the dispatching module (some containers')
    from triton.language.extra.cuda import libdevice

from ...loss.triton.tiles import finish_logits, fold_lse
from ..sample import Sample, SamplingOptions
from ...loss.triton.configs import ENABLE_FP_FUSION, interpreting, kernel_operands
from .configs import SAMPLES_PER_PROGRAM, TileConfig, select_sample_config
from .splits import merged_lse, plan_splits, split_range
from .wide_tiles import pass_accumulator, slice_products_tma, wide_products, zero_accumulators

# The finish kernel's dot of a drawn id's logit: 512 of d a step over 4 warps (4 entries
# a thread), so a 3584-wide head takes 7 steps of 2 KiB loads a row.
FINISH_BLOCK_D = 512
FINISH_WARPS = 4

TWO_POW_MINUS_32 = tl.constexpr(2.0**-32)
TWO_POW_MINUS_33 = tl.constexpr(2.0**-33)


@triton.jit
def _fast_log(x):
    return libdevice.fast_logf(x)


@triton.jit
def _exact_log(x):
    return tl.log(x)


# g = -log(E) joins a logit in a score z + g, so it needs the absolute accuracy of that
# sum, not a relative one near g = 0. The fast log (MUFU.LG2 and a product: within
# 2**-21.4 for E in [0.5, 2] and 3 ulps elsewhere, the CUDA C Programming Guide's __logf)
# is a few ulps of the score's larger term, below the logit's own error from its GEMM,
# where libdevice's logf took ~20 instructions an id, a fifth of the noise's. E itself
# keeps the accurate log (below). The interpreter has no libdevice.
score_log = _exact_log if interpreting() else _fast_log


@triton.jit
def gumbel_from_words(words):
    """g = -log(E) of the exponential variate E = -log(u), u = (2w + 1) / 2**33, all in fp32.

    The torch backend takes E in float64 from the exact u. This is the same E to a few
    fp32 ulps with one fp32 log instead of a float64 one (~30 double-precision
    instructions an id, at half the fp32 rate on an H100). For u <= 1/2, E = -log(u) >=
    0.69 of u rounded to fp32: the rounding moves E by about an ulp. For u > 1/2, where E
    is tiny and an unlikely token wins, E = -log1p(-v) of v = 1 - u = (2 (~w) + 1) / 2**33
    (exact before its rounding), taken as log(y) of y = 1 - v rounded, plus that
    rounding's residual (1 - y - v) / y, which is exact: no cancellation anywhere, so E
    keeps its relative precision down to 2**-33. That needs the accurate log; the outer
    one takes `score_log`.
    """
    upper = (words >> 31) != 0  # u > 1/2
    u = words.to(tl.float32) * TWO_POW_MINUS_32 + TWO_POW_MINUS_33
    v = (words ^ 0xFFFFFFFF).to(tl.float32) * TWO_POW_MINUS_32 + TWO_POW_MINUS_33
    y = 1.0 - v
    # y >= 1/2 where it is used; the clamp keeps the unused lanes' quotient finite.
    residual = ((1.0 - y) - v) / tl.maximum(y, 0.5)
    log_u = tl.log(tl.where(upper, y, u)) + tl.where(upper, residual, 0.0)
    return -score_log(-log_u)


@triton.jit
def tile_noise(seed, pos_lo, pos_hi, first_group, sample, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Gumbel noise [BLOCK_M, BLOCK_N] of ids 4*first_group .. for one sample: one Philox call per 4 ids."""
    GROUPS: tl.constexpr = BLOCK_N // 4
    shape: tl.constexpr = (BLOCK_M, GROUPS)
    c0 = tl.broadcast_to((first_group + tl.arange(0, GROUPS)).to(tl.uint32)[None, :], shape)
    c1 = tl.broadcast_to(pos_lo[:, None], shape)
    c2 = tl.zeros(shape, dtype=tl.uint32) + sample
    c3 = tl.broadcast_to(pos_hi[:, None], shape)
    w0, w1, w2, w3 = tl.philox(seed[:, None], c0, c1, c2, c3)
    # join(a, b) stacks on a new minor axis, so join(join(w0, w2), join(w1, w3)) lists the
    # words of a group in the order w0, w1, w2, w3: id order.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (BLOCK_M, BLOCK_N))
    return gumbel_from_words(words)


@triton.jit
def tile_first_max(score):
    """(max, column of its first occurrence) [BLOCK_M] of each row of `score`, in one reduction."""
    return tl.max(score, axis=1, return_indices=True, return_indices_tie_break_left=True)


@triton.jit
def fold_lse_tempered(raw_max, raw_sum, z_sum, raw, z, temperature):
    """`fold_lse` of the raw logits and of z = RN(raw / T) with one max reduction: z's
    running max is no state of its own, as RN(u / T) is monotone in u for T > 0, so the
    largest z is exactly RN(largest raw / T)."""
    new_max, raw_sum = fold_lse(raw_max, raw_sum, raw)
    new_z_max = tl.math.div_rn(new_max, temperature)
    z_shift = tl.where(new_z_max == float("-inf"), 0.0, new_z_max)
    z_sum = z_sum * tl.exp(tl.math.div_rn(raw_max, temperature) - z_shift) + tl.sum(tl.exp(z - z_shift[:, None]),
                                                                                     axis=1)
    return new_max, raw_sum, z_sum


@triton.jit
def sample_tile(
    acc, tile, b_ptr, V, softcap, temperature, seed, pos_lo, pos_hi, first_sample, end_sample,
    best_score, best_id, raw_max, raw_sum, z_sum,
    SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GREEDY: tl.constexpr, TEMPERED: tl.constexpr,
):
    """Fold vocabulary tile `tile` (its products `acc`) into the program's running state.

    Its raw logits and z = raw / T go into the running (max, sum-exp) pairs; for each
    sample the tile's noise is added to z and the tile's first maximum (ties to the lower
    id) competes with the sample's running best. Returns the updated state.

    Over 8 warps each row reduction of a tile this narrow crosses warps (through shared
    memory, with a barrier): z's max comes from the raw one, a draw's maximum and its
    column from one reduction, and the winner's logit from none (`finish_draws_kernel`
    recomputes it, one dot a draw where a reduction a tile took ~3 instructions an id).
    """
    offs_n = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    col_ok = offs_n < V
    raw, _ = finish_logits(acc, b_ptr, offs_n, col_ok, softcap, 1.0, HAS_BIAS, HAS_SOFTCAP)
    raw = tl.where(col_ok[None, :], raw, float("-inf"))
    if GREEDY:
        raw_max, raw_sum = fold_lse(raw_max, raw_sum, raw)
        # The draw's score is the raw logit itself: one sample, no noise.
        tile_best, local = tile_first_max(raw)
        best_score, best_id = fold_draw(tile_best, local, tile, 0, tl.arange(0, SAMPLES), best_score, best_id,
                                        BLOCK_N)
    else:
        if TEMPERED:
            # Correctly rounded, as the torch backend's division: `/` is approximate on GPUs.
            z = tl.math.div_rn(raw, temperature)
            raw_max, raw_sum, z_sum = fold_lse_tempered(raw_max, raw_sum, z_sum, raw, z, temperature)
        else:  # T = 1: z is the raw logit (raw / 1 exactly), and its lse the raw one
            z = raw
            raw_max, raw_sum = fold_lse(raw_max, raw_sum, raw)
        slots = tl.arange(0, SAMPLES)  # sample first_sample + slot
        for sample in range(first_sample, end_sample):
            score = z + tile_noise(seed, pos_lo, pos_hi, tile * (BLOCK_N // 4), sample, BLOCK_M, BLOCK_N)
            tile_best, local = tile_first_max(score)
            best_score, best_id = fold_draw(tile_best, local, tile, sample - first_sample, slots, best_score,
                                            best_id, BLOCK_N)
    return best_score, best_id, raw_max, raw_sum, z_sum


@triton.jit
def sample_pass(
    acc0, acc1, acc2, acc3, tile, b_ptr, V, num_tiles, softcap, temperature, seed, pos_lo, pos_hi, first_sample,
    end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
    SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_N: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GREEDY: tl.constexpr, TEMPERED: tl.constexpr,
):
    """`sample_tile` on each of a pass's SPLIT_N tiles (first `tile`) in turn.

    Tiles past the vocabulary (the last pass's) are skipped: a tile of -inf would fold
    nothing and win nothing, but costs its noise.
    """
    for j in tl.static_range(SPLIT_N):
        if j == 0 or tile + j < num_tiles:
            best_score, best_id, raw_max, raw_sum, z_sum = sample_tile(
                pass_accumulator(acc0, acc1, acc2, acc3, j), tile + j, b_ptr, V, softcap, temperature, seed, pos_lo,
                pos_hi, first_sample, end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
                SAMPLES, BLOCK_M, BLOCK_N, HAS_BIAS, HAS_SOFTCAP, GREEDY, TEMPERED,
            )
    return best_score, best_id, raw_max, raw_sum, z_sum


@triton.jit
def flat_passes(
    x_desc, w_desc, b_ptr, first_step, last_step, V, D, num_tiles, softcap, temperature, seed, pos_lo, pos_hi,
    first_sample, end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
    SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_N: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, GREEDY: tl.constexpr,
    TEMPERED: tl.constexpr, DOT_PRECISION: tl.constexpr, X_REGISTERS: tl.constexpr,
):
    """Passes first_step .. last_step - 1 as one loop over (pass, K slice), by TMA.

    The sampler streams W like a GEMV: a program's loads are its SM's share of HBM
    bandwidth, and a pass's epilogue (the noise: ~100 instructions an id) leaves that
    bandwidth idle when it follows the pass's own loop and the registers hold one
    program an SM. In one flat loop the pipeliner keeps issuing the next pass's first
    `num_stages - 1` K slices while the epilogue runs (the epilogue is the last slice's
    branch), so their loads overlap it.
    """
    k_slices = tl.cdiv(D, BLOCK_K)
    first_row = tl.program_id(0) * BLOCK_M
    acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
    for it in range(first_step * k_slices, last_step * k_slices):
        step = it // k_slices
        k0 = (it - step * k_slices) * BLOCK_K
        acc0, acc1, acc2, acc3 = slice_products_tma(x_desc, w_desc, first_row, step * (SPLIT_N * BLOCK_N), k0,
                                                    acc0, acc1, acc2, acc3, BLOCK_N, SPLIT_N, DOT_PRECISION,
                                                    X_REGISTERS)
        if k0 + BLOCK_K >= D:
            best_score, best_id, raw_max, raw_sum, z_sum = sample_pass(
                acc0, acc1, acc2, acc3, step * SPLIT_N, b_ptr, V, num_tiles, softcap, temperature, seed, pos_lo,
                pos_hi, first_sample, end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
                SAMPLES, BLOCK_M, BLOCK_N, SPLIT_N, HAS_BIAS, HAS_SOFTCAP, GREEDY, TEMPERED,
            )
            acc0, acc1, acc2, acc3 = zero_accumulators(BLOCK_M, BLOCK_N)
    return best_score, best_id, raw_max, raw_sum, z_sum


@triton.jit
def program_draws(seed_ptr, pos_ptr, N, num_samples, SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr):
    """A drawing program's rows, their Philox words and the sample slots it fills.

    Returns (rows (int64: a row times a row stride passes 2**31 for N * d beyond 2G
    elements), their mask, seed, position words, first and end sample, slot indices, and
    the running best score and id per (row, slot)).
    """
    first_sample = tl.program_id(2) * SAMPLES
    end_sample = tl.minimum(first_sample + SAMPLES, num_samples)
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    seed = tl.load(seed_ptr + offs_m, mask=row_ok, other=0)
    position = tl.load(pos_ptr + offs_m, mask=row_ok, other=0)
    pos_lo = position.to(tl.uint32)  # the low 32 bits
    pos_hi = (position >> 32).to(tl.uint32)
    best_score = tl.full((BLOCK_M, SAMPLES), float("-inf"), dtype=tl.float32)
    best_id = tl.zeros((BLOCK_M, SAMPLES), dtype=tl.int64)
    return (offs_m, row_ok, seed, pos_lo, pos_hi, first_sample, end_sample, tl.arange(0, SAMPLES), best_score,
            best_id)


@triton.jit
def store_draws(score_ptr, id_ptr, best_score, best_id, offs_m, row_ok, first_sample, slots, num_splits,
                num_samples):
    """Each (row, sample)'s best of this split into [N, num_splits, num_samples]; returns the
    flat (row, split) index."""
    out = offs_m * num_splits + tl.program_id(1)
    samples = first_sample + slots
    out_samples = out[:, None] * num_samples + samples[None, :]
    sample_ok = row_ok[:, None] & (samples < num_samples)[None, :]
    tl.store(score_ptr + out_samples, best_score, mask=sample_ok)
    tl.store(id_ptr + out_samples, best_id, mask=sample_ok)
    return out


@triton.jit
def fold_draw(tile_best, local, tile, slot_index, slots, best_score, best_id, BLOCK_N: tl.constexpr):
    """One sample's draw over tile `tile` against its running best: the tile's first
    maximum score `tile_best` [BLOCK_M] at column `local` (ties to the lower id).

    It replaces the sample's best only when strictly greater: earlier tiles hold lower
    ids. Returns the updated (best_score, best_id).
    """
    slot = (slots == slot_index)[None, :]
    previous = tl.max(tl.where(slot, best_score, float("-inf")), axis=1)
    better = slot & (tile_best > previous)[:, None]
    best_score = tl.where(better, tile_best[:, None], best_score)
    best_id = tl.where(better, (tile * BLOCK_N + local).to(tl.int64)[:, None], best_id)
    return best_score, best_id


@triton.jit
def sample_kernel(
    # pointers
    x_ptr, w_ptr, b_ptr,
    seed_ptr,  # [N] int64: each row's 64-bit Philox key (`philox_rows`)
    pos_ptr,  # [N] int64: each row's 64-bit position, the counter's words 1 (low) and 3 (high)
    score_ptr, id_ptr,  # [N, num_splits, num_samples]: each split's best per sample
    part_ptr,  # [N, num_splits, 4] fp32: (max, sum-exp) of the raw logits, then of z (TEMPERED)
    # sizes: the vocabulary is num_tiles tiles of BLOCK_N, taken SPLIT_N at a time (a step);
    # splits of steps as `SplitPlan`
    N, V, D, num_tiles, steps_per_split, longer_splits, num_splits, num_samples,
    # strides
    stride_xn, stride_xd, stride_wv, stride_wd,
    # logits transform
    softcap, temperature,
    # meta-parameters
    SAMPLES: tl.constexpr,  # samples per program, a power of two
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_N: tl.constexpr,  # adjacent tiles per pass over x (1, 2 or 4)
    HAS_BIAS: tl.constexpr,  # bias added in the tile
    HAS_SOFTCAP: tl.constexpr,  # c * tanh(u / c) applied in the tile
    GREEDY: tl.constexpr,  # temperature 0: argmax of the raw logits, no noise, one sample
    TEMPERED: tl.constexpr,  # temperature neither 0 nor 1: z = raw / T has a log-sum-exp of its own
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: no silent TF32
    USE_TMA: tl.constexpr,  # x_ptr and w_ptr are tensor descriptors (sm_90)
    FLAT: tl.constexpr = False,  # with USE_TMA: one loop over (pass, K slice), `flat_passes`
    X_REGISTERS: tl.constexpr = False,  # with USE_TMA: each x slice from registers (`wide_tiles`)
):
    offs_m, row_ok, seed, pos_lo, pos_hi, first_sample, end_sample, slots, best_score, best_id = program_draws(
        seed_ptr, pos_ptr, N, num_samples, SAMPLES, BLOCK_M)
    raw_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    raw_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    z_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    first_step, last_step = split_range(tl.program_id(1), steps_per_split, longer_splits)
    if FLAT:
        best_score, best_id, raw_max, raw_sum, z_sum = flat_passes(
            x_ptr, w_ptr, b_ptr, first_step, last_step, V, D, num_tiles, softcap, temperature, seed, pos_lo, pos_hi,
            first_sample, end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
            SAMPLES, BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_N, HAS_BIAS, HAS_SOFTCAP, GREEDY, TEMPERED, DOT_PRECISION,
            X_REGISTERS,
        )
    else:
        for step in range(first_step, last_step):
            tile = step * SPLIT_N
            acc0, acc1, acc2, acc3 = wide_products(
                x_ptr, w_ptr, offs_m, tile, N, V, D, stride_xn, stride_xd, stride_wv, stride_wd,
                BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_N, DOT_PRECISION, USE_TMA, X_REGISTERS,
            )
            best_score, best_id, raw_max, raw_sum, z_sum = sample_pass(
                acc0, acc1, acc2, acc3, tile, b_ptr, V, num_tiles, softcap, temperature, seed, pos_lo, pos_hi,
                first_sample, end_sample, best_score, best_id, raw_max, raw_sum, z_sum,
                SAMPLES, BLOCK_M, BLOCK_N, SPLIT_N, HAS_BIAS, HAS_SOFTCAP, GREEDY, TEMPERED,
            )
    out = store_draws(score_ptr, id_ptr, best_score, best_id, offs_m, row_ok, first_sample, slots, num_splits,
                      num_samples)
    if first_sample == 0:  # one program per (row block, split) stores the partials
        tl.store(part_ptr + out * 4, raw_max, mask=row_ok)
        tl.store(part_ptr + out * 4 + 1, raw_sum, mask=row_ok)
        if TEMPERED:
            tl.store(part_ptr + out * 4 + 2, tl.math.div_rn(raw_max, temperature), mask=row_ok)
            tl.store(part_ptr + out * 4 + 3, z_sum, mask=row_ok)


@triton.jit
def drawn_logit(x_ptr, w_ptr, b_ptr, row, vocab_id, D, stride_xn, stride_xd, stride_wv, stride_wd, softcap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_D: tl.constexpr):
    """The logit at temperature 1 of id `vocab_id` in row `row`: one dot of length D with
    fp32 products and sums (the tile's value but for its order of additions), finished as
    a [1, 1] tile by the tiles' own bias and softcap (`finish_logits`)."""
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_D):
        offs = k0 + tl.arange(0, BLOCK_D)
        ok = offs < D
        x = tl.load(x_ptr + row * stride_xn + offs * stride_xd, mask=ok, other=0.0)
        w = tl.load(w_ptr + vocab_id * stride_wv + offs * stride_wd, mask=ok, other=0.0)
        acc += x.to(tl.float32) * w.to(tl.float32)
    offs_n = vocab_id + tl.zeros((1,), dtype=tl.int64)
    raw, _ = finish_logits(tl.sum(acc, axis=0, keep_dims=True)[:, None], b_ptr, offs_n, offs_n >= 0, softcap, 1.0,
                           HAS_BIAS, HAS_SOFTCAP)
    return tl.sum(tl.sum(raw, axis=1), axis=0)


@triton.jit
def finish_draws_kernel(
    x_ptr, w_ptr, b_ptr,  # the sampler's operands, for the drawn ids' logits
    score_ptr, id_ptr,  # [N, num_splits, drawn]: each split's best per sample
    part_ptr,  # [N, num_splits, 4]: (max, sum-exp) of the raw logits, then of z (TEMPERED)
    ids_out_ptr, logprob_ptr, raw_logprob_ptr,  # [N, num_samples]
    lse_ptr,  # [N]: log-sum-exp of the raw logits
    V, D, stride_xn, stride_xd, stride_wv, stride_wd, num_splits, drawn, num_samples, softcap, temperature,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    GREEDY: tl.constexpr, TEMPERED: tl.constexpr,
):
    """Program `row` keeps each sample's best split (the first on equal scores: its ids are
    lower), merges the log-sum-exps and writes the row's Sample: in one launch what took
    about twenty small torch ops, which at a batch of 64 cost more host time than the
    sample kernel's GPU time. A greedy draw's score is its logit; a sampled id's logit is
    recomputed (`drawn_logit`)."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    entries = row * num_splits + splits
    part = part_ptr + entries * 4
    lse_raw = merged_lse(tl.load(part, mask=split_ok, other=float("-inf")), tl.load(part + 1, mask=split_ok, other=0.0))
    tl.store(lse_ptr + row, lse_raw)
    lse_z = lse_raw
    if TEMPERED:
        lse_z = merged_lse(tl.load(part + 2, mask=split_ok, other=float("-inf")),
                           tl.load(part + 3, mask=split_ok, other=0.0))
    for j in range(0, drawn):
        score = tl.load(score_ptr + entries * drawn + j, mask=split_ok, other=float("-inf"))
        best_score, best_split = tl.max(score, axis=0, return_indices=True, return_indices_tie_break_left=True)
        best_id = tl.load(id_ptr + (row * num_splits + best_split) * drawn + j)
        if GREEDY:  # one draw serves every sample
            for n in range(0, num_samples):
                tl.store(ids_out_ptr + row * num_samples + n, best_id)
                tl.store(logprob_ptr + row * num_samples + n, 0.0)
                tl.store(raw_logprob_ptr + row * num_samples + n, best_score - lse_raw)
        else:
            # A draw replaces its best only with a strictly greater score, so no padded
            # column is ever held; clamped all the same, an id reads W in bounds.
            safe_id = tl.minimum(tl.maximum(best_id, 0), V - 1)
            best_raw = drawn_logit(x_ptr, w_ptr, b_ptr, row, safe_id, D, stride_xn, stride_xd, stride_wv, stride_wd,
                                   softcap, HAS_BIAS, HAS_SOFTCAP, BLOCK_D)
            tl.store(ids_out_ptr + row * num_samples + j, best_id)
            # Correctly rounded, as `at_temperature` divides.
            tl.store(logprob_ptr + row * num_samples + j, tl.math.div_rn(best_raw, temperature) - lse_z)
            tl.store(raw_logprob_ptr + row * num_samples + j, best_raw - lse_raw)


def triton_sample(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                  options: SamplingOptions, seeds: Tensor, positions: Tensor,
                  config: TileConfig | None = None) -> Sample:
    """Untruncated or greedy draws for 2-D `x` [B, d] (fp16, bf16 or fp32); `bias` fp32 or None.

    `seeds`, `positions`: each row's 64-bit Philox key and position, [B] int64 each
    (`philox_rows` in sampling/sample.py). Greedy draws one id per row and repeats it.
    """
    n, d = x.shape
    v = weight.shape[0]
    drawn = 1 if options.greedy else options.num_samples
    tempered = not options.greedy and options.temperature != 1.0
    if config is None:
        config = select_sample_config(x.dtype, n, weight.shape[0], x.device,
                                      lambda c: triton_sample(x, weight, bias, softcap, options, seeds, positions, c))
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    samples_per_program = min(triton.next_power_of_2(drawn), SAMPLES_PER_PROGRAM)
    sample_programs = triton.cdiv(drawn, samples_per_program)
    # Splits are cut in steps of split_n tiles: a step never straddles two programs.
    plan = plan_splits(n, v, config.block_m, config.block_n * config.split_n, sample_programs, kind="sample")
    num_tiles = triton.cdiv(v, config.block_n)
    dev = x.device
    score = torch.empty(n, plan.num_splits, drawn, dtype=torch.float32, device=dev)
    ids = torch.empty(n, plan.num_splits, drawn, dtype=torch.int64, device=dev)
    part = torch.empty(n, plan.num_splits, 4, dtype=torch.float32, device=dev)
    x_arg, w_arg, use_tma = kernel_operands(x, weight, config)
    if n > 0:
        sample_kernel[(plan.num_m_blocks, plan.num_splits, sample_programs)](
            x_arg, w_arg, bias if bias is not None else x,
            seeds, positions, score, ids, part,
            n, v, d, num_tiles, plan.tiles_per_split, plan.longer_splits, plan.num_splits, drawn,
            x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
            float(softcap or 1.0), float(options.temperature or 1.0),
            SAMPLES=samples_per_program, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
            SPLIT_N=config.split_n,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, GREEDY=options.greedy, TEMPERED=tempered,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", USE_TMA=use_tma,
            FLAT=use_tma and config.flat, X_REGISTERS=use_tma and config.x_registers,
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
        )
    sample = Sample(torch.empty(n, options.num_samples, dtype=torch.int64, device=dev),
                    torch.empty(n, options.num_samples, dtype=torch.float32, device=dev),
                    torch.empty(n, options.num_samples, dtype=torch.float32, device=dev),
                    torch.empty(n, dtype=torch.float32, device=dev))
    if n > 0:
        finish_draws_kernel[(n,)](
            x, weight, bias if bias is not None else x, score, ids, part, *sample,
            v, d, x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), plan.num_splits, drawn,
            options.num_samples, float(softcap or 1.0), float(options.temperature or 1.0),
            BLOCK_S=triton.next_power_of_2(plan.num_splits), BLOCK_D=FINISH_BLOCK_D, HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None, GREEDY=options.greedy, TEMPERED=tempered, num_warps=FINISH_WARPS,
            enable_fp_fusion=ENABLE_FP_FUSION,
        )
    return sample
