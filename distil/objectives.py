"""Objectives of the training loop, each a swappable module with one method, `loss`.

- `distil`: DistIL, `distil_loss` (forward cross-entropy to the expert at every visited
  state, plus future credit: the sampled token's log-prob times the cost-to-go, minus
  the group baseline).
- `ce`: the local term alone (forward cross-entropy to the expert, no future credit).
- `grpo`: RLVR with group-normalised advantages `(r - mean) / (std + 1e-4)` over the
  rollouts of a prompt, a token-level policy gradient `-A log q(a_t)`; on-policy, one
  update per batch, so no ratio clipping is needed.
- `sdpo`: reverse-KL distillation `KL(q || p)` to the expert at every visited state.
- `opsd`: Jensen-Shannon distillation `JSD_1/2(p, q)` at every visited state.

sdpo and opsd take the expert's top-k plus one tail bin (its remaining mass against the
student's mass outside the same ids), the same coarse view the bucket tail of the forward
loss uses, and a probability floor of 1e-6 where the reverse KL would be infinite. Their
gradient is exact for that coarse divergence and never builds [tokens x vocab] logits: a
statistics pass gives log q at the ids, autograd on that small [tokens, k + 1] problem
gives dL/dlog q per bin, and one weighted `linear_cross_entropy` pass (tail "ignore",
signed weights) carries it to the hidden states and the head. The tail bin's log-prob is
log(1 - sum_j q_j), whose gradient in the logits is -sum_j (q_j / q_tail)(e_j - q), so
its share folds into the per-id weights.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from distil_kernels import SparseTarget, distil_loss, linear_cross_entropy

from .model import Head

PROBABILITY_FLOOR = 1e-6
_PAD_LOG = -60.0


@dataclass
class Batch:
    """One update's data: visited states (with gradients) and what was observed there."""

    states: Tensor  # [B, T, d] student hidden states, requires grad
    head: Head
    actions: Tensor  # [B, T]
    mask: Tensor  # [B, T] bool
    group: Tensor  # [B] prompt index of each rollout
    rewards: Tensor  # [B] fp32
    expert: SparseTarget | None  # [B, T, k]
    backend: str = "auto"


class Objective(ABC):
    name: str
    needs_expert = True

    @abstractmethod
    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        """(scalar loss to minimise, metrics)."""


class Distil(Objective):
    name = "distil"

    def __init__(self, future_credit: float = 1.0, discount: float = 1.0, baseline: str = "group"):
        self.future_credit, self.discount, self.baseline = future_credit, discount, baseline

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        h = batch.head
        value = distil_loss(batch.states, h.weight, batch.expert, batch.actions, batch.mask, group=batch.group,
                            future_credit=self.future_credit, discount=self.discount, baseline=self.baseline,
                            bias=h.bias, softcap=h.softcap, backend=batch.backend)
        return value, {"expert_ce": float(value.detach())}


class LocalCE(Distil):
    name = "ce"

    def __init__(self):
        super().__init__(future_credit=0.0, baseline="none")


class GRPO(Objective):
    name = "grpo"
    needs_expert = False

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        advantages = group_advantages(batch.rewards, batch.group)
        per_token = advantages[:, None].expand_as(batch.mask)[batch.mask]
        target = SparseTarget(batch.actions[batch.mask][:, None], per_token[:, None])
        count = max(int(batch.mask.sum()), 1)
        h = batch.head
        value = linear_cross_entropy(batch.states[batch.mask], h.weight, target, bias=h.bias, softcap=h.softcap,
                                     tail="ignore", reduction="sum", backend=batch.backend) / count
        return value, {"advantage_abs": float(advantages.abs().mean())}


def group_advantages(rewards: Tensor, group: Tensor) -> Tensor:
    """(r - group mean) / (group std + 1e-4); 0 for a group whose rewards are all equal."""
    groups = int(group.max()) + 1 if len(group) else 0
    zeros = rewards.new_zeros(groups)
    count = zeros.index_add(0, group, torch.ones_like(rewards))
    mean = zeros.index_add(0, group, rewards) / count
    centred = rewards - mean[group]
    var = zeros.index_add(0, group, centred**2) / count
    return centred / (var.sqrt()[group] + 1e-4)


class CoarseDivergence(Objective):
    """A divergence between the expert and the student on the expert's k ids + a tail bin."""

    @abstractmethod
    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        """Per-state divergence [M] from coarse log-probs [M, k + 1] (last column: the tail)."""

    def loss(self, batch: Batch) -> tuple[Tensor, dict[str, float]]:
        h = batch.head
        states = batch.states[batch.mask]
        ids = batch.expert.ids[batch.mask]
        p = batch.expert.probs[batch.mask].float()
        used = ids != -100
        p = torch.where(used, p, 0.0)
        with torch.no_grad():
            _, stats = linear_cross_entropy(states.detach(), h.weight.detach(), SparseTarget(ids, p),
                                            bias=None if h.bias is None else h.bias.detach(), softcap=h.softcap,
                                            tail="ignore", reduction="none", return_stats=True, backend=batch.backend)
        q = torch.where(used, stats.target_logprobs.exp(), 0.0)
        q_tail = (1.0 - q.sum(dim=1)).clamp_min(PROBABILITY_FLOOR)
        p_tail = (1.0 - p.sum(dim=1)).clamp_min(PROBABILITY_FLOOR)
        # Unused slots hold the same tiny log-prob on both sides: every divergence term
        # there is exactly 0 and its gradient negligible (and dropped below).
        log_q = torch.cat([torch.where(used, stats.target_logprobs, _PAD_LOG), q_tail.log()[:, None]], dim=1)
        log_p = torch.cat([torch.where(used, p.clamp_min(PROBABILITY_FLOOR).log(), _PAD_LOG),
                           p_tail.log()[:, None]], dim=1)
        log_q.requires_grad_(True)
        with torch.enable_grad():
            per_state = self.divergence(log_p, log_q)
            (grad,) = torch.autograd.grad(per_state.sum(), log_q)
        # dL/dz = sum_j g_j (e_j - q) + g_tail * dlog q_tail/dz = sum_j (g_j - g_tail q_j / q_tail)(e_j - q);
        # a weighted CE -sum_j c_j log q_j has gradient -sum_j c_j (e_j - q), so c_j is minus that bracket.
        coef = -(grad[:, :-1] - grad[:, -1:] * q / q_tail[:, None])
        coef = torch.where(used, coef, 0.0)
        count = max(states.shape[0], 1)
        surrogate = linear_cross_entropy(states, h.weight, SparseTarget(ids, coef), bias=h.bias, softcap=h.softcap,
                                         tail="ignore", reduction="sum", backend=batch.backend) / count
        value = per_state.detach().sum() / count
        # Report the divergence, differentiate the surrogate: same gradient.
        return surrogate - surrogate.detach() + value, {"divergence": float(value)}


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim, from log-probs."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)


class ReverseKL(CoarseDivergence):
    name = "sdpo"

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        return _kl(log_q, log_p)


class JensenShannon(CoarseDivergence):
    name = "opsd"

    def divergence(self, log_p: Tensor, log_q: Tensor) -> Tensor:
        log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
        return 0.5 * _kl(log_p, log_m) + 0.5 * _kl(log_q, log_m)


OBJECTIVES = {cls.name: cls for cls in (Distil, LocalCE, GRPO, ReverseKL, JensenShannon)}


def make_objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {name!r}")
    return OBJECTIVES[name]()
