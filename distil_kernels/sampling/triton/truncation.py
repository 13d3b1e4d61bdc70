"""Truncated sampling (top_k / top_p / min_p): among each row's top candidates, and over
logits that exist, the kept set of top_p / min_p without a sort.

`candidate_sample_kernel` samples each row from the top candidates of the threshold
top-k (the candidates' kept prefix, whether it settles the row, the kept log-sum-exp,
the draws), in one launch where torch ops took ~45.

The rest serves the dense fallback (rows whose nucleus or min-p set outgrows their
candidates) and `sample_from_logits` on a GPU. In torch ops each block of rows
took ~30 launches (log-sum-exps, a sort, float64 prefix sums, a scatter, the masking),
and a 256 MiB workspace held ~18 rows of a 152k vocabulary for them: a flat head's 64
rows were ~130 launches beside their draws, which made top_p sampling host-bound on an
H100 (bench/RESULTS.md, twelfth session). Here a block is three launches over nothing
but its fp32 logits:

1. `truncation_kernel`, a program per row: a pass for the log-sum-exps; for top_p a
   search over the order keys of z (`order_key`) for the boundary of the nucleus, each
   step a pass that sums the probability mass above a trial key; then a pass that keeps
   the boundary's equal logits in id order and sums the kept mass. The kept set comes
   out as a bound per row: id v is kept when key(z_v) > bound, or key(z_v) == bound and
   v <= cut.
2. `truncated_draws_kernel`: the sampler's Gumbel-max draws (stream and tie rules of
   `sample_kernel`) over the logits, masked by the bound as they are loaded.
3. `finish_truncated_draws_kernel`: each sample's best split, and its log-probs.

The nucleus is the shortest prefix of the ids by (z desc, id asc) whose mass reaches
top_p (`kept_prefix`): id v is kept when the mass before it is below top_p. The search
keeps a bracket of element keys: every key below `low` has at least top_p above it
(dropped), `high` has less (kept). A step sums the mass above the middle key t and
moves `high` down to the largest key at or below t, or `low` up to the smallest key
above it, so the bracket halves and snaps to keys that exist: about
log2(key range / key spacing) steps, ~20 for a 152k vocabulary. When it closes,
`high` is the boundary's key; its equal logits have one probability p, and the j-th of
them (in id order) is kept while mass_above + j p < top_p.

The mass is fp32 exp(z - lse) summed in float64. It differs from the torch path's
float64 prefix sums by the rounding of the fp32 lse and exponentials (the GPU's
exponential rounds its argument's product with log2(e): ~1e-6 relative at |z - lse| =
20; the torch path's own fp32 lse carries ~1e-7), so the two keep different sets only
where a prefix's mass is that close to top_p, a float tie of the truncation boundary.
"""

from __future__ import annotations

import math
import struct
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...loss.triton.configs import ENABLE_FP_FUSION
from ...loss.triton.tiles import fold_lse
from ..sample import Sample, SamplingOptions, _order_keys, philox_rows
from .configs import (SAMPLES_PER_PROGRAM, select_candidate_sample_config, select_dense_sample_config,
                      select_truncation_config)
from .sample import (fold_draw, fold_lse_tempered, gumbel_from_words, program_draws, store_draws, tile_first_max,
                     tile_noise)
from .splits import plan_splits, split_range

INT32_MAX = tl.constexpr(2**31 - 1)
# The finish kernel reads a row's splits (at most a few hundred) and writes its samples.
FINISH_TRUNCATED_WARPS = 1


@triton.jit
def order_key(z):
    """int32 keys ordered as the fp32 values `z` (no NaN): a negative value's magnitude
    bits flipped; -0 keyed as +0, its equal (`sample._order_keys`)."""
    bits = z.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return tl.where(key == -1, 0, key)


@triton.jit
def key_value(key):
    """The fp32 value of an int32 order key (`order_key`'s inverse, +0 for key 0)."""
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def row_tile(row_ptr, v0, V, temperature, TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Columns [1, BLOCK_N] from v0, their mask, raw logits and z = RN(raw / T) (-inf past V)."""
    cols = v0 + tl.arange(0, BLOCK_N)[None, :]
    ok = cols < V
    raw = tl.load(row_ptr + cols, mask=ok, other=float("-inf"))
    z = raw
    if TEMPERED:
        z = tl.math.div_rn(raw, temperature)
    return cols, ok, raw, z


@triton.jit
def mass_above(row_ptr, V, temperature, lse_z, t, TEMPERED: tl.constexpr, BLOCK_N: tl.constexpr):
    """(float64 mass of the ids whose key is above the int32 key `t`, the largest key at or
    below t, the smallest key above it) of one row; the keys are int32, -2**31 or
    2**31 - 1 where there is none (neither is the key of a number).

    Each lane keeps its own sums and extremes across the tiles, reduced once at the end:
    a reduction a tile would cross the warps through shared memory three times a tile.
    """
    mass = tl.zeros((1, BLOCK_N), dtype=tl.float64)
    below = tl.full((1, BLOCK_N), -INT32_MAX - 1, dtype=tl.int32)
    above = tl.full((1, BLOCK_N), INT32_MAX, dtype=tl.int32)
    for v0 in range(0, V, BLOCK_N):
        cols, ok, raw, z = row_tile(row_ptr, v0, V, temperature, TEMPERED, BLOCK_N)
        key = order_key(z)
        over = ok & (key > t)
        mass += tl.where(over, tl.exp(z - lse_z), 0.0).to(tl.float64)
        below = tl.maximum(below, tl.where(ok & (key <= t), key, -INT32_MAX - 1))
        above = tl.minimum(above, tl.where(over, key, INT32_MAX))
    return (tl.sum(tl.sum(mass, axis=1), axis=0), tl.max(tl.max(below, axis=1), axis=0),
            tl.min(tl.min(above, axis=1), axis=0))


@triton.jit
def truncation_kernel(
    raw_ptr,  # [N, V] fp32: logits at temperature 1 (bias and softcap applied)
    lse_raw_ptr, kept_lse_ptr,  # [N] fp32 out: log-sum-exp of the raw logits, of z over the kept set
    bound_ptr, cut_ptr,  # [N] int64 out: id v is kept if key(z_v) > bound, or == bound and v <= cut
    V, stride_n, temperature,
    top_p_bits,  # int64: top_p's float64 bits (a float argument would arrive as fp32)
    log_min_p,  # fp32: log(min_p), as the torch path adds it to the fp32 row maximum
    TEMPERED: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """A row's log-sum-exps and the kept set of top_p and min_p (module docstring)."""
    row = tl.program_id(0).to(tl.int64)
    row_ptr = raw_ptr + row * stride_n
    vocab = tl.zeros((), dtype=tl.int32) + V  # a tensor even where V is specialised to a constant
    raw_max = tl.full((1,), float("-inf"), dtype=tl.float32)
    raw_sum = tl.zeros((1,), dtype=tl.float32)
    z_sum = tl.zeros((1,), dtype=tl.float32)
    key_min = tl.full((), INT32_MAX, dtype=tl.int32)
    for v0 in range(0, V, BLOCK_N):
        cols, ok, raw, z = row_tile(row_ptr, v0, V, temperature, TEMPERED, BLOCK_N)
        if TEMPERED:
            raw_max, raw_sum, z_sum = fold_lse_tempered(raw_max, raw_sum, z_sum, raw, z, temperature)
        else:
            raw_max, raw_sum = fold_lse(raw_max, raw_sum, raw)
        key_min = tl.minimum(key_min, tl.min(tl.min(tl.where(ok, order_key(z), INT32_MAX), axis=1), axis=0))
    lse_raw = tl.max(raw_max + tl.log(raw_sum), axis=0)
    tl.store(lse_raw_ptr + row, lse_raw)
    z_max = tl.max(raw_max, axis=0)
    lse_z = lse_raw
    if TEMPERED:
        z_max = tl.math.div_rn(z_max, temperature)
        lse_z = z_max + tl.log(tl.max(z_sum, axis=0))
    # No truncation: every id, the boundary below the smallest key.
    bound = key_min
    tie_limit = vocab
    if MIN_P:
        # z >= z_max + log(min_p) (fp32 sum), keyed: every id from that key up.
        bound = order_key(z_max + log_min_p)
    if TOP_P:
        top_p = (tl.zeros((), dtype=tl.int64) + top_p_bits).to(tl.float64, bitcast=True)
        low = key_min
        high = order_key(z_max)
        high_mass = tl.zeros((), dtype=tl.float64)  # nothing is above the largest key
        while low < high:
            # The middle key in int64: low + high can pass 2**31.
            middle = ((low.to(tl.int64) + high.to(tl.int64)) >> 1).to(tl.int32)
            mass, below, above = mass_above(row_ptr, V, temperature, lse_z, middle, TEMPERED, BLOCK_N)
            if mass < top_p:
                high = below
                high_mass = mass
            else:
                low = above
        # The boundary's equal logits share one probability: the j-th is kept while the
        # mass before it, high_mass + j p, is below top_p (at least the first: high_mass is).
        p = tl.exp(key_value(high) - lse_z).to(tl.float64)
        kept_ties = tl.where(p > 0, tl.math.ceil((top_p - high_mass) / p), vocab.to(tl.float64))
        nucleus_limit = tl.minimum(kept_ties, vocab.to(tl.float64)).to(tl.int32)
        # The shorter of the two prefixes (min_p's keeps every id of its bound's key).
        if high >= bound:
            tie_limit = nucleus_limit
            bound = high
    kept_lse = lse_z
    cut = vocab - 1
    if TOP_P or MIN_P:
        # The kept mass, and the id of the last equal logit kept at the bound.
        kept_mass = tl.zeros((1, BLOCK_N), dtype=tl.float64)
        ties = tl.zeros((), dtype=tl.int32)
        for v0 in range(0, V, BLOCK_N):
            cols, ok, raw, z = row_tile(row_ptr, v0, V, temperature, TEMPERED, BLOCK_N)
            key = order_key(z)
            tie = ok & (key == bound)
            rank = ties + tl.cumsum(tie.to(tl.int32), axis=1)  # 1-based among the bound's ids
            kept = ok & ((key > bound) | (tie & (rank <= tie_limit)))
            kept_mass += tl.where(kept, tl.exp(z - lse_z), 0.0).to(tl.float64)
            last = tie & (rank == tie_limit)
            cut = tl.minimum(cut, tl.min(tl.min(tl.where(last, cols, V - 1), axis=1), axis=0))
            ties += tl.sum(tl.sum(tie.to(tl.int32), axis=1), axis=0)
        kept_lse = lse_z + tl.log(tl.sum(tl.sum(kept_mass, axis=1), axis=0)).to(tl.float32)
    tl.store(kept_lse_ptr + row, kept_lse)
    tl.store(bound_ptr + row, bound.to(tl.int64))
    tl.store(cut_ptr + row, cut.to(tl.int64))


@triton.jit
def truncated_draws_kernel(
    raw_ptr,  # [N, V] fp32: logits at temperature 1
    bound_ptr, cut_ptr,  # [N] int64: each row's kept set (`truncation_kernel`)
    seed_ptr, pos_ptr,  # as sample_kernel's
    score_ptr, id_ptr,  # [N, num_splits, num_samples]: each split's best per sample
    N, V, tiles_per_split, longer_splits, num_splits, num_samples, stride_n, temperature,  # splits: `SplitPlan`
    SAMPLES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TEMPERED: tl.constexpr,
):
    """Gumbel-max draws over logits that exist, masked to each row's kept set as loaded.

    The stream and tie rules of sample_kernel on a tile loaded instead of computed: an
    id outside the kept set scores -inf under any noise, so it is never drawn.
    """
    offs_m, row_ok, seed, pos_lo, pos_hi, first_sample, end_sample, slots, best_score, best_id = program_draws(
        seed_ptr, pos_ptr, N, num_samples, SAMPLES, BLOCK_M)
    bound = tl.load(bound_ptr + offs_m, mask=row_ok, other=0)[:, None]
    cut = tl.load(cut_ptr + offs_m, mask=row_ok, other=0)[:, None]
    first_tile, last_tile = split_range(tl.program_id(1), tiles_per_split, longer_splits)
    for tile in range(first_tile, last_tile):
        cols = (tile * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)[None, :]
        z = tl.load(raw_ptr + offs_m[:, None] * stride_n + cols, mask=row_ok[:, None] & (cols < V),
                    other=float("-inf"))
        if TEMPERED:
            z = tl.math.div_rn(z, temperature)
        key = order_key(z).to(tl.int64)
        z = tl.where((key > bound) | ((key == bound) & (cols <= cut)), z, float("-inf"))
        for sample in range(first_sample, end_sample):
            score = z + tile_noise(seed, pos_lo, pos_hi, tile * (BLOCK_N // 4), sample, BLOCK_M, BLOCK_N)
            tile_best, local = tile_first_max(score)
            best_score, best_id = fold_draw(tile_best, local, tile, sample - first_sample, slots, best_score,
                                            best_id, BLOCK_N)
    store_draws(score_ptr, id_ptr, best_score, best_id, offs_m, row_ok, first_sample, slots, num_splits, num_samples)


@triton.jit
def finish_truncated_draws_kernel(
    raw_ptr,  # [N, V] fp32: logits at temperature 1
    score_ptr, id_ptr,  # [N, num_splits, num_samples]: each split's best per sample
    lse_raw_ptr, kept_lse_ptr,  # [N] fp32 (`truncation_kernel`)
    ids_out_ptr, logprob_ptr, raw_logprob_ptr,  # [N, num_samples]
    V, num_splits, num_samples, stride_n, temperature,
    BLOCK_S: tl.constexpr, TEMPERED: tl.constexpr,
):
    """Program `row` keeps each sample's best split (the first on equal scores: its ids are
    lower) and writes the drawn ids and their log-probs, where torch ops took six launches."""
    row = tl.program_id(0).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    split_ok = splits < num_splits
    lse_raw = tl.load(lse_raw_ptr + row)
    kept_lse = tl.load(kept_lse_ptr + row)
    for j in range(num_samples):
        entries = (row * num_splits + splits) * num_samples + j
        score = tl.load(score_ptr + entries, mask=split_ok, other=float("-inf"))
        best = tl.max(score, axis=0)
        first = tl.min(tl.where(split_ok & (score == best), splits, BLOCK_S - 1), axis=0)
        drawn = tl.load(id_ptr + (row * num_splits + first) * num_samples + j)
        drawn = tl.minimum(tl.maximum(drawn, 0), V - 1)  # a row of -inf keeps id 0; in bounds all the same
        raw = tl.load(raw_ptr + row * stride_n + drawn)
        z = raw
        if TEMPERED:
            z = tl.math.div_rn(raw, temperature)
        tl.store(ids_out_ptr + row * num_samples + j, drawn)
        tl.store(logprob_ptr + row * num_samples + j, z - kept_lse)
        tl.store(raw_logprob_ptr + row * num_samples + j, raw - lse_raw)


@triton.jit
def candidate_sample_kernel(
    z_ptr, ids_ptr,  # [N, C] fp32 / int64: each row's top candidates by (z desc, id asc), z tempered
    lse_z_ptr, lse_raw_ptr,  # [N] fp32: log-sum-exp of z and of the raw logits
    seed_ptr, pos_ptr,  # as sample_kernel's
    ids_out_ptr, logprob_ptr, raw_logprob_ptr,  # [N, num_samples]
    status_ptr,  # [N] int32 out: 0 settled, 1 left to the dense fallback, 2 a NaN lse
    exact_ptr,  # [N] bool: the rows whose candidates are exact (EXACT_ROWS), the others unsettled
    C, V, num_samples, top_k, top_p_bits, log_min_p, temperature,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, EXACT_ROWS: tl.constexpr,
    ALL_SETTLED: tl.constexpr,  # `all_settled`: no row can outgrow its candidates
    TOP_K_SETTLES: tl.constexpr,  # top_k <= C: a row's kept set ends within them
    BLOCK_C: tl.constexpr,
):
    """A row's truncated Sample from its top candidates (`torch_candidate_sample` in one
    launch where torch ops took ~45): the kept prefix (`kept_prefix`: float64 mass in
    rank order, renormalised within top_k), whether the candidates settle it, the kept
    log-sum-exp, and the Gumbel-max draws among the kept candidates (an id's noise is
    word id % 4 of its Philox block, equal scores to the lower id)."""
    row = tl.program_id(0).to(tl.int64)
    lse_z = tl.load(lse_z_ptr + row)
    lse_raw = tl.load(lse_raw_ptr + row)
    z_row = z_ptr + row * C
    id_row = ids_ptr + row * C
    length = tl.zeros((), dtype=tl.int32) + C
    if TOP_K:
        length = tl.minimum(length, top_k)
    if TOP_P:
        top_p = (tl.zeros((), dtype=tl.int64) + top_p_bits).to(tl.float64, bitcast=True)
        lse64 = lse_z.to(tl.float64)
        total = tl.zeros((), dtype=tl.float64) + 1.0
        if TOP_K:
            # Within top_k the mass is renormalised: the kept ranks' sum first.
            total = tl.zeros((), dtype=tl.float64)
            for c0 in range(0, C, BLOCK_C):
                rank = c0 + tl.arange(0, BLOCK_C)
                z = tl.load(z_row + rank, mask=rank < C, other=float("-inf"))
                total += tl.sum(tl.where(rank < length, tl.exp(z.to(tl.float64) - lse64), 0.0), axis=0)
        # One plus the count of prefixes whose mass is short of top_p.
        prefix = tl.zeros((), dtype=tl.float64)
        short = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            rank = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(z_row + rank, mask=rank < C, other=float("-inf"))
            p = tl.where(rank < length, tl.exp(z.to(tl.float64) - lse64), 0.0)
            mass = prefix + tl.cumsum(p, axis=0)
            if TOP_K:
                mass = mass / total
            short += tl.sum(((rank < C) & (mass < top_p)).to(tl.int32), axis=0)
            prefix += tl.sum(p, axis=0)
        length = tl.minimum(length, short + 1)
    z_first = tl.load(z_row)
    if MIN_P:
        # z >= the first (largest) z + log(min_p) in fp32: a prefix of the ranks.
        threshold = z_first + log_min_p
        above = tl.zeros((), dtype=tl.int32)
        for c0 in range(0, C, BLOCK_C):
            rank = c0 + tl.arange(0, BLOCK_C)
            z = tl.load(z_row + rank, mask=rank < C, other=float("-inf"))
            above += tl.sum(((rank < C) & (z >= threshold)).to(tl.int32), axis=0)
        length = tl.minimum(length, above)
    length = tl.maximum(length, 1)
    status = tl.zeros((), dtype=tl.int32)
    if not ALL_SETTLED:
        if not TOP_K_SETTLES:
            # A prefix that takes every candidate could go on past them.
            status = (length >= C).to(tl.int32)
    if EXACT_ROWS:
        status = tl.where(tl.load(exact_ptr + row), status, 1)
    status = tl.where(lse_z != lse_z, 2, status)
    tl.store(status_ptr + row, status)
    # The kept log-sum-exp from the largest z, as torch.logsumexp shifts.
    shift = tl.where(z_first == float("-inf"), 0.0, z_first)
    kept_sum = tl.zeros((), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        rank = c0 + tl.arange(0, BLOCK_C)
        z = tl.load(z_row + rank, mask=rank < length, other=float("-inf"))
        kept_sum += tl.sum(tl.exp(z - shift), axis=0)
    kept_lse = shift + tl.log(kept_sum)
    seed = tl.load(seed_ptr + row)
    position = tl.load(pos_ptr + row)
    pos_lo = tl.zeros((BLOCK_C,), dtype=tl.uint32) + position.to(tl.uint32)
    pos_hi = tl.zeros((BLOCK_C,), dtype=tl.uint32) + (position >> 32).to(tl.uint32)
    for sample in range(num_samples):
        best_score = tl.full((), float("-inf"), dtype=tl.float32)
        best_id = tl.zeros((), dtype=tl.int64) + V
        best_z = tl.zeros((), dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            rank = c0 + tl.arange(0, BLOCK_C)
            kept = rank < length
            z = tl.load(z_row + rank, mask=kept, other=float("-inf"))
            # Ids clamped into [0, V): a bad id reads no noise out of the stream's range.
            ids = tl.minimum(tl.maximum(tl.load(id_row + rank, mask=kept, other=0), 0), V - 1)
            counter = tl.zeros((BLOCK_C,), dtype=tl.uint32) + sample
            w0, w1, w2, w3 = tl.philox(seed, (ids >> 2).to(tl.uint32), pos_lo, counter, pos_hi)
            lane = ids & 3
            words = tl.where(lane == 0, w0, tl.where(lane == 1, w1, tl.where(lane == 2, w2, w3)))
            score = tl.where(kept, z + gumbel_from_words(words), float("-inf"))
            chunk_best = tl.max(score, axis=0)
            # The lowest id of the chunk's best (of its kept ids only, should every score
            # be -inf), and its z.
            winner = kept & (score == chunk_best)
            chunk_id = tl.min(tl.where(winner, ids, V), axis=0)
            chunk_z = tl.max(tl.where(winner & (ids == chunk_id), z, float("-inf")), axis=0)
            better = (chunk_best > best_score) | ((chunk_best == best_score) & (chunk_id < best_id))
            best_score = tl.where(better, chunk_best, best_score)
            best_id = tl.where(better, chunk_id, best_id)
            best_z = tl.where(better, chunk_z, best_z)
        out = row * num_samples + sample
        tl.store(ids_out_ptr + out, best_id)
        tl.store(logprob_ptr + out, best_z - kept_lse)
        # The raw logit as the torch path forms it from the candidate's z.
        tl.store(raw_logprob_ptr + out, best_z * temperature - lse_raw)


def float64_bits(value: float) -> int:
    """The IEEE-754 bits of `value` as a signed int64 (`truncation_kernel`'s top_p_bits)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


class Truncation(NamedTuple):
    """`truncation_kernel`'s outputs, [N] each."""

    lse_raw: Tensor  # fp32: log-sum-exp of the raw logits
    kept_lse: Tensor  # fp32: log-sum-exp of z over the kept set
    bound: Tensor  # int64: the kept set's smallest order key ...
    cut: Tensor  # int64: ... and at that key its last id

    def kept(self, z: Tensor) -> Tensor:
        """bool [N, V]: the kept set over z [N, V], as the draws kernel reads the bound."""
        keys = _order_keys(z).to(torch.int64)
        ids = torch.arange(z.shape[1], device=z.device)
        return (keys > self.bound[:, None]) | ((keys == self.bound[:, None]) & (ids[None, :] <= self.cut[:, None]))


def triton_truncation(raw: Tensor, options: SamplingOptions) -> Truncation:
    """The log-sum-exps and kept set of `options` (top_p, min_p, temperature; no top_k, not
    greedy) for fp32 logits `raw` [N, V] with unit column stride: one launch."""
    if options.greedy or options.top_k is not None:
        raise ValueError(f"triton_truncation takes top_p / min_p truncation alone, got {options}")
    if raw.dtype != torch.float32 or raw.dim() != 2 or raw.stride(-1) != 1:
        raise ValueError(f"raw must be fp32 [N, V] with unit column stride, got {raw.dtype} of shape "
                         f"{tuple(raw.shape)}, strides {raw.stride()}")
    rows, vocab = raw.shape
    out = Truncation(*(torch.empty(rows, dtype=dtype, device=raw.device)
                       for dtype in (torch.float32, torch.float32, torch.int64, torch.int64)))
    if rows == 0:
        return out
    top_p = options.top_p is not None and options.top_p < 1.0
    min_p = options.min_p is not None and options.min_p > 0.0
    config = select_truncation_config()
    truncation_kernel[(rows,)](
        raw, *out, vocab, raw.stride(0), float(options.temperature),
        float64_bits(float(options.top_p)) if top_p else 0, math.log(options.min_p) if min_p else 0.0,
        TEMPERED=options.temperature != 1.0, TOP_P=top_p, MIN_P=min_p, BLOCK_N=config.block_n,
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    return out


def triton_candidate_sample(cand_ids: Tensor, cand_z: Tensor, lse_z: Tensor, lse_raw: Tensor,
                            options: SamplingOptions, seed, positions, keys, vocab: int,
                            exact: Tensor | None = None) -> tuple[Sample, Tensor]:
    """`torch_candidate_sample` in one launch and one wait on the device: (Sample, the
    rows the candidates leave unsettled); raises on a row whose lse is NaN. `keys` (the
    torch path's Philox words) is unused: the kernel takes the seeds and positions.
    `exact`: as `torch_candidate_sample`'s."""
    from ..sample import _refuse_nan_rows, all_settled

    rows, num_candidates = cand_z.shape
    dev = cand_z.device
    n = options.num_samples
    sample = Sample(torch.empty(rows, n, dtype=torch.int64, device=dev),
                    torch.empty(rows, n, dtype=torch.float32, device=dev),
                    torch.empty(rows, n, dtype=torch.float32, device=dev), lse_raw)
    status = torch.zeros(rows, dtype=torch.int32, device=dev)
    if rows > 0:
        top_p = options.top_p is not None and options.top_p < 1.0
        min_p = options.min_p is not None and options.min_p > 0.0
        top_k = options.top_k is not None
        seeds, row_positions = philox_rows(seed, positions, rows, dev)
        config = select_candidate_sample_config()
        candidate_sample_kernel[(rows,)](
            cand_z.contiguous(), cand_ids.contiguous(), lse_z.contiguous(), lse_raw.contiguous(), seeds,
            row_positions, *sample[:3], status, status if exact is None else exact, num_candidates, vocab, n,
            options.top_k if top_k else num_candidates,
            float64_bits(float(options.top_p)) if top_p else 0, math.log(options.min_p) if min_p else 0.0,
            float(options.temperature), TOP_K=top_k, TOP_P=top_p, MIN_P=min_p, EXACT_ROWS=exact is not None,
            ALL_SETTLED=all_settled(options, num_candidates, vocab),
            TOP_K_SETTLES=top_k and options.top_k <= num_candidates,
            BLOCK_C=min(config.block_n, triton.next_power_of_2(num_candidates)), num_warps=config.num_warps,
            num_stages=1,
        )
    # The one wait: NaN rows and unsettled rows together.
    status = status.cpu()
    _refuse_nan_rows(status == 2)
    return sample, (status == 1).nonzero()[:, 0].to(dev)


def triton_top_k_sample(raw_logits: Tensor, options: SamplingOptions, seed: int | Tensor,
                        positions: Tensor | None) -> Sample:
    """`reference_sample` with top_k (and any top_p / min_p, not greedy) for logits that
    exist: the rows' top_k ids by (z desc, id asc) from one `torch.topk` of int64 keys
    (order key, then 0xFFFFFFFF - id: exact, ties to the lower id), then the candidate
    kernel, which top_k always settles. The reference sorts whole rows and forms every
    id's noise in torch ops (~100 launches of [B, V] int64 work a sample)."""
    from ..sample import at_temperature
    from .topk import decode_keys, encode_keys

    if options.greedy or options.top_k is None:
        raise ValueError(f"triton_top_k_sample takes top_k truncation, got {options}")
    raw = raw_logits.float()
    if raw.stride(-1) != 1:
        raw = raw.contiguous()
    vocab = raw.shape[1]
    # Both log-sum-exps in one launch: the truncation kernel's first pass, nothing truncated.
    lse = triton_truncation(raw, SamplingOptions(temperature=options.temperature))
    lse_raw, lse_z = lse.lse_raw, lse.kept_lse
    keys = encode_keys(at_temperature(raw, options.temperature), torch.arange(vocab, device=raw.device))
    values, top_ids = decode_keys(torch.topk(keys, options.top_k, dim=1).values)
    del keys  # [B, V] int64: gone before the candidates' kernel
    sample, unsettled = triton_candidate_sample(top_ids, values, lse_z, lse_raw, options, seed, positions, None,
                                                vocab)
    if len(unsettled):  # top_k <= its candidates settles every row
        raise RuntimeError(f"internal: rows {unsettled.tolist()[:5]} unsettled by their top_k candidates")
    # The drawn ids' raw logits as they are, where the candidates' path has only z * T.
    raw_logprobs = raw.gather(1, sample.ids) - lse_raw[:, None]
    return Sample(sample.ids, sample.logprobs, raw_logprobs, lse_raw)


def triton_truncated_sample(raw_logits: Tensor, options: SamplingOptions, seed: int | Tensor,
                            positions: Tensor | None) -> Sample:
    """`_dense_truncated_sample` (no top_k, not greedy) in three kernel launches over the
    rows' logits [N, V] and no workspace beyond them."""
    raw = raw_logits.float()
    if raw.stride(-1) != 1:
        raw = raw.contiguous()
    truncation = triton_truncation(raw, options)
    rows, vocab = raw.shape
    dev = raw.device
    n = options.num_samples
    sample = Sample(torch.empty(rows, n, dtype=torch.int64, device=dev),
                    torch.empty(rows, n, dtype=torch.float32, device=dev),
                    torch.empty(rows, n, dtype=torch.float32, device=dev), truncation.lse_raw)
    if rows == 0:
        return sample
    temperature = float(options.temperature)
    tempered = temperature != 1.0
    config = select_dense_sample_config()
    samples_per_program = min(triton.next_power_of_2(n), SAMPLES_PER_PROGRAM)
    sample_programs = triton.cdiv(n, samples_per_program)
    plan = plan_splits(rows, vocab, config.block_m, config.block_n, sample_programs, kind="sample")
    seeds, row_positions = philox_rows(seed, positions, rows, dev)
    score = torch.empty(rows, plan.num_splits, n, dtype=torch.float32, device=dev)
    ids = torch.empty(rows, plan.num_splits, n, dtype=torch.int64, device=dev)
    truncated_draws_kernel[(plan.num_m_blocks, plan.num_splits, sample_programs)](
        raw, truncation.bound, truncation.cut, seeds, row_positions, score, ids, rows, vocab, plan.tiles_per_split,
        plan.longer_splits, plan.num_splits, n, raw.stride(0), temperature, SAMPLES=samples_per_program,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, TEMPERED=tempered, num_warps=config.num_warps,
        num_stages=config.num_stages, enable_fp_fusion=ENABLE_FP_FUSION,
    )
    finish_truncated_draws_kernel[(rows,)](
        raw, score, ids, truncation.lse_raw, truncation.kept_lse, sample.ids, sample.logprobs, sample.raw_logprobs,
        vocab, plan.num_splits, n, raw.stride(0), temperature, BLOCK_S=triton.next_power_of_2(plan.num_splits),
        TEMPERED=tempered, num_warps=FINISH_TRUNCATED_WARPS, num_stages=1,
    )
    return sample
