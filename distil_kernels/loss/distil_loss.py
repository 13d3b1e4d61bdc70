"""`distil_loss`: the DistIL sequence-level loss over sampled rollouts.

For rollouts b with states t, `ce[b, t]` is the token loss of `linear_cross_entropy`
against the expert's sparse distribution. The value is the mean of `ce` over response
tokens; the gradient is the DistIL gradient

    sum(mask * (grad ce + future_credit * sg(G - baseline) * grad log q[actions])) / mask.sum()

with `G[b, t] = sum_{i>t} discount**(i-t-1) * ce[b, i] * mask[b, i]` the cost-to-go and
`baseline` the mean cost-to-go of the other rollouts of the same prompt. The local
term and the credit term share one softmax per row: a statistics pass gives every
row's lse and its logits at the expert ids and the action, the cost-to-go follows on
[B, T] tensors, and one weighted loss pass produces all gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..backends import check_backend_dtype, resolve_backend
from ..parallel import make_shard, sharded_stats
from ..validation import check_flags, check_ids, check_linear, check_probs, check_tensor, is_integer_dtype
from .chunked import SweepStats
from .passes import PassParams, PrecomputedCoefficientLoss, stats_pass
from .options import LossOptions, _check_real
from .reference import compute_dtype, reference_logits, reference_token_loss
from .targets import SparseTarget, make_slots, row_terms

BASELINES = ("none", "group")


@dataclass(frozen=True)
class DistilStats:
    """Per-token statistics of `distil_loss` [B, T], fp32."""

    ce: Tensor  # token loss against the expert (0 where the expert row is all padding)
    cost_to_go: Tensor  # G
    baseline: Tensor
    action_logprobs: Tensor  # log q[actions]
    lse: Tensor


def cost_to_go(ce: Tensor, mask: Tensor, discount: float) -> Tensor:
    """G[b, t] = sum_{i>t} discount**(i-t-1) * ce[b, i] * mask[b, i], by a reverse scan."""
    masked = ce * mask.to(ce.dtype)
    g = torch.zeros_like(masked)
    for t in range(masked.shape[1] - 2, -1, -1):
        g[:, t] = masked[:, t + 1] + discount * g[:, t + 1]
    return g


def group_baseline(g: Tensor, mask: Tensor, group: Tensor | None) -> Tensor:
    """Mean of G[., t] over the other rollouts of b's group unmasked at t (0 if none)."""
    if group is None:
        return torch.zeros_like(g)
    same = (group[:, None] == group[None, :]) & ~torch.eye(len(group), dtype=torch.bool, device=g.device)
    same = same.to(g.dtype)
    live = mask.to(g.dtype)
    total = same @ (g * live)
    count = same @ live
    return torch.where(count > 0, total / count.clamp_min(1.0), 0.0)


def _check_distil_inputs(input, expert, actions, mask, group, validate, tail, vocab_size):
    if input.dim() != 3:
        raise ValueError(f"input must have shape [B, T, d], got {tuple(input.shape)}")
    batch, steps = input.shape[:2]
    if not isinstance(expert, SparseTarget):
        raise TypeError(f"expert must be a SparseTarget [B, T, k], got {type(expert).__name__}")
    if expert.batch_shape != (batch, steps):
        raise ValueError(
            f"expert must have shape [B, T, k] = [{batch}, {steps}, k], got {tuple(expert.ids.shape)}"
        )
    check_tensor("actions", actions)
    if actions.shape != (batch, steps):
        raise ValueError(f"actions must have shape [B, T] = [{batch}, {steps}], got {tuple(actions.shape)}")
    check_tensor("mask", mask)
    if mask.shape != (batch, steps):
        raise ValueError(f"mask must have shape [B, T] = [{batch}, {steps}], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    for name, t in (("expert", expert.ids), ("actions", actions), ("mask", mask)):
        if t.device != input.device:
            raise ValueError(f"{name} must be on input's device {input.device}, got {t.device}")
    if group is not None:
        check_tensor("group", group)
        if group.shape != (batch,):
            raise ValueError(f"group must have shape [B] = [{batch}], got {tuple(group.shape)}")
        if not is_integer_dtype(group.dtype):
            raise TypeError(f"group must be an integer tensor (a prompt index per sequence), got {group.dtype}")
        if group.device != input.device:
            raise ValueError(f"group must be on input's device {input.device}, got {group.device}")
    check_ids("expert.ids", expert.ids, vocab_size, -100, validate)
    check_ids("actions", actions, vocab_size, None, False)
    if validate:
        check_probs(expert, -100, tail, name="expert")
        # Only response tokens need a real action; prompt positions may hold anything.
        check_ids("actions (where mask is True)", torch.where(mask, actions, 0), vocab_size, None, True)


def distil_loss(
    input: Tensor,
    weight: Tensor,
    expert: SparseTarget,
    actions: Tensor,
    mask: Tensor,
    *,
    group: Tensor | None = None,
    future_credit: float = 1.0,
    discount: float = 1.0,
    baseline: str = "group",
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    tail: str = "bucket",
    backend: str = "auto",
    return_stats: bool = False,
    workspace_bytes: int | None = None,
    validate: bool = True,
    process_group=None,
    vocab_start: int = 0,
) -> Tensor | tuple[Tensor, DistilStats]:
    """The DistIL loss of student hidden states `input` [B, T, d] on its own rollouts.

    Args:
        input: student hidden states at the rollout's states [B, T, d].
        weight, bias: the student's LM head [V, d] and [V] or None.
        expert: the expert's sparse distribution at every state, `SparseTarget` [B, T, k]
            (slots with id -100 are padding).
        actions: the sampled tokens [B, T]; mask: response tokens [B, T] bool.
        group: [B] ids of rollouts sharing a prompt (None: every rollout alone).
        future_credit: weight of the credit term; discount: of the cost-to-go.
        baseline: "group" (mean cost-to-go of the other rollouts of the group at the
            same step) or "none".
        temperature, softcap, tail, backend, workspace_bytes, validate, process_group,
            vocab_start: as in `linear_cross_entropy`.
        return_stats: also return `DistilStats`.

    Returns:
        `sum(ce * mask) / mask.sum()` (0.0 with no response tokens), whose gradient is
        the DistIL gradient; and the stats if asked.
    """
    options = LossOptions(temperature=temperature, softcap=softcap, tail=tail, workspace_bytes=workspace_bytes)
    _check_real("future_credit", future_credit)
    _check_real("discount", discount)
    if discount < 0:
        raise ValueError(f"discount must be >= 0, got {discount}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    check_flags(return_stats=return_stats, validate=validate)
    compiling = torch.compiler.is_compiling()
    check_linear(input, weight, bias)
    shard = make_shard(process_group, vocab_start, weight)
    vocab_size = weight.shape[0] if shard is None else shard.vocab_size
    _check_distil_inputs(input, expert, actions, mask, group, validate and not compiling, tail, vocab_size)
    name = resolve_backend(backend, input.device, input.dtype)
    check_backend_dtype(name, input.dtype)

    batch, steps, dim = input.shape
    cdt = compute_dtype(input.dtype)
    x = input.reshape(-1, dim)
    if bias is not None:
        bias = bias.to(cdt)
    live = mask.reshape(-1)
    action_ids = actions.reshape(-1, 1).long()
    # An out-of-range action (validate=False) is padding on every backend: no credit, log q 0.
    action_valid = live[:, None] & (action_ids >= 0) & (action_ids < vocab_size)
    slots = make_slots(expert, vocab_size, -100, cdt).with_extra(
        action_ids, torch.zeros(action_ids.shape, dtype=cdt, device=x.device), action_valid
    )
    count = live.sum().clamp_min(1).to(cdt)

    dense = name == "torch" and shard is None
    if dense:
        z = reference_logits(x, weight, bias, options)
        ce, lse, _ = reference_token_loss(z, slots, options)
        log_q_action = torch.where(action_valid[:, 0], torch.log_softmax(z, dim=1).gather(1, slots.ids[:, -1:])[:, 0],
                                   0.0)
    else:
        if shard is not None:
            lse_s, slot_logits_s, _ = sharded_stats(name, x, weight, bias, slots.ids, options, shard)
            stats = SweepStats(lse_s, slot_logits_s, None)
        elif compiling:
            from ..library import loss_stats, option_args

            # Statistics carry no gradient (the eager path takes them under no_grad).
            lse_c, slot_logits_c, _ = loss_stats(x.detach(), weight.detach(), None if bias is None else bias.detach(),
                                                 slots.ids, *option_args(options, x.dtype), name)
            stats = SweepStats(lse_c, slot_logits_c, None)
        else:
            with torch.no_grad():
                stats = stats_pass(name, x, weight, bias, slots.ids, options)
        terms = row_terms(stats.lse, stats.slot_logits, None, slots, options, vocab_size)
        ce, lse = terms.token_loss, stats.lse
        log_q_action = torch.where(action_valid[:, 0], stats.slot_logits[:, -1] - lse, 0.0)

    ce_bt = ce.detach().reshape(batch, steps)
    g = cost_to_go(ce_bt, mask, discount)
    base = group_baseline(g, mask, group) if baseline == "group" else torch.zeros_like(g)
    advantage = (g - base).reshape(-1)
    value = (ce.detach() * live).sum() / count

    if dense:
        # The mask as cdt first: bool * float promotes to the default dtype (fp32), which
        # would round future_credit before the float64 reference multiplies it in.
        credit = (live.to(cdt) * future_credit * advantage * log_q_action).sum() / count
        loss = (ce * live).sum() / count + credit - credit.detach()
    else:
        # The credit term is the plain weighted slot -w log q[a] with w = -future_credit * A;
        # every row is scaled by mask / count.
        credit_weight = torch.where(live, -future_credit * advantage, 0.0)
        slots = slots.with_extra_weights(credit_weight[:, None])
        terms = row_terms(lse, stats.slot_logits, None, slots, options, vocab_size)
        upstream = live.to(cdt) / count
        if compiling:
            from ..library import coefficient_loss, option_args

            loss = coefficient_loss(x, weight, bias, value, slots.ids, terms.row_coef * upstream,
                                    terms.slot_coef * upstream[:, None], stats.lse, stats.slot_logits,
                                    *option_args(options, x.dtype), name)
        else:
            loss = PrecomputedCoefficientLoss.apply(
                x, weight, bias, value, slots.ids, terms.row_coef * upstream, terms.slot_coef * upstream[:, None],
                stats, PassParams(name, options, shard),
            )
    if not return_stats:
        return loss
    to_bt = lambda t: t.detach().float().reshape(batch, steps)  # noqa: E731
    return loss, DistilStats(to_bt(ce), g.float(), base.float(), to_bt(log_q_action), to_bt(lse))
