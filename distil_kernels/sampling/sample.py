"""`sample_from_logits` and `linear_sample`: exact sampling with a counter-based stream.

The distribution of a row: logits z (softcap applied for `linear_sample`) divided by
the temperature, truncated, renormalised. Truncation keeps a prefix of the row's ids
sorted by descending probability (ties to the lower id): `top_k` keeps k of them,
`top_p` the shortest prefix whose renormalised mass (within the top-k) reaches top_p,
`min_p` those whose probability is at least min_p times the largest; the kept set is
the shortest of these prefixes. `temperature=0` is greedy (the lowest id among the
maxima).

A draw is Gumbel-max: the kept id maximising z_v + g_v. The noise g_v of id v in
sample j of a row comes from word w = word v % 4 of Philox4x32-10 keyed by the seed
(the row's own seed when `seed` is a tensor [B]) at counter (v // 4, position low
word, j, position high word): u = (2w + 1) / 2**33, E = -log(u) in float64 (exact u,
so E is accurate where it is tiny) rounded to fp32, g = -log(E) in fp32 (the triton and
cuda kernels take the same E in fp32, to a few ulps: `gumbel_from_words`). The position
is `positions[row]` when given, else 0 with per-row seeds, else the row's index. The
noise of an id depends on nothing else, so a row's sample does not depend on the batch
around it, the row order (given positions or per-row seeds) or the tiling, and backends
that share the stream and this transform draw the same ids; the exception is a float
tie between two scores z_v + g_v whose last bits differ between math libraries or
matmul orders (on the CPU a bf16/fp16 head's chunked logits are its GEMM's output
rounded to that dtype, as F.linear's: there scores that close are the rounding's size).

Outputs: `ids` [B, n]; `logprobs`, log-probability under the distribution sampled from
(0 for greedy); `raw_logprobs`, under the untruncated softmax at temperature 1; `lse`
[B], the log-sum-exp of the logits at temperature 1.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch import Tensor

from ..validation import is_integer_dtype
from .philox import philox4x32, seed_key

_TWO_POW_MINUS_32 = 2.0**-32
_TWO_POW_MINUS_33 = 2.0**-33


class Sample(NamedTuple):
    ids: Tensor  # [B, n] int64
    logprobs: Tensor  # [B, n] fp32, under the distribution sampled from
    raw_logprobs: Tensor  # [B, n] fp32, untruncated softmax at temperature 1
    lse: Tensor  # [B] fp32, log-sum-exp of the logits at temperature 1


def at_temperature(raw: Tensor, temperature: float) -> Tensor:
    """raw / temperature, correctly rounded on every device, as the kernels divide.

    PyTorch's CUDA division by a Python number multiplies by the number's rounded
    reciprocal (a bit off the quotient now and then); a divisor on the tensor's device
    takes the true division.
    """
    return raw / torch.full((), temperature, dtype=raw.dtype, device=raw.device)


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    num_samples: int = 1

    def __post_init__(self) -> None:
        # abs(t) < inf, not math.isfinite: see loss/options.py's _check_real.
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not abs(self.temperature) < math.inf:
            raise TypeError(f"temperature must be a finite real number, got {self.temperature!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise TypeError(f"top_k must be an int or None, got {type(self.top_k).__name__}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        # bool is an int to isinstance: top_p=True would read as 1.0 (no truncation).
        if self.top_p is not None and (isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float))
                                       or not 0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.min_p is not None and (isinstance(self.min_p, bool) or not isinstance(self.min_p, (int, float))
                                       or not 0.0 <= self.min_p <= 1.0):
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {self.num_samples!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# --------------------------------------------------------------------------------------
# The noise
# --------------------------------------------------------------------------------------


def row_keys(seed: int | Tensor, positions: Tensor | None, rows: int, device: torch.device
             ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row Philox key words (k0, k1) and position words (low, high), each [rows] int64."""
    if not isinstance(seed, Tensor):
        # An int seed's words are known on the host: filled on the device, without a copy
        # from host memory (which waits on the host) or the ops that split a seed tensor.
        # At a small batch these launches are a good part of a draw's time.
        k0 = torch.full((rows,), seed & 0xFFFFFFFF, dtype=torch.int64, device=device)
        k1 = torch.full((rows,), (seed >> 32) & 0xFFFFFFFF, dtype=torch.int64, device=device)
        if positions is None:  # the row index, below 2**32
            return (k0, k1, torch.arange(rows, device=device, dtype=torch.int64),
                    torch.zeros(rows, device=device, dtype=torch.int64))
        pos = positions.to(device=device, dtype=torch.int64)
        return k0, k1, pos & 0xFFFFFFFF, (pos >> 32) & 0xFFFFFFFF
    seed_t = torch.as_tensor(seed, dtype=torch.int64, device=device)
    per_row_seeds = seed_t.dim() == 1
    seed_t = seed_t if per_row_seeds else seed_t.expand(rows)
    k0, k1 = seed_key(seed_t)
    if positions is not None:
        pos = positions.to(device=device, dtype=torch.int64)
    elif per_row_seeds:
        pos = torch.zeros(rows, device=device, dtype=torch.int64)  # the row's seed alone names it
    else:
        pos = torch.arange(rows, device=device, dtype=torch.int64)
    return k0, k1, pos & 0xFFFFFFFF, (pos >> 32) & 0xFFFFFFFF


def philox_rows(seed: int | Tensor, positions: Tensor | None, rows: int, device: torch.device
                ) -> tuple[Tensor, Tensor]:
    """Each row's 64-bit Philox key and position, [rows] int64 each: `row_keys`' words
    before their split, which the Triton samplers take (two launches at most, where the
    four words take four and their recombination four more)."""
    if isinstance(seed, Tensor):
        seeds = seed.to(device=device, dtype=torch.int64).expand(rows).contiguous()
    else:
        seeds = torch.full((rows,), seed, dtype=torch.int64, device=device)
    if positions is not None:
        return seeds, positions.to(device=device, dtype=torch.int64).contiguous()
    if isinstance(seed, Tensor) and seed.dim() == 1:  # the row's seed alone names it
        return seeds, torch.zeros(rows, dtype=torch.int64, device=device)
    return seeds, torch.arange(rows, dtype=torch.int64, device=device)


def _gumbel_from_words(word: Tensor) -> Tensor:
    """g = -log(E) in fp32 for the exponential variate E = -log(u) of u = (2w + 1) / 2**33.

    u is never 0 or 1, and it is exact in float64 (33 significant bits), so E = -log(u)
    taken in float64 keeps full relative precision at both ends: near u = 1, where E is
    tiny and a token of probability 1e-6 wins only when its variate is ~1e-6, the input
    is exact and log's result is accurate to an ulp, no cancellation anywhere. E is
    then rounded to fp32 and g taken in fp32.
    """
    u = word.to(torch.float64).mul_(_TWO_POW_MINUS_32).add_(_TWO_POW_MINUS_33)
    exponential = u.log_().neg_().to(torch.float32)
    return exponential.log_().neg_()


def _words(groups: Tensor, keys: tuple[Tensor, Tensor, Tensor, Tensor], sample: int) -> Tensor:
    """The four Philox words [rows, cols, 4] of counter (group, pos_lo, sample, pos_hi)."""
    k0, k1, pos_lo, pos_hi = keys
    return torch.stack(philox4x32(groups, pos_lo[:, None], sample, pos_hi[:, None], k0[:, None], k1[:, None]),
                       dim=-1)


def gumbel_noise(vocab_ids: Tensor, keys: tuple[Tensor, Tensor, Tensor, Tensor], sample: int) -> Tensor:
    """g [rows, cols] fp32 for arbitrary ids `vocab_ids` [rows, cols] in sample `sample`.

    Id v takes word v % 4 of the Philox block at counter v // 4: one Philox call serves
    four consecutive ids (see `gumbel_noise_range`), and any id's noise can still be
    formed on its own.
    """
    words = _words(vocab_ids >> 2, keys, sample)
    return _gumbel_from_words(words.gather(-1, (vocab_ids & 3)[..., None])[..., 0])


def gumbel_noise_range(v0: int, v1: int, keys: tuple[Tensor, Tensor, Tensor, Tensor], sample: int) -> Tensor:
    """g [rows, v1 - v0] for the contiguous ids v0..v1-1: a quarter of the Philox calls."""
    first, last = v0 >> 2, (v1 - 1) >> 2
    groups = torch.arange(first, last + 1, device=keys[0].device)[None, :]
    words = _words(groups, keys, sample).flatten(1)
    offset = v0 - 4 * first
    return _gumbel_from_words(words[:, offset : offset + v1 - v0])


# --------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------


def kept_prefix(sorted_z: Tensor, lse: Tensor, options: SamplingOptions) -> Tensor:
    """Length [rows] of the kept prefix of ids sorted by (z desc, id asc); z at the temperature."""
    rows, cols = sorted_z.shape
    length = torch.full((rows,), cols, dtype=torch.int64, device=sorted_z.device)
    if options.top_k is not None:
        length = length.clamp_max(options.top_k)
    if options.top_p is not None and options.top_p < 1.0:
        # float64 mass: sums taken in another order (the dense fallback's buckets) agree
        # with this prefix sum to ~1e-16, not to fp32's ~1e-7 at a 1e-5 boundary step.
        probs = (sorted_z.double() - lse.double()[:, None]).exp()
        ranks = torch.arange(cols, device=sorted_z.device)
        probs = torch.where(ranks[None, :] < length[:, None], probs, 0.0)
        mass = probs.cumsum(dim=1)
        if options.top_k is not None:
            # Renormalised within the top-k; without top_k the whole row's mass is 1, which
            # a prefix of candidates (not the whole row) must not renormalise away.
            mass = mass / probs.sum(dim=1, keepdim=True)
        # Shortest prefix reaching top_p: one plus the count of prefixes still short of it.
        nucleus = (mass < options.top_p).sum(dim=1) + 1
        length = torch.minimum(length, nucleus)
    if options.min_p is not None and options.min_p > 0.0:
        threshold = sorted_z[:, :1] + math.log(options.min_p)
        length = torch.minimum(length, (sorted_z >= threshold).sum(dim=1))
    return length.clamp_min(1)


# Bits of the order key that name a bucket in the nucleus search: 2**14 buckets per row,
# each spanning 1/32 of an octave, so the boundary's bucket holds ~1% of a flat row.
NUCLEUS_BUCKET_BITS = 14
# Rows one nucleus search takes: its float64 bucket table is rows x 2**NUCLEUS_BUCKET_BITS
# (8 MiB at 64 rows), and rows << NUCLEUS_BUCKET_BITS indexes it in int32 (a whole batch
# of 131072 rows or more overflowed it; 30000 rows took a 4 GiB table).
NUCLEUS_ROWS = 64


def _order_keys(z: Tensor) -> Tensor:
    """int32 keys ordered as the fp32 values `z` (NaN-free); -0 is keyed as +0, its equal."""
    bits = (z + 0.0).view(torch.int32)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: larger magnitude, smaller key


def nucleus_mask(z: Tensor, lse: Tensor, top_p: float) -> Tensor:
    """bool [rows, V]: the ids `kept_prefix` keeps for `top_p` (no top_k), without a sort.

    The prefix of ids by (z desc, id asc) keeps an id when the mass before it is below
    top_p. One pass sums the mass per bucket of the ids' order keys; the bucket where the
    mass from above crosses top_p is the only one whose ids need ordering: every id in
    a higher bucket is kept, none in a lower one. Sorting those few ids (by key desc, id
    asc) and adding the mass above their bucket gives each its mass before it, in
    float64 as `kept_prefix` sums: the two agree but where a prefix's mass is within
    ~1e-14 of top_p.
    """
    rows, vocab = z.shape
    bits = NUCLEUS_BUCKET_BITS
    probs = z.double().sub_(lse.double()[:, None]).exp_()
    keys = _order_keys(z)
    buckets = (keys >> (32 - bits)) + (1 << (bits - 1))  # the arithmetic shift spans +-2**(bits-1)
    flat = (buckets + torch.arange(0, rows << bits, 1 << bits, device=z.device)[:, None].to(torch.int32)).flatten()
    mass = torch.bincount(flat, weights=probs.flatten(), minlength=rows << bits).view(rows, 1 << bits)
    at_or_above = mass.flip(1).cumsum(1).flip(1)  # [r, b]: the mass of buckets >= b
    boundary = ((at_or_above >= top_p).sum(1) - 1).clamp_min(0)
    above = torch.cat([at_or_above, torch.zeros_like(at_or_above[:, :1])], 1).gather(1, boundary[:, None] + 1)[:, 0]
    row, col = (buckets == boundary[:, None].to(torch.int32)).nonzero(as_tuple=True)  # row-major: ids ascending
    order = torch.sort(keys[row, col], descending=True, stable=True).indices
    order = order[torch.sort(row[order], stable=True).indices]
    row, col = row[order], col[order]
    p = probs[row, col]
    # The mass before each of the bucket's ids: the buckets above plus its row's earlier ids.
    running = p.cumsum(0)
    starts = torch.searchsorted(row, torch.arange(rows, device=z.device))
    before = running - p - torch.cat([running.new_zeros(1), running])[starts][row] + above[row]
    kept = buckets > boundary[:, None].to(torch.int32)
    kept[row[before < top_p], col[before < top_p]] = True
    # A row whose mass sums below top_p (rounding) keeps every id, as the prefix does.
    return kept | (at_or_above[:, :1] < top_p)


def sorted_kept_mask(z: Tensor, lse: Tensor, options: SamplingOptions) -> Tensor:
    """bool [rows, V]: the ids `kept_prefix` keeps, from the stably sorted rows."""
    sorted_z, order = torch.sort(z, dim=1, descending=True, stable=True)
    length = kept_prefix(sorted_z, lse, options)
    ranks = torch.arange(z.shape[1], device=z.device)
    return torch.zeros_like(z, dtype=torch.bool).scatter_(1, order, ranks[None, :] < length[:, None])


def kept_mask(z: Tensor, lse: Tensor, options: SamplingOptions) -> Tensor:
    """bool [rows, V]: the ids `kept_prefix` keeps for top_p and min_p, for options without top_k.

    On the CPU without sorting (`nucleus_mask`), where rows are wider than its bucket
    table (a narrower row sorts in less time than the search takes over 2**14 buckets). A
    GPU sorts rows fast, and its bincount adds in no fixed order (an error under
    `torch.use_deterministic_algorithms`): there the rows are sorted.
    """
    if z.device.type != "cpu" or z.shape[1] <= 1 << NUCLEUS_BUCKET_BITS:
        return sorted_kept_mask(z, lse, options)
    kept = torch.ones_like(z, dtype=torch.bool)
    if options.top_p is not None and options.top_p < 1.0:
        for r0 in range(0, z.shape[0], NUCLEUS_ROWS):
            kept[r0 : r0 + NUCLEUS_ROWS] = nucleus_mask(z[r0 : r0 + NUCLEUS_ROWS], lse[r0 : r0 + NUCLEUS_ROWS],
                                                        options.top_p)
    if options.min_p is not None and options.min_p > 0.0:
        kept &= z >= z.amax(dim=1, keepdim=True) + math.log(options.min_p)
    return kept


# --------------------------------------------------------------------------------------
# Reference (the `torch` backend of both functions)
# --------------------------------------------------------------------------------------


def reference_sample(raw_logits: Tensor, options: SamplingOptions, seed: int | Tensor,
                     positions: Tensor | None) -> Sample:
    """Sample from dense logits [B, V] (softcap already applied), fp32 math throughout."""
    raw = raw_logits.float()
    rows, vocab = raw.shape
    lse_raw = torch.logsumexp(raw, dim=1)
    n = options.num_samples
    if options.greedy:
        ids = torch.argmax(raw, dim=1, keepdim=True).expand(rows, n)
        raw_logprobs = raw.gather(1, ids) - lse_raw[:, None]
        return Sample(ids.contiguous(), torch.zeros(rows, n, device=raw.device), raw_logprobs, lse_raw)
    z = at_temperature(raw, options.temperature)
    lse = torch.logsumexp(z, dim=1)
    kept = sorted_kept_mask(z, lse, options)
    kept_lse = torch.logsumexp(torch.where(kept, z, -math.inf), dim=1)
    keys = row_keys(seed, positions, rows, raw.device)
    draws = []
    for j in range(n):
        score = torch.where(kept, z + gumbel_noise_range(0, vocab, keys, j), -math.inf)
        draws.append(torch.argmax(score, dim=1))  # first maximum: ties to the lower id
    ids = torch.stack(draws, dim=1)
    logprobs = z.gather(1, ids) - kept_lse[:, None]
    raw_logprobs = raw.gather(1, ids) - lse_raw[:, None]
    return Sample(ids, logprobs, raw_logprobs, lse_raw)


def sample_from_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, min_p: float | None = None, seed: int | Tensor = 0,
                       positions: Tensor | None = None, num_samples: int = 1) -> Sample:
    """Sample `num_samples` ids per row of existing `logits` [B, V] (see the module docstring)."""
    from ..backends import triton_supported

    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise ValueError(f"logits must be a floating tensor of shape [B, V], got {logits.dtype} "
                         f"of shape {tuple(logits.shape)}")
    if logits.shape[1] < 1:
        raise ValueError("logits must have at least one column (V >= 1)")
    if bool(torch.isnan(logits).any()):
        raise ValueError("logits must not contain NaN")
    empty = (logits == -math.inf).all(dim=1).nonzero()[:, 0]
    if len(empty):  # no distribution to sample from: the draw would be id 0 with NaN logprobs
        raise ValueError(f"logits must hold a finite value in every row; {len(empty)} row(s) are all -inf, "
                         f"the first row {int(empty[0])}")
    options = SamplingOptions(temperature, top_k, top_p, min_p, num_samples)
    if options.top_k is not None and options.top_k > logits.shape[1]:
        raise ValueError(f"top_k must be <= V = {logits.shape[1]}, got {options.top_k}")
    _check_seed_and_positions(seed, positions, logits.shape[0], logits.device)
    with torch.no_grad():
        if options.top_k is not None and not options.greedy and logits.is_cuda and triton_supported():
            from .triton.truncation import triton_top_k_sample

            return triton_top_k_sample(logits, options, seed, positions)
        if options.greedy or options.top_k is not None:
            return reference_sample(logits, options, seed, positions)
        # The same draws without sorting rows or forming a whole row block's noise at once;
        # on a GPU in three kernel launches (the torch ops' Philox passes are ~100 launches
        # of [B, V] int64 work a sample, their kept set ~30 more).
        if logits.is_cuda and triton_supported():
            from .triton.truncation import triton_truncated_sample

            return triton_truncated_sample(logits, options, seed, positions)
        return _dense_truncated_sample(logits, options, seed, positions, torch_draws)


def _check_seed_and_positions(seed, positions, rows: int, device: torch.device) -> None:
    if isinstance(seed, Tensor):
        if seed.dtype != torch.int64 or seed.shape not in ((), (rows,)):
            raise ValueError(f"seed must be an int or an int64 tensor [B] = [{rows}], "
                             f"got {seed.dtype} of shape {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"seed must be on the logits' device {device}, got {seed.device}")
    elif isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or an int64 tensor, got {type(seed).__name__}")
    elif not -(1 << 63) <= seed < (1 << 63):
        raise ValueError(f"seed must fit in 64 bits (-2**63 <= seed < 2**63), got {seed}")
    if positions is not None:
        if not isinstance(positions, Tensor) or positions.shape != (rows,) or not is_integer_dtype(positions.dtype):
            raise ValueError(f"positions must be an integer tensor [B] = [{rows}], got {positions!r:.80}")
        if positions.device != device:
            raise ValueError(f"positions must be on the logits' device {device}, got {positions.device}")


# --------------------------------------------------------------------------------------
# Chunked (`linear_sample` without [B, V] logits)
# --------------------------------------------------------------------------------------

# Candidates gathered per row for truncated sampling; a nucleus or min-p set that is not
# settled within them takes the exact fallback (those rows' logits, a few rows at a time).
CANDIDATES = 256
# Noise values per row block x id block the CPU sweep forms at once (see _sweep_sample).
NOISE_BLOCK_CPU = 1 << 20
# Peak bytes an id of a sweep's noise block takes (the Philox words and rounds in int64,
# the float64 transform, the score; the block's tempered logits): 20 for the noise and
# score measured with tests/memory_tracking.py, 4 for the tempered logits.
NOISE_BYTES_PER_ID = 24


def noise_block_columns(rows: int, budget: int, device: torch.device) -> int:
    """Ids per row of a sweep's noise block: within the sweep's workspace `budget`, so
    that the noise is bounded as the tile is (a whole 256 MiB tile's noise would be
    1.5 GB on a GPU); on the CPU also within NOISE_BLOCK_CPU, where the Philox rounds'
    passes over their operands stay in cache (220 ms against 63 ms for 64 x 151936 ids,
    measured). On a GPU the budget's default (256 MiB) holds one block for a batch of 64
    rows of a 152k vocabulary, so the launches stay few."""
    ids = budget // NOISE_BYTES_PER_ID
    if device.type == "cpu":
        ids = min(ids, NOISE_BLOCK_CPU)
    return max(ids // max(rows, 1), 1)


@dataclass(frozen=True)
class SweepDraws:
    """What a sweep of the vocabulary (or of a shard of it) leaves: each draw's winner and
    its score and logit as computed, so that shards compare winners exactly."""

    ids: Tensor  # [B, n] int64
    score: Tensor  # [B, n] fp32: z + noise, or z itself when greedy
    raw: Tensor  # [B, n] fp32: the winners' logits at temperature 1
    lse_raw: Tensor  # [B] fp32
    lse_z: Tensor  # [B] fp32 (unused when greedy)

    def sample(self, options: SamplingOptions) -> Sample:
        raw_logprobs = self.raw - self.lse_raw[:, None]
        if options.greedy:
            return Sample(self.ids, torch.zeros_like(raw_logprobs), raw_logprobs, self.lse_raw)
        logprobs = at_temperature(self.raw, options.temperature) - self.lse_z[:, None]
        return Sample(self.ids, logprobs, raw_logprobs, self.lse_raw)


def _sweep_sample(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                  options: SamplingOptions, keys, workspace_bytes: int | None, id_offset: int = 0) -> SweepDraws:
    """Untruncated or greedy sampling in one pass: online lse and a running Gumbel argmax.

    `id_offset`: the vocabulary id of weight's first row (a shard's), which names the
    noise and the drawn ids. At temperature 1 z is the raw logit (raw / 1 exactly) and its
    lse the raw one: no division and one fold.
    """
    from ..loss.chunked import Workspace, logits_tile, plan_chunks, workspace_budget
    from ..loss.options import LossOptions
    from .topk import SWEEP_CPU_MIN_TILE, SWEEP_CPU_ROWS, fold_lse_

    raw_options = LossOptions(softcap=softcap, workspace_bytes=workspace_bytes)
    rows, vocab = x.shape[0], weight.shape[0]
    n = options.num_samples
    tempered = not options.greedy and options.temperature != 1.0
    plan = plan_chunks(rows, vocab, x.dtype, x.device, raw_options, SWEEP_CPU_ROWS,
                       SWEEP_CPU_MIN_TILE)
    budget = workspace_budget(vocab, x.dtype, x.device, raw_options, SWEEP_CPU_ROWS)
    ws = Workspace(plan, x.dtype, x.device, softcap is not None)
    dev = x.device
    ids = torch.zeros(rows, n, dtype=torch.int64, device=dev)
    best_raw = torch.zeros(rows, n, dtype=torch.float32, device=dev)
    lse_raw = torch.empty(rows, dtype=torch.float32, device=dev)
    lse_z = torch.empty(rows, dtype=torch.float32, device=dev)
    scores = torch.empty(rows, n, dtype=torch.float32, device=dev)
    for r0 in range(0, rows, plan.rows):
        r1 = min(r0 + plan.rows, rows)
        chunk_keys = tuple(k[r0:r1] for k in keys)
        best_score = torch.full((r1 - r0, n), -math.inf, device=dev)
        raw_max = torch.full((r1 - r0,), -math.inf, device=dev)
        raw_sum = torch.zeros(r1 - r0, device=dev)
        z_max = torch.full((r1 - r0,), -math.inf, device=dev)
        z_sum = torch.zeros(r1 - r0, device=dev)
        for v0 in range(0, vocab, plan.tile):
            v1 = min(v0 + plan.tile, vocab)
            raw, _ = logits_tile(ws, x[r0:r1], weight, bias, v0, v1, raw_options)
            raw = raw.float()
            block = noise_block_columns(r1 - r0, budget, dev)
            for c0 in range(0, v1 - v0, block):
                c1 = min(c0 + block, v1 - v0)
                first = v0 + c0 + id_offset
                raw_block = raw[:, c0:c1]
                z = at_temperature(raw_block, options.temperature) if tempered else raw_block
                for j in range(n):
                    score = z
                    if not options.greedy:
                        score = score + gumbel_noise_range(first, first + c1 - c0, chunk_keys, j)
                    block_best, local = score.max(dim=1)  # first maximum: the lowest id of the block
                    better = block_best > best_score[:, j]  # strictly: earlier blocks hold lower ids
                    best_score[:, j] = torch.where(better, block_best, best_score[:, j])
                    ids[r0:r1, j] = torch.where(better, local + first, ids[r0:r1, j])
                    block_raw = raw_block.gather(1, local[:, None])[:, 0]
                    best_raw[r0:r1, j] = torch.where(better, block_raw, best_raw[r0:r1, j])
                fold_lse_(raw_max, raw_sum, raw_block)
                if tempered:
                    fold_lse_(z_max, z_sum, z)
        lse_raw[r0:r1] = raw_max + raw_sum.log()
        lse_z[r0:r1] = z_max + z_sum.log() if tempered else lse_raw[r0:r1]
        scores[r0:r1] = best_score
    return SweepDraws(ids, scores, best_raw, lse_raw, lse_z)


def _refuse_nan_rows(nan: Tensor) -> None:
    """Raises if any row of the bool mask `nan` [N] is set (its logits hold a NaN)."""
    nan_rows = nan.nonzero()[:, 0]
    if len(nan_rows):
        raise ValueError(f"linear_sample: the logits (input @ weight.T + bias) must not contain NaN; "
                         f"{len(nan_rows)} row(s) do, the first row {int(nan_rows[0])}")


def _candidate_sample(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                      options: SamplingOptions, seed, positions, keys: tuple | None, workspace_bytes: int | None,
                      backend: str = "chunked", top=None, dense_logits=None, vocab_size: int | None = None
                      ) -> Sample:
    """Truncated sampling from each row's top candidates, with an exact dense fallback.

    The candidates and the lse at temperature 1 come from one top-k pass over the
    vocabulary: the Triton kernel with `backend` "triton", csrc/'s `row_topk` with "cuda",
    the chunked sweep otherwise. `keys`: the rows' Philox words (`row_keys`), or None
    where the caller has not formed them.
    """
    from ..loss.options import LossOptions
    from .topk import topk_candidates

    vocab = weight.shape[0] if vocab_size is None else vocab_size
    num_candidates = min(vocab, max(CANDIDATES, options.top_k or 0))
    z_options = LossOptions(softcap=softcap, temperature=options.temperature, workspace_bytes=workspace_bytes)
    if dense_logits is None:
        dense_logits = _tile_logits if backend == "chunked" else _dense_logits
    # Sampling among the candidates and the dense fallback's sampler: kernels of the
    # backend's own where it has them.
    candidate_sample = torch_candidate_sample
    dense_sampler = TORCH_DENSE_SAMPLER
    if backend == "triton":
        from .triton.truncation import triton_candidate_sample, triton_truncated_sample

        candidate_sample, dense_sampler = triton_candidate_sample, DenseSampler(triton_truncated_sample, 0)
    elif backend == "cuda":
        from .cuda import cuda_dense_draws

        dense_sampler = DenseSampler(functools.partial(_dense_truncated_sample, draws=cuda_dense_draws),
                                     DENSE_BYTES_PER_LOGIT)
    if top is None:
        # Without top_k every row the candidates do not settle has an exact home, the dense
        # fallback: the threshold top-k's own unsettled rows go there too (the triton top-k
        # then need not wait on the device to find them).
        top = functools.partial(topk_candidates, backend=backend, settle=options.top_k is not None)
    cand = top(x, weight, bias, num_candidates, z_options, raw_lse=options.temperature != 1.0)
    # The candidates' own logits, not logprobs + lse: that would round each once more and
    # could split equal logits, or move one across the kept set's boundary.
    lse_z = cand.lse.float()
    lse_raw = lse_z if cand.lse_raw is None else cand.lse_raw.float()
    sample, unsettled = candidate_sample(cand.ids, cand.values.float(), lse_z, lse_raw, options, seed, positions,
                                         keys, vocab, cand.settled)
    if len(unsettled):
        _dense_fallback(sample, x, weight, bias, softcap, options, seed, positions, unsettled, workspace_bytes,
                        dense_logits, vocab, dense_sampler)
    return sample


def torch_candidate_sample(cand_ids: Tensor, cand_z: Tensor, lse_z: Tensor, lse_raw: Tensor,
                           options: SamplingOptions, seed, positions, keys, vocab: int,
                           exact: Tensor | None = None) -> tuple[Sample, Tensor]:
    """(Sample, the rows the candidates leave unsettled) from each row's top candidates
    `cand_ids`, `cand_z` [N, C] (tempered logits by (z desc, id asc)) and the rows' lse of z
    and of the raw logits [N], in torch ops; raises on a row whose lse is NaN. `keys`:
    `row_keys(seed, positions)`, or None to form them here. `exact` [N] bool: the rows
    whose candidates are exact (`Candidates.settled`; None: all), the others unsettled."""
    # A NaN logit makes its row's lse NaN. No score then equals the row's best, and the
    # draw below would return the out-of-range id V. This path waits for the host on its
    # unsettled rows anyway: one more short wait.
    _refuse_nan_rows(lse_z.isnan())
    rows, num_candidates = cand_z.shape
    if keys is None:
        keys = row_keys(seed, positions, rows, cand_z.device)
    length = kept_prefix(cand_z, lse_z, options)
    settled = _settled(length, options, num_candidates, vocab)
    if exact is not None:
        settled &= exact
    ranks = torch.arange(num_candidates, device=cand_z.device)
    kept_z = torch.where(ranks[None, :] < length[:, None], cand_z, -math.inf)
    kept_lse = torch.logsumexp(kept_z, dim=1)
    ids = torch_candidate_draws(kept_z, cand_ids, keys, options.num_samples, vocab)
    position = (cand_ids[:, :, None] == ids[:, None, :]).int().argmax(dim=1)
    z_ids = cand_z.gather(1, position)
    sample = Sample(ids, z_ids - kept_lse[:, None], z_ids * options.temperature - lse_raw[:, None], lse_raw)
    return sample, (~settled).nonzero()[:, 0]


def torch_candidate_draws(z: Tensor, cand_ids: Tensor, keys: tuple[Tensor, Tensor, Tensor, Tensor],
                          num_samples: int, vocab: int) -> Tensor:
    """ids [N, num_samples]: Gumbel-max draws among candidates `cand_ids` [N, C] (any order)
    with tempered logits `z` [N, C] (-inf outside the kept set), in torch ops."""
    ids = torch.empty(z.shape[0], num_samples, dtype=torch.int64, device=z.device)
    for j in range(num_samples):
        score = z + gumbel_noise(cand_ids, keys, j)
        best = score.max(dim=1, keepdim=True).values
        # Equal scores go to the lower vocabulary id, as in the dense argmax.
        ids[:, j] = torch.where(score == best, cand_ids, vocab).min(dim=1).values
    return ids


def all_settled(options: SamplingOptions, num_candidates: int, vocab: int) -> bool:
    """Whether every row's kept prefix is known from its `num_candidates` top candidates:
    they are the whole vocabulary, or top_k alone truncates and they hold it."""
    return num_candidates == vocab or (options.top_k is not None and options.top_k <= num_candidates
                                       and options.top_p is None and options.min_p is None)


def _settled(length: Tensor, options: SamplingOptions, num_candidates: int, vocab: int) -> Tensor:
    """Rows whose kept prefix (of `length` [N] candidates) is known from the candidates alone."""
    if all_settled(options, num_candidates, vocab):
        return torch.ones(length.shape[0], dtype=torch.bool, device=length.device)
    # The prefix ends inside the candidates unless it takes all of them and could go on.
    return (length < num_candidates) | (options.top_k is not None and options.top_k <= num_candidates)


# Live bytes per logit in `_dense_truncated_sample` beside the logits themselves: the
# tempered copy, the float64 probabilities, the order keys with their bucket and flat
# bucket index, the masks, and a float64 row for logsumexp.
DENSE_BYTES_PER_LOGIT = 48
# The fallback's default workspace: on the CPU what stays near the caches; on a GPU, as
# the chunked sweep's: blocks of ~18 rows of a 152k vocabulary sampled in torch ops (64
# MiB held 4, so a flat head's 64 rows took 16 blocks of ~30 launches each), ~440 rows
# by the triton kernels, which need no memory beyond the logits.
DENSE_FALLBACK_BUDGET = 64 << 20
DENSE_FALLBACK_BUDGET_GPU = 256 << 20


def torch_draws(z: Tensor, keys: tuple[Tensor, Tensor, Tensor, Tensor], num_samples: int) -> Tensor:
    """ids [N, num_samples]: Gumbel-max draws over `z` [N, V] (-inf where not kept), in torch ops.

    The noise comes in blocks of ids, and a block's maximum replaces an earlier block's
    only when strictly greater, which keeps ties at the lower id as the dense argmax does.
    """
    rows, vocab = z.shape
    ids = torch.zeros(rows, num_samples, dtype=torch.int64, device=z.device)
    best = torch.full((rows, num_samples), -math.inf, device=z.device)
    block = max(NOISE_BLOCK_CPU // max(rows, 1), 1) if z.device.type == "cpu" else vocab
    for v0 in range(0, vocab, block):
        v1 = min(v0 + block, vocab)
        for j in range(num_samples):
            block_best, local = (z[:, v0:v1] + gumbel_noise_range(v0, v1, keys, j)).max(dim=1)
            better = block_best > best[:, j]
            best[:, j] = torch.where(better, block_best, best[:, j])
            ids[:, j] = torch.where(better, local + v0, ids[:, j])
    return ids


# (z [N, V] with -inf outside the kept set, row_keys' words, num_samples) -> ids [N, num_samples]
DrawFn = Callable[[Tensor, tuple[Tensor, Tensor, Tensor, Tensor], int], Tensor]


@dataclass(frozen=True)
class DenseSampler:
    """How the dense fallback samples a block of rows from their logits: `sample(raw_logits,
    options, seed, positions) -> Sample` (no top_k, not greedy), and the live bytes it
    takes per logit beside the logits themselves."""

    sample: Callable[[Tensor, SamplingOptions, int | Tensor, Tensor | None], Sample]
    bytes_per_logit: int


def _dense_truncated_sample(raw_logits: Tensor, options: SamplingOptions, seed: int | Tensor,
                            positions: Tensor | None, draws: DrawFn = torch_draws) -> Sample:
    """`reference_sample` without top_k or greedy (top_p / min_p or none), without sorting rows.

    Same kept sets (`kept_mask`), noise and draws (`draws`: these torch ops, or a
    backend's kernel over the same stream).
    """
    raw = raw_logits.float()
    rows, vocab = raw.shape
    lse_raw = torch.logsumexp(raw, dim=1)
    z = at_temperature(raw, options.temperature)
    lse = torch.logsumexp(z, dim=1)
    z.masked_fill_(~kept_mask(z, lse, options), -math.inf)  # in place: the fallback's memory is budgeted
    kept_lse = torch.logsumexp(z, dim=1)
    ids = draws(z, row_keys(seed, positions, rows, raw.device), options.num_samples)
    logprobs = z.gather(1, ids) - kept_lse[:, None]
    raw_logprobs = raw.gather(1, ids) - lse_raw[:, None]
    return Sample(ids, logprobs, raw_logprobs, lse_raw)


TORCH_DENSE_SAMPLER = DenseSampler(functools.partial(_dense_truncated_sample, draws=torch_draws),
                                   DENSE_BYTES_PER_LOGIT)


def _tile_logits(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, budget: int) -> Tensor:
    """softcap(x W^T + b) [rows, V] as the chunked sweep's tiles hold them (fp32; float64
    for float64; on the CPU a bf16 or fp16 GEMM's output rounded to its dtype first, as
    F.linear does), so the fallback rows of the chunked backend sample the logits its
    candidates came from, with the input dtype's GEMM rate (a bf16 head cast to fp32 took
    5x the GEMM on the CPU). `budget` is unused: the rows' logits are the workspace.
    """
    from ..loss.chunked import ChunkPlan, Workspace, logits_tile
    from ..loss.options import LossOptions

    rows, vocab = x.shape[0], weight.shape[0]
    ws = Workspace(ChunkPlan(rows, vocab), x.dtype, x.device, softcap is not None)
    logits, _ = logits_tile(ws, x, weight, bias, 0, vocab, LossOptions(softcap=softcap))
    return logits


def _dense_logits(x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, budget: int) -> Tensor:
    """softcap(x W^T + b) [rows, V] in the reference's compute dtype (fp32; float64 for
    float64): the unrounded fp32 products the triton and cuda backends' candidates come
    from (on CUDA one GEMM with an fp32 output; elsewhere W cast a slice at a time).

    Casting the whole head (the reference's way) would be a [V, d] fp32 copy: 2 GiB for a
    152k x 3584 bf16 head, in a path that promises a bounded workspace.
    """
    from ..loss.reference import compute_dtype

    dtype = compute_dtype(x.dtype)
    vocab, dim = weight.shape
    logits = torch.empty(x.shape[0], vocab, dtype=dtype, device=x.device)
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and "dtype_out" in torch.ops.aten.mm.overloads():
        # The tensor cores sum the exact bf16/fp16 products in fp32: the numbers of the
        # cast GEMM below in one launch, without casting W (an H100 took 130 fp32 GEMMs
        # and as many casts for 64 rows of a 152k x 3584 head).
        torch.ops.aten.mm.dtype_out(x, weight.T, torch.float32, out=logits)
    else:
        xc = x.to(dtype)
        step = max(1, budget // (dtype.itemsize * max(dim, 1)))
        for v0 in range(0, vocab, step):
            torch.mm(xc, weight[v0:v0 + step].to(dtype).T, out=logits[:, v0:v0 + step])
    if bias is not None:
        logits += bias.to(dtype)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


def _dense_fallback(sample: Sample, x: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None,
                    options: SamplingOptions, seed, positions, rows: Tensor, workspace_bytes: int | None,
                    dense_logits, vocab_size: int | None = None, sampler: DenseSampler | None = None) -> None:
    """Exact sampling for `rows` from their dense logits, a bounded number of rows at a time.

    `dense_logits(x_rows, weight, bias, softcap, budget)` builds them over `vocab_size`
    columns (`_tile_logits` or `_dense_logits` over weight's rows, or a vocabulary
    shard's gathered from every rank); `sampler` samples them (by default
    `_dense_truncated_sample` in torch ops). No row here has a top_k: `_settled` settles
    every row that one bounds, since the candidates are at least top_k.
    """
    if sampler is None:
        sampler = TORCH_DENSE_SAMPLER
    budget = workspace_bytes or (DENSE_FALLBACK_BUDGET if x.device.type == "cpu" else DENSE_FALLBACK_BUDGET_GPU)
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    # fp32 logits for many rows per GEMM (each block of rows reads all of W), the GEMM's
    # low-precision twin freed on return. A sampler that needs memory of its own takes
    # them a few rows at a time in the other half of the budget; one that needs none
    # (the triton kernels) takes the whole block.
    if sampler.bytes_per_logit:
        logit_rows = max(1, budget // (2 * 4 * vocab))
        sample_rows = max(1, budget // (2 * sampler.bytes_per_logit * vocab))
    else:
        logit_rows = sample_rows = max(1, budget // (4 * vocab))
    per_row_seeds = isinstance(seed, Tensor) and seed.dim() == 1
    for i in range(0, len(rows), logit_rows):
        logit_block = rows[i : i + logit_rows]
        logits = dense_logits(x[logit_block], weight, bias, softcap, budget // 4)
        for k in range(0, len(logit_block), sample_rows):
            block = logit_block[k : k + sample_rows]
            # Without positions a row is named by its index in the batch, but by its seed
            # alone when seeds are per row (`row_keys` then takes position 0, not the index).
            block_positions = positions[block] if positions is not None else None if per_row_seeds else block
            block_seed = seed[block] if per_row_seeds else seed
            dense = sampler.sample(logits[k : k + sample_rows], options, block_seed, block_positions)
            for out, value in zip(sample, dense):
                out[block] = value


# --------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------


def linear_sample(input: Tensor, weight: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None, min_p: float | None = None, seed: int | Tensor = 0,
                  positions: Tensor | None = None, num_samples: int = 1, bias: Tensor | None = None,
                  softcap: float | None = None, backend: str = "auto", workspace_bytes: int | None = None,
                  process_group=None, vocab_start: int = 0) -> Sample:
    """Sample from `softcap(input @ weight.T + bias)` [B, V] without building it (module docstring).

    `input` [B, d] is the last hidden state of each row. `backend`: "auto" (triton on
    CUDA, else chunked), "torch" (dense logits: the reference), "chunked", "triton" or
    "cuda" (the csrc/ extension; triton and cuda take fp16, bf16 or fp32 input; every
    backend draws the same ids for the same seed, but at float ties). `process_group`,
    `vocab_start`: vocabulary parallelism as in `linear_cross_entropy` (each rank runs the
    chunked sweep on its shard; every rank gets the same draws).
    """
    from ..backends import check_backend_dtype, resolve_backend
    from ..loss.options import LossOptions
    from ..parallel import make_shard
    from ..loss.reference import reference_logits
    from ..validation import check_linear

    check_linear(input, weight, bias)
    if input.dim() != 2:
        raise ValueError(f"input must have shape [B, d], got {tuple(input.shape)}")
    options = SamplingOptions(temperature, top_k, top_p, min_p, num_samples)
    shard = make_shard(process_group, vocab_start, weight)
    vocab_size = weight.shape[0] if shard is None else shard.vocab_size
    if options.top_k is not None and options.top_k > vocab_size:
        raise ValueError(f"top_k must be <= V = {vocab_size}, got {options.top_k}")
    LossOptions(softcap=softcap, workspace_bytes=workspace_bytes)  # validates both
    _check_seed_and_positions(seed, positions, input.shape[0], input.device)
    name = resolve_backend(backend, input.device, input.dtype)
    check_backend_dtype(name, input.dtype)
    if torch.compiler.is_compiling():
        from ..library import linear_sample_op

        row_seeds = seed if isinstance(seed, Tensor) else None
        return Sample(*linear_sample_op(input, weight, bias, 0 if row_seeds is not None else seed, row_seeds,
                                        positions, float(temperature), top_k, top_p, min_p, num_samples, softcap,
                                        name, workspace_bytes))
    if bias is not None:
        bias = bias.float() if input.dtype != torch.float64 else bias
    with torch.no_grad():
        truncated = not options.greedy and (
            options.top_k is not None or (options.top_p is not None and options.top_p < 1.0)
            or (options.min_p is not None and options.min_p > 0.0))
        if shard is not None:
            from ..parallel import sharded_sample

            keys = row_keys(seed, positions, input.shape[0], input.device)
            return sharded_sample(input, weight, bias, softcap, options, seed, positions, keys, workspace_bytes,
                                  truncated, shard)
        if name == "torch":
            raw = reference_logits(input, weight, bias, LossOptions(softcap=softcap))
            sample = reference_sample(raw, options, seed, positions)
            if truncated:  # as the other backends' truncated sampling
                _refuse_nan_rows(sample.lse.isnan())
            return sample
        if name == "triton" and not truncated:
            from .triton import triton_sample

            return triton_sample(input, weight, bias, softcap, options,
                                 *philox_rows(seed, positions, input.shape[0], input.device))
        if truncated:
            return _candidate_sample(input, weight, bias, softcap, options, seed, positions, None, workspace_bytes,
                                     backend=name)
        keys = row_keys(seed, positions, input.shape[0], input.device)
        if name == "cuda":
            from .cuda import cuda_sample

            return cuda_sample(input, weight, bias, softcap, options, keys, workspace_bytes)
        return _sweep_sample(input, weight, bias, softcap, options, keys, workspace_bytes).sample(options)
