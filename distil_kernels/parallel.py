"""Vocabulary parallelism: the head's rows split over the ranks of a process group.

Rank r holds rows [vocab_start, vocab_start + V_r) of `weight` (and `bias`); ids stay
global. Each rank runs its backend's vocabulary pass on its shard, and a few collectives
over [N]-sized statistics make every rank's result the unsharded one:

- loss: the row log-sum-exp from an all-reduce of the shard maxima (MAX) and of the
  rescaled sums of exponentials (SUM); the logits at the target ids (each id lives on one
  shard, the others contribute 0) and the logit sums by SUM; the per-row algebra then
  runs identically everywhere. Backward: each rank's gradient pass on its shard with the
  global coefficients, d_input summed over ranks (in fp32), d_weight and d_bias local.
- top-k: each shard's top-k, all-gathered and merged by (value desc, id asc), against
  the all-reduced log-sum-exp.
- sampling: every rank draws the noise of its own global ids from the shared Philox
  stream and takes its Gumbel maxima; an all-gather picks the global argmax (ties to
  the lower id). Truncated sampling merges the shards' candidates the same way.

Collectives run on `process_group` with whatever backend it has (gloo on the CPU, NCCL
on GPUs). The global vocabulary size comes from one all-reduce of the shard sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class VocabShard:
    group: object  # a torch.distributed ProcessGroup
    start: int
    size: int  # rows on this rank
    vocab_size: int  # rows over all ranks

    def local_ids(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """(ids relative to the shard, 0 where outside; mask of those inside)."""
        local = ids - self.start
        inside = (local >= 0) & (local < self.size)
        return torch.where(inside, local, 0), inside


def make_shard(process_group, vocab_start, weight: Tensor) -> VocabShard | None:
    """The shard `weight` is, checked against the group; None without a process group."""
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int):
        raise TypeError(f"vocab_start must be an int, got {type(vocab_start).__name__}")
    if process_group is None:
        if vocab_start != 0:
            raise ValueError(f"vocab_start={vocab_start} needs a process_group (the ranks holding the rest of the "
                             f"vocabulary)")
        return None
    if torch.compiler.is_compiling():
        # The shard's collectives and the global vocabulary size (a host read) stay eager.
        raise NotImplementedError("vocabulary parallelism (process_group) is not traced by torch.compile; "
                                  "call the op outside the compiled region")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group was given but torch.distributed is not initialised")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    sizes = torch.tensor([weight.shape[0], vocab_start + weight.shape[0]], dtype=torch.int64,
                         device=_collective_device(weight, process_group))
    total = sizes[:1].clone()
    dist.all_reduce(total, group=process_group)
    end = sizes[1:].clone()
    dist.all_reduce(end, op=dist.ReduceOp.MAX, group=process_group)
    vocab_size = int(total.item())
    if int(end.item()) != vocab_size:
        raise ValueError(f"the shards do not tile the vocabulary: their sizes sum to {vocab_size} but the last one "
                         f"ends at {int(end.item())} (check every rank's vocab_start)")
    return VocabShard(process_group, vocab_start, weight.shape[0], vocab_size)


def _collective_device(t: Tensor, group) -> torch.device:
    # gloo reduces CPU tensors; NCCL, CUDA ones.
    return torch.device("cpu") if dist.get_backend(group) == "gloo" else t.device


def _all_reduce(t: Tensor, shard: VocabShard, op=None) -> Tensor:
    """All-reduce `t` (a fresh tensor), through the CPU where the group is gloo's."""
    device = _collective_device(t, shard.group)
    buf = t.to(device, copy=True).contiguous()  # never reduce the caller's tensor in place
    dist.all_reduce(buf, op=op or dist.ReduceOp.SUM, group=shard.group)
    return buf.to(t.device)


def _all_gather(t: Tensor, shard: VocabShard) -> Tensor:
    """[world, *t.shape] of every rank's `t`."""
    device = _collective_device(t, shard.group)
    buf = t.to(device).contiguous()
    out = [torch.empty_like(buf) for _ in range(dist.get_world_size(shard.group))]
    dist.all_gather(out, buf, group=shard.group)
    return torch.stack(out).to(t.device)


# --------------------------------------------------------------------------------------
# Loss: statistics and gradients
# --------------------------------------------------------------------------------------


def merge_lse(local_lse: Tensor, shard: VocabShard) -> Tensor:
    top = _all_reduce(local_lse, shard, dist.ReduceOp.MAX)
    total = _all_reduce((local_lse - top).exp(), shard)
    return top + total.log()


def sharded_stats(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, options,
                  shard: VocabShard) -> tuple[Tensor, Tensor, Tensor | None]:
    """Global (lse, logits at `slot_ids`, logit sums or None) from this rank's shard."""
    from .library import _stats

    local_ids, inside = shard.local_ids(slot_ids)
    with torch.no_grad():
        lse, slot_logits, logit_sum = _stats(backend, x, weight, bias, local_ids, options)
        lse = merge_lse(lse, shard)
        slot_logits = _all_reduce(torch.where(inside, slot_logits, 0.0), shard)
        if logit_sum is not None:
            logit_sum = _all_reduce(logit_sum, shard)
    return lse, slot_logits, logit_sum


def sharded_gradients(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, lse: Tensor,
                      slot_logits: Tensor, logit_sum: Tensor | None, row_coef: Tensor, slot_coef: Tensor,
                      uniform: Tensor | None, options, need: tuple[bool, bool, bool], shard: VocabShard):
    """d_input (summed over ranks), and this shard's d_weight and d_bias."""
    from .library import _gradients

    local_ids, inside = shard.local_ids(slot_ids)
    with torch.no_grad():
        d_x, d_w, d_b = _gradients(backend, x, weight, bias, local_ids, lse, slot_logits, logit_sum, row_coef,
                                   torch.where(inside, slot_coef, 0.0), uniform, options, need)
        if need[0]:  # summed in fp32 (float64 stays float64), rounded once
            d_x = _all_reduce(d_x.to(torch.promote_types(d_x.dtype, torch.float32)), shard).to(x.dtype)
    return d_x, d_w, d_b


@dataclass(frozen=True)
class ParallelParams:
    options: object  # LossOptions
    num_target: int
    backend: str
    shard: VocabShard


class VocabParallelLinearCrossEntropy(torch.autograd.Function):
    """`linear_cross_entropy` over a vocabulary shard; outputs (loss, lse, token_loss, target_logprobs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slot_ids, slot_weights, slot_valid, params: ParallelParams):
        from .loss.reference import reduce_loss
        from .loss.targets import Slots, row_terms

        slots = Slots(slot_ids, slot_weights, slot_valid, params.num_target)
        lse, slot_logits, logit_sum = sharded_stats(params.backend, x, weight, bias, slot_ids, params.options,
                                                    params.shard)
        terms = row_terms(lse, slot_logits, logit_sum, slots, params.options, params.shard.vocab_size)
        loss = reduce_loss(terms.token_loss, slots.row_valid, params.options.reduction)
        token_loss = terms.token_loss.clone() if params.options.reduction == "none" else terms.token_loss
        ctx.params = params
        ctx.save_for_backward(x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum)
        ctx.mark_non_differentiable(lse, token_loss, terms.target_logprobs)
        return loss, lse, token_loss, terms.target_logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_token_loss, _grad_logq):
        from .loss.targets import Slots, row_terms, row_upstream

        x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum = ctx.saved_tensors
        params = ctx.params
        slots = Slots(slot_ids, slot_weights, slot_valid, params.num_target)
        terms = row_terms(lse, slot_logits, logit_sum, slots, params.options, params.shard.vocab_size)
        upstream = row_upstream(grad_loss, slots.row_valid, params.options.reduction, lse.dtype)
        uniform = None if terms.uniform is None else terms.uniform * upstream
        d_x, d_w, d_b = sharded_gradients(
            params.backend, x, weight, bias, slot_ids, lse, slot_logits, logit_sum, terms.row_coef * upstream,
            terms.slot_coef * upstream[:, None], uniform, params.options, ctx.needs_input_grad[:3], params.shard,
        )
        return d_x, d_w, d_b, None, None, None, None


# --------------------------------------------------------------------------------------
# Top-k and sampling
# --------------------------------------------------------------------------------------


def merge_candidates(values: Tensor, ids: Tensor, k: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """The k best of [N, m] candidates by (value desc, id asc); padding ids are `vocab_size`."""
    by_id = torch.sort(ids, dim=1, stable=True).indices
    values, ids = values.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
    return values.gather(1, order), ids.gather(1, order)


def gather_candidates(z: Tensor, ids: Tensor, k: int, shard: VocabShard) -> tuple[Tensor, Tensor]:
    """Every rank's [N, k'] candidates (z values, global ids) merged into the global top k."""
    rows = z.shape[0]
    if z.shape[1] < k:  # a shard smaller than k: pad with entries that rank last
        pad = k - z.shape[1]
        z = torch.cat([z, z.new_full((rows, pad), -torch.inf)], dim=1)
        ids = torch.cat([ids, ids.new_full((rows, pad), shard.vocab_size)], dim=1)
    all_z = _all_gather(z, shard).permute(1, 0, 2).reshape(rows, -1)
    all_ids = _all_gather(ids, shard).permute(1, 0, 2).reshape(rows, -1)
    return merge_candidates(all_z, all_ids, k, shard.vocab_size)


def sharded_topk(x: Tensor, weight: Tensor, bias: Tensor | None, k: int, options, backend: str,
                 shard: VocabShard):
    """`linear_topk` of 2-D `x` over the whole vocabulary from this rank's shard: (ids, logprobs, lse).

    The shards' candidates are merged by their logits as computed, so equal logits on two
    shards stay equal and go to the lower id.
    """
    from .sampling.topk import topk_candidates

    local = topk_candidates(x, weight, bias, min(k, shard.size), options, backend)
    lse = merge_lse(local.lse, shard)
    values, ids = gather_candidates(local.values, local.ids + shard.start, k, shard)
    return ids, values - lse[:, None], lse


class ShardedCandidates:
    """A `top` for truncated sampling: every shard's candidates merged (z at the
    temperature, global ids), with the log-sum-exp at the temperature and at 1."""

    def __init__(self, shard: VocabShard):
        self.shard = shard

    def __call__(self, x, weight, bias, k, options, raw_lse=False):
        from .sampling.topk import Candidates, chunked_topk

        local = chunked_topk(x, weight, bias, min(k, self.shard.size), options, raw_lse)
        z, ids = gather_candidates(local.values.float(), local.ids + self.shard.start, k, self.shard)
        lse_raw = None if local.lse_raw is None else merge_lse(local.lse_raw.float(), self.shard)
        return Candidates(ids, z, merge_lse(local.lse.float(), self.shard), lse_raw)


class ShardedDenseLogits:
    """Rows' logits over the whole vocabulary, each shard's columns gathered from its rank."""

    def __init__(self, shard: VocabShard):
        self.shard = shard
        starts = _all_gather(torch.tensor([shard.start, shard.size], dtype=torch.int64), shard)
        self.pieces = [(int(start), int(size)) for start, size in starts.tolist()]
        self.widest = max(size for _, size in self.pieces)

    def __call__(self, x_rows, weight, bias, softcap, budget):
        from .sampling.sample import _tile_logits

        local = _tile_logits(x_rows, weight, bias, softcap, budget)
        padded = local.new_zeros(local.shape[0], self.widest)
        padded[:, : local.shape[1]] = local
        gathered = _all_gather(padded, self.shard)
        logits = local.new_empty(local.shape[0], self.shard.vocab_size)
        for rank, (start, size) in enumerate(self.pieces):
            logits[:, start : start + size] = gathered[rank, :, :size]
        return logits


def sharded_sample(x: Tensor, weight: Tensor, bias: Tensor | None, softcap, options, seed, positions, keys,
                   workspace_bytes, truncated: bool, shard: VocabShard):
    """`linear_sample` over the whole vocabulary from this rank's shard (the chunked sweep)."""
    from .sampling.sample import SweepDraws, _candidate_sample, _sweep_sample

    if truncated:
        return _candidate_sample(x, weight, bias, softcap, options, seed, positions, keys, workspace_bytes,
                                 top=ShardedCandidates(shard), dense_logits=ShardedDenseLogits(shard),
                                 vocab_size=shard.vocab_size)
    local = _sweep_sample(x, weight, bias, softcap, options, keys, workspace_bytes, id_offset=shard.start)
    # Every rank's winners, by their scores as computed: the best score wins, equal scores
    # (equal logits when greedy) go to the lower id.
    all_score, all_ids, all_raw = (_all_gather(t, shard) for t in (local.score, local.ids, local.raw))
    best = all_score.max(dim=0, keepdim=True).values
    winner = torch.where(all_score == best, all_ids, shard.vocab_size).min(dim=0).values
    raw_best = torch.where(all_ids == winner[None], all_raw, -torch.inf).amax(dim=0)
    draws = SweepDraws(winner, best[0], raw_best, merge_lse(local.lse_raw, shard), merge_lse(local.lse_z, shard))
    return draws.sample(options)
