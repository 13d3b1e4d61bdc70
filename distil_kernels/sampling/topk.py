"""`linear_topk`: the k most probable ids of `softcap(x W^T + b) / T` and their log-probs.

This is how an expert's sparse distribution is made from its hidden states (DESIGN.md,
"Sampling core"). Ids come in descending probability with ties to the lower id, exactly,
on every backend; `logprobs` are exact log-softmax values `z[id] - lse`.

- `torch`: dense [N, V] logits from the loss core's `reference_logits` and a stable
  descending sort (equal values keep the lower id first). The ground truth of the tests.
- `chunked`: the loss core's token chunks x vocabulary tiles. Each tile's exact top
  candidates are merged into a running [n, k] set and folded into an online
  log-sum-exp in the same pass; no [N, V] tensor exists.

Order: reference -> tile kernels -> chunked sweep -> public function.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import torch
from torch import Tensor

from ..backends import check_backend_dtype, resolve_backend
from ..parallel import make_shard, sharded_topk
from ..loss.chunked import logits_tile, Workspace, plan_chunks
from ..loss.options import LossOptions, _check_real
from ..loss.reference import compute_dtype, reference_logits
from ..validation import check_linear


class TopK(NamedTuple):
    """Result of `linear_topk` (N = flattened rows)."""

    ids: Tensor  # [N, k] int64, descending probability, ties to the lower id
    logprobs: Tensor  # [N, k] fp32, z[id] - lse
    lse: Tensor  # [N] fp32, log-sum-exp of z


class Candidates(NamedTuple):
    """A backend's top-k of 2-D rows: the candidates' own logits, not their log-probs.

    Truncated sampling and the merge of vocabulary shards compare candidates by their
    logits; `logprobs + lse` would round each once more, differently where the lse
    differs (one shard's against another's), and split equal logits apart.
    """

    ids: Tensor  # [N, k] int64, descending z, ties to the lower id
    values: Tensor  # [N, k] z = softcap(x W^T + b) / T at the ids, in the compute dtype
    lse: Tensor  # [N] log-sum-exp of z
    lse_raw: Tensor | None  # [N] log-sum-exp of softcap(x W^T + b), when asked for
    # [N] bool where rows may be left unsettled (`topk_candidates(settle=False)`): the
    # rows whose ids and values are exact; the lse stands in every row.
    settled: Tensor | None = None

    @property
    def logprobs(self) -> Tensor:
        return self.values - self.lse[:, None]


# --------------------------------------------------------------------------------------
# Reference (the `torch` backend)
# --------------------------------------------------------------------------------------


def reference_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                   raw_lse: bool = False) -> Candidates:
    """The top-k of 2-D `x` in the compute dtype, from dense logits."""
    z = reference_logits(x, weight, bias, options)
    lse = torch.logsumexp(z, dim=1)
    values, ids = torch.sort(z, dim=1, descending=True, stable=True)
    lse_raw = None
    if raw_lse:
        lse_raw = torch.logsumexp(reference_logits(x, weight, bias, replace(options, temperature=1.0)), dim=1)
    return Candidates(ids[:, :k], values[:, :k], lse, lse_raw)


# --------------------------------------------------------------------------------------
# Tile kernels
# --------------------------------------------------------------------------------------

# Rows per chunk the CPU default workspace aims at in the sampling sweeps (see plan_chunks).
SWEEP_CPU_ROWS = 256
# The narrowest vocabulary tile the CPU sweeps take to fit more rows in a chunk: each
# chunk reads all of W (fp32 GEMMs of 512 rows in 32768-column tiles took 8% longer
# than 1024 rows in 16384-column tiles), and 8192 columns added per-tile costs.
SWEEP_CPU_MIN_TILE = 16384
# Bytes of a tile's lse temporaries per block of rows (see _row_lse, fold_scaled_lse_).
LSE_BLOCK_BYTES = 4 << 20
# Columns per strided group of the CPU top-k prefilter (see _prefiltered_topk).
PREFILTER_GROUP = 16
# Extra entries a tile's top-k asks for, so that a run of values equal to the k-th one
# (a bf16 logit is one of 128 values per octave) usually ends inside them.
TIE_MARGIN = 16


def _tile_candidates(z: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The exact top-min(k, cols) of each row of `z`: (values, local ids, row lse).

    Candidates come ordered by (value desc, id asc). `torch.topk` picks arbitrarily
    among entries equal to the k-th value, and such ties are the rule for bf16 logits. So
    it is asked for `TIE_MARGIN` more entries than needed; ordering those with two small
    sorts (by id, then a stable one by value) settles the ties exactly whenever the whole
    run of entries equal to the k-th value fits inside them, which the last of them shows
    (it is strictly smaller). The few rows where it does not, and rows holding NaN, are
    redone by `_tied_candidates`.

    The row's log-sum-exp comes from `_row_lse` at the row's maximum.
    """
    rows, cols = z.shape
    kk = min(k, cols)
    if kk == cols:
        values, local = torch.sort(z, dim=1, descending=True, stable=True)
        return values, local, torch.logsumexp(z, dim=1)
    wide = min(cols, kk + TIE_MARGIN)
    values, local = _prefiltered_topk(z, wide)
    local, by_id = local.sort(dim=1)
    values, by_value = values.gather(1, by_id).sort(dim=1, descending=True, stable=True)
    local = local.gather(1, by_value)
    kth = values[:, kk - 1 : kk]
    has_nan = values.isnan().any(dim=1)  # topk ranks NaN first: a row holding one shows it here
    redo = has_nan if wide == cols else has_nan | ~(values[:, wide - 1] < kth[:, 0])
    lse = _row_lse(z, values[:, 0], local[:, 0])
    values, local = values[:, :kk], local[:, :kk]
    if bool(redo.any()):
        rows_to_redo = redo.nonzero()[:, 0]
        values[rows_to_redo], local[rows_to_redo] = _tied_candidates(
            z[rows_to_redo], kk, kth[rows_to_redo], bool(has_nan.any()))
    return values, local, lse


def _prefiltered_topk(z: Tensor, wide: int) -> tuple[Tensor, Tensor]:
    """`torch.topk(z, wide, dim=1, sorted=False)`, reading each row once on the CPU.

    The CPU `topk` copies every row into (value, index) pairs before partially sorting
    them, which costs as much as the tile's softmax. Here the columns form strided groups
    {g, g + G, g + 2G, ...}, whose maxima are one vectorised pass. At least `wide` entries
    reach the `wide`-th largest group maximum M, so the row's top `wide` are entries above
    M, all inside the top `wide` groups, and entries equal to M: the top `wide` of those
    groups' columns (and the columns left over past the last whole group) hold the same
    values. Ties at the `wide`-th value may resolve to other ids, as `torch.topk`'s do. A
    NaN makes its group's maximum NaN, which `topk` ranks first: it reaches the result.
    Other devices' `topk` is a radix select that reads the row once already.
    """
    rows, cols = z.shape
    groups = cols // PREFILTER_GROUP
    if z.device.type != "cpu" or groups < 4 * wide:
        return torch.topk(z, wide, dim=1, sorted=False)
    grid = z[:, : PREFILTER_GROUP * groups].view(rows, PREFILTER_GROUP, groups)
    _, top_groups = torch.topk(grid.amax(dim=1), wide, dim=1, sorted=False)
    strides = torch.arange(0, PREFILTER_GROUP * groups, groups, device=z.device)
    columns = (top_groups[:, None, :] + strides[:, None]).view(rows, -1)
    if PREFILTER_GROUP * groups < cols:
        rest = torch.arange(PREFILTER_GROUP * groups, cols, device=z.device)
        columns = torch.cat([columns, rest.expand(rows, -1)], dim=1)
    values, at = torch.topk(z.gather(1, columns), wide, dim=1, sorted=False)
    return values, columns.gather(1, at)


def lse_row_block(z: Tensor) -> int:
    """Rows of tile `z` per block of its lse temporaries: LSE_BLOCK_BYTES of them on the
    CPU (see `_row_lse`), the whole tile elsewhere (one launch)."""
    rows, cols = z.shape
    if z.device.type != "cpu":
        return max(rows, 1)
    return max(1, LSE_BLOCK_BYTES // max(cols * z.element_size(), 1))


def _row_lse(z: Tensor, row_max: Tensor, argmax: Tensor) -> Tensor:
    """log-sum-exp of each row of `z` [rows, cols], given its maximum and where it is.

    `log_softmax` at the maximum is exactly -log(sum(exp(z - max))): one fused pass
    instead of a max, a subtract, an exp and a sum. It runs on blocks of rows: a whole
    tile's output (32 MB at 256 x 32000) is an mmap the allocator returns to the kernel
    when freed, and faulting its pages back in on every tile cost more than the softmax
    (11.6 ms against 3.5 ms measured on the CPU); a few MiB come back from the heap.
    Other devices' caching allocators keep the memory: one launch there.
    """
    rows = z.shape[0]
    block = lse_row_block(z)
    at_max = torch.empty(rows, dtype=z.dtype, device=z.device)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        at_max[r0:r1] = torch.log_softmax(z[r0:r1], dim=1).gather(1, argmax[r0:r1, None])[:, 0]
    # A +inf logit makes log_softmax NaN there, and so does a row of -inf (a bias masking
    # every id of the tile); the row's lse is +inf or -inf, as logsumexp says.
    return torch.where(row_max.isinf(), row_max, row_max - at_max)


def _tied_candidates(z: Tensor, kk: int, kth: Tensor, any_nan: bool) -> tuple[Tensor, Tensor]:
    """Exact top-kk of rows with ties at their k-th value `kth` [rows, 1]: (values, ids).

    Ordered by (value desc, id asc) as `_tile_candidates`.

    Every entry at or above the k-th value (kk plus the ties, a short list) is gathered
    in id order, and a stable descending sort of that list keeps the lowest ids among the
    ties. NaN ranks above everything, as in a descending `torch.sort`.
    """
    rows = z.shape[0]
    if any_nan:
        nan = z.isnan()
        nan_count = nan.sum(dim=1, keepdim=True)
        ranked = torch.topk(z.masked_fill(nan, -math.inf), kk, dim=1).values
        numbers_needed = (kk - nan_count - 1).clamp_min(0)
        kth = torch.where(nan_count < kk, ranked.gather(1, numbers_needed), math.inf)
        selected = nan | (z >= kth)
    else:
        selected = z >= kth
    where = selected.nonzero()  # row-major: ids ascending within a row
    row, col = where[:, 0], where[:, 1]
    counts = torch.bincount(row, minlength=rows)
    starts = torch.cumsum(counts, 0) - counts
    width = int(counts.max()) if rows else kk
    slot = torch.arange(len(row), device=z.device) - starts[row]
    # Pad after each row's entries: a stable sort keeps padding behind equal real values.
    values = torch.full((rows, width), -math.inf, dtype=z.dtype, device=z.device)
    local = torch.zeros((rows, width), dtype=torch.int64, device=z.device)
    values[row, slot] = z[row, col]
    local[row, slot] = col
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :kk], local.gather(1, order[:, :kk])


def _merge(best_values: Tensor, best_ids: Tensor, values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k of the union, ordered by (value desc, id asc).

    Every id in `best_ids` is below every id in `ids` (tiles come in vocabulary order)
    and both sets list equal values in id order, so a stable descending sort of the
    concatenation orders ties by id. The first tile's candidates are the set as they are.
    """
    if best_values.shape[1] == 0:
        return values[:, :k], ids[:, :k]
    values = torch.cat([best_values, values], dim=1)
    ids = torch.cat([best_ids, ids], dim=1)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :k], ids.gather(1, order[:, :k])


# --------------------------------------------------------------------------------------
# Chunked sweep
# --------------------------------------------------------------------------------------


def fold_lse_(run_max: Tensor, run_sum: Tensor, values: Tensor, *, consume: bool = False) -> None:
    """Fold a tile into a running (max, sum of exp(v - max)) per row, in place.

    Rows that have seen only -inf keep sum 0 (their exponents shift by 0, not by -inf).
    The shifted exponentials take one buffer of `values`' size, none with `consume`
    (`values` is a temporary of the caller's, overwritten).
    """
    new_max = torch.maximum(run_max, values.amax(dim=1))
    shift = torch.where(new_max == -math.inf, 0.0, new_max)
    shifted = values.sub_(shift[:, None]) if consume else values - shift[:, None]
    run_sum.mul_((run_max - shift).exp()).add_(shifted.exp_().sum(dim=1))
    run_max.copy_(new_max)


def fold_scaled_lse_(run_max: Tensor, run_sum: Tensor, z: Tensor, scale: float) -> None:
    """`fold_lse_` of `z * scale`, in place: one buffer for the products, shifted and
    exponentiated where they are, on the CPU a block of rows of LSE_BLOCK_BYTES at a time.

    Formed over the whole tile, the products, their shifts and exponentials were three more
    tile-sized buffers beside the workspace's tile (37 MiB each for 64 rows of a 152k
    vocabulary: the top_p sweep's peak was four tiles, 149 MiB, for a 64 MiB budget).
    """
    rows = z.shape[0]
    block = lse_row_block(z)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        fold_lse_(run_max[r0:r1], run_sum[r0:r1], z[r0:r1] * scale, consume=True)


def chunked_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                 raw_lse: bool = False) -> Candidates:
    """The top-k of 2-D `x`, tile by tile, in the compute dtype.

    With `raw_lse` the same pass also folds the
    log-sum-exp of the logits at temperature 1 (z times the temperature), which truncated
    sampling needs beside the candidates: one sweep over the vocabulary, not two.
    """
    num_rows = x.shape[0]
    vocab_size = weight.shape[0]
    cdt = compute_dtype(x.dtype)
    plan = plan_chunks(num_rows, vocab_size, x.dtype, x.device, options, SWEEP_CPU_ROWS, SWEEP_CPU_MIN_TILE)
    ws = Workspace(plan, x.dtype, x.device, options.softcap is not None)
    out_ids = torch.empty(num_rows, k, dtype=torch.int64, device=x.device)
    out_values = torch.empty(num_rows, k, dtype=cdt, device=x.device)
    lse = torch.empty(num_rows, dtype=cdt, device=x.device)
    lse_raw = torch.empty(num_rows, dtype=cdt, device=x.device) if raw_lse else None
    for r0 in range(0, num_rows, plan.rows):
        r1 = min(r0 + plan.rows, num_rows)
        x_rows = x[r0:r1]
        n = r1 - r0
        best_values = torch.empty(n, 0, dtype=cdt, device=x.device)
        best_ids = torch.empty(n, 0, dtype=torch.int64, device=x.device)
        row_lse = torch.full((n,), -math.inf, dtype=cdt, device=x.device)
        raw_max = torch.full((n,), -math.inf, dtype=cdt, device=x.device)
        raw_sum = torch.zeros(n, dtype=cdt, device=x.device)
        for v0 in range(0, vocab_size, plan.tile):
            v1 = min(v0 + plan.tile, vocab_size)
            z, _ = logits_tile(ws, x_rows, weight, bias, v0, v1, options)
            values, local, tile_lse = _tile_candidates(z, k)
            best_values, best_ids = _merge(best_values, best_ids, values, local + v0, k)
            if raw_lse:
                fold_scaled_lse_(raw_max, raw_sum, z, options.temperature)
            row_lse = torch.logaddexp(row_lse, tile_lse)
        lse[r0:r1] = row_lse
        if raw_lse:
            lse_raw[r0:r1] = raw_max + raw_sum.log()
        out_ids[r0:r1] = best_ids
        out_values[r0:r1] = best_values
    return Candidates(out_ids, out_values, lse, lse_raw)


# --------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------


def _check_k(k: object, vocab_size: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int in [1, V] = [1, {vocab_size}], got {type(k).__name__}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V] = [1, {vocab_size}], got {k}")
    return k


def _topk_options(softcap: float | None, temperature: float, workspace_bytes: int | None) -> LossOptions:
    _check_real("temperature", temperature)
    if not temperature > 0.0:
        raise ValueError(
            f"temperature must be > 0 for linear_topk, got {temperature} (greedy decoding is "
            f"linear_sample(..., temperature=0), or linear_topk with k=1 at any temperature)"
        )
    if softcap is not None:
        _check_real("softcap", softcap)
        if not softcap > 0.0:
            raise ValueError(f"softcap must be None or > 0, got {softcap}")
    return LossOptions(softcap=softcap, temperature=temperature, workspace_bytes=workspace_bytes)


def linear_topk(
    input: Tensor,
    weight: Tensor,
    k: int,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    temperature: float = 1.0,
    backend: str = "auto",
    workspace_bytes: int | None = None,
    process_group=None,
    vocab_start: int = 0,
) -> TopK:
    """The `k` most probable ids of `softmax(softcap(input @ weight.T + bias) / temperature)`.

    Args:
        input: hidden states [..., d]; the leading dims are flattened into N rows.
        weight: LM head [V, d], input's dtype and device.
        k: how many ids per row, 1 <= k <= V.
        bias: [V] or None, added to the logits in the compute dtype.
        softcap: None or c > 0, logits become c * tanh(logits / c) before the temperature.
        temperature: > 0, divides the (softcapped) logits.
        backend: "auto" (triton on CUDA, else chunked), "torch" (materialises fp32
            [N, V] logits: the reference), "chunked", "triton" (fp16, bf16 or fp32
            input; k above 256 takes the chunked sweep, see sampling/triton/topk.py) or
            "cuda" (the csrc/ extension; k above 1024 takes the chunked sweep).
        workspace_bytes: chunked and cuda, the budget of the reused logits chunk
            (None: a per-device default, 2 GiB for cuda; >= 4096).
        process_group, vocab_start: vocabulary parallelism as in `linear_cross_entropy`:
            each shard's top-k, merged over the group; every rank gets the global result.

    Returns:
        TopK(ids [N, k] int64 in descending probability with ties to the lower id,
        logprobs [N, k] fp32 = z[id] - lse, lse [N] fp32). Logits are computed in fp32
        (float64 for float64 input). No gradients flow through the result.
    """
    check_linear(input, weight, bias)
    shard = make_shard(process_group, vocab_start, weight)
    vocab_size = weight.shape[0] if shard is None else shard.vocab_size
    k = _check_k(k, vocab_size)
    options = _topk_options(softcap, temperature, workspace_bytes)
    name = resolve_backend(backend, input.device, input.dtype)
    check_backend_dtype(name, input.dtype)
    x = input.reshape(-1, input.shape[-1])
    if shard is not None:
        with torch.no_grad():
            ids, logprobs, lse = sharded_topk(x, weight, bias, k, options, name, shard)
        return TopK(ids.contiguous(), logprobs.float().contiguous(), lse.float().contiguous())
    if torch.compiler.is_compiling():
        from ..library import linear_topk_op

        return TopK(*linear_topk_op(x, weight, bias, k, softcap, float(temperature), name, workspace_bytes))
    with torch.no_grad():
        top = topk_candidates(x, weight, bias, k, options, name)
    return TopK(top.ids.contiguous(), top.logprobs.float().contiguous(), top.lse.float().contiguous())


def topk_candidates(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions,
                    backend: str, raw_lse: bool = False, settle: bool = True) -> Candidates:
    """The top-k of 2-D `x` by the resolved `backend`; with `raw_lse` also the log-sum-exp
    at temperature 1, from the same pass (truncated sampling needs both). `settle=False`
    lets the triton backend leave the rows its threshold pass cannot settle as they are,
    flagged in `Candidates.settled`, without waiting on the device to find them."""
    if bias is not None:
        bias = bias.to(compute_dtype(x.dtype))
    if backend == "torch":
        return reference_topk(x, weight, bias, k, options, raw_lse)
    if backend == "triton":
        from .triton import triton_topk

        return triton_topk(x, weight, bias, k, options, raw_lse, settle=settle)
    if backend == "cuda":
        from .cuda import cuda_topk

        return cuda_topk(x, weight, bias, k, options, raw_lse)
    return chunked_topk(x, weight, bias, k, options, raw_lse)
