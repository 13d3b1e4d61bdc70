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
from typing import NamedTuple

import torch
from torch import Tensor

from ..backends import resolve_backend
from ..loss.chunked import logits_tile, Workspace, plan_chunks
from ..loss.options import LossOptions, _check_real
from ..loss.reference import compute_dtype, reference_logits
from ..validation import check_linear


class TopK(NamedTuple):
    """Result of `linear_topk` (N = flattened rows)."""

    ids: Tensor  # [N, k] int64, descending probability, ties to the lower id
    logprobs: Tensor  # [N, k] fp32, z[id] - lse
    lse: Tensor  # [N] fp32, log-sum-exp of z


# --------------------------------------------------------------------------------------
# Reference (the `torch` backend)
# --------------------------------------------------------------------------------------


def reference_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [N, k], logprobs [N, k], lse [N]) of 2-D `x` in the compute dtype, from dense logits."""
    z = reference_logits(x, weight, bias, options)
    lse = torch.logsumexp(z, dim=1)
    values, ids = torch.sort(z, dim=1, descending=True, stable=True)
    return ids[:, :k], values[:, :k] - lse[:, None], lse


# --------------------------------------------------------------------------------------
# Tile kernels
# --------------------------------------------------------------------------------------


def _tile_candidates(z: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The exact top-min(k, cols) of each row of `z`: (values, local ids), ids ascending.

    `torch.topk` picks arbitrarily among values equal to the k-th one, so its answer is
    kept only when no other entry equals that value; otherwise the tile takes every
    entry above the k-th value and the lowest-id entries equal to it. NaN ranks above
    everything, as in a descending `torch.sort`.
    """
    rows, cols = z.shape
    kk = min(k, cols)
    values, local = torch.topk(z, kk, dim=1, sorted=False)
    kth = values.amin(dim=1, keepdim=True)
    if bool(((z >= kth).sum(dim=1) == kk).all()):
        local = local.sort(dim=1).values  # ids ascending: equal values stay in id order
        return z.gather(1, local), local
    # Ties at the k-th value (or NaN): select by mask, lowest ids first among the ties.
    if bool(values.isnan().any()):
        kth = torch.where(values.isnan().any(dim=1, keepdim=True),
                          torch.where(values.isnan(), math.inf, values).amin(dim=1, keepdim=True), kth)
        # A row holding >= kk NaNs has its k-th value at NaN.
        many_nan = z.isnan().sum(dim=1, keepdim=True) >= kk
        kth = torch.where(many_nan, math.nan, kth)
        z_nan = z.isnan()
        above = (z > kth) | (z_nan & ~kth.isnan())
        equal = (z == kth) | (z_nan & kth.isnan())
    else:
        above = z > kth
        equal = z == kth
    need = kk - above.sum(dim=1, keepdim=True)
    selected = above | (equal & (equal.cumsum(dim=1, dtype=torch.int32) <= need))
    local = selected.nonzero()[:, 1].view(rows, kk)  # row-major: ids ascending per row
    return z.gather(1, local), local


def _merge(best_values: Tensor, best_ids: Tensor, values: Tensor, ids: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The top-k of the union, ordered by (value desc, id asc).

    Every id in `best_ids` is below every id in `ids` (tiles come in vocabulary order)
    and both sets list equal values in id order, so a stable descending sort of the
    concatenation orders ties by id.
    """
    values = torch.cat([best_values, values], dim=1)
    ids = torch.cat([best_ids, ids], dim=1)
    values, order = torch.sort(values, dim=1, descending=True, stable=True)
    return values[:, :k], ids.gather(1, order[:, :k])


# --------------------------------------------------------------------------------------
# Chunked sweep
# --------------------------------------------------------------------------------------


def chunked_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options: LossOptions
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [N, k], logprobs [N, k], lse [N]) of 2-D `x` in the compute dtype, tile by tile."""
    num_rows = x.shape[0]
    vocab_size = weight.shape[0]
    cdt = compute_dtype(x.dtype)
    plan = plan_chunks(num_rows, vocab_size, x.dtype, x.device, options)
    ws = Workspace(plan, x.dtype, x.device, options.softcap is not None)
    out_ids = torch.empty(num_rows, k, dtype=torch.int64, device=x.device)
    out_logprobs = torch.empty(num_rows, k, dtype=cdt, device=x.device)
    lse = torch.empty(num_rows, dtype=cdt, device=x.device)
    for r0 in range(0, num_rows, plan.rows):
        r1 = min(r0 + plan.rows, num_rows)
        x_rows = x[r0:r1]
        n = r1 - r0
        best_values = torch.empty(n, 0, dtype=cdt, device=x.device)
        best_ids = torch.empty(n, 0, dtype=torch.int64, device=x.device)
        row_max = torch.full((n,), -math.inf, dtype=cdt, device=x.device)
        row_sum = torch.zeros(n, dtype=cdt, device=x.device)
        for v0 in range(0, vocab_size, plan.tile):
            v1 = min(v0 + plan.tile, vocab_size)
            z, _ = logits_tile(ws, x_rows, weight, bias, v0, v1, options)
            values, local = _tile_candidates(z, k)
            best_values, best_ids = _merge(best_values, best_ids, values, local + v0, k)
            new_max = torch.maximum(row_max, z.amax(dim=1))
            row_sum = row_sum * (row_max - new_max).exp() + z.sub_(new_max[:, None]).exp_().sum(dim=1)
            row_max = new_max
        lse[r0:r1] = row_max + row_sum.log()
        out_ids[r0:r1] = best_ids
        out_logprobs[r0:r1] = best_values - lse[r0:r1, None]
    return out_ids, out_logprobs, lse


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
) -> TopK:
    """The `k` most probable ids of `softmax(softcap(input @ weight.T + bias) / temperature)`.

    Args:
        input: hidden states [..., d]; the leading dims are flattened into N rows.
        weight: LM head [V, d], input's dtype and device.
        k: how many ids per row, 1 <= k <= V.
        bias: [V] or None, added to the logits in the compute dtype.
        softcap: None or c > 0, logits become c * tanh(logits / c) before the temperature.
        temperature: > 0, divides the (softcapped) logits.
        backend: "auto" (chunked; triton is not implemented for linear_topk yet),
            "torch" (materialises fp32 [N, V] logits) or "chunked".
        workspace_bytes: chunked only, the budget of the reused logits tile
            (None: a per-device default; >= 4096).

    Returns:
        TopK(ids [N, k] int64 in descending probability with ties to the lower id,
        logprobs [N, k] fp32 = z[id] - lse, lse [N] fp32). Logits are computed in fp32
        (float64 for float64 input). No gradients flow through the result.
    """
    check_linear(input, weight, bias)
    vocab_size = weight.shape[0]
    k = _check_k(k, vocab_size)
    options = _topk_options(softcap, temperature, workspace_bytes)
    if backend == "triton":
        raise ValueError("backend='triton' is not implemented for linear_topk yet; "
                         "use backend='auto', 'chunked' or 'torch'")
    name = resolve_backend(backend, input.device)
    if name == "triton":  # "auto" on CUDA: no Triton top-k kernel yet
        name = "chunked"
    x = input.reshape(-1, input.shape[-1])
    with torch.no_grad():
        if bias is not None:
            bias = bias.to(compute_dtype(input.dtype))
        if name == "torch":
            ids, logprobs, lse = reference_topk(x, weight, bias, k, options)
        else:
            ids, logprobs, lse = chunked_topk(x, weight, bias, k, options)
    return TopK(ids.contiguous(), logprobs.float().contiguous(), lse.float().contiguous())
