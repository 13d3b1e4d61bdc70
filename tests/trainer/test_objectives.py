"""Objectives: values and gradients against dense float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch

from distil.model import Head
from distil.objectives import (
    GRPO,
    PROBABILITY_FLOOR,
    Batch,
    Distil,
    JensenShannon,
    LocalCE,
    ReverseKL,
    group_advantages,
)
from distil_kernels import SparseTarget


def _problem(seed=0, B=3, T=4, d=6, V=11, k=3):
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(B, T, d, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, d, generator=gen, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(B * T)]).view(B, T, k)
    probs = torch.rand(B, T, k, generator=gen, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True) * 0.9  # 0.1 of the expert's mass in the tail
    ids[0, 1, 2] = -100  # a padded slot
    probs[0, 1, 2] = 0.0
    actions = torch.randint(V, (B, T), generator=gen)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 3] = False
    rewards = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    group = torch.tensor([0, 0, 1])
    batch = Batch(states, Head(weight, None, None), actions, mask, group, rewards, SparseTarget(ids, probs), "chunked")
    return batch


def _coarse(batch):
    """Dense coarse log-probs [M, k + 1] of expert and student, with autograd on the student."""
    logits = batch.states[batch.mask] @ batch.head.weight.T
    logq_all = torch.log_softmax(logits, dim=-1)
    ids = batch.expert.ids[batch.mask]
    p = batch.expert.probs[batch.mask]
    used = ids != -100
    q = torch.where(used, logq_all.gather(1, ids.clamp_min(0)).exp(), 0.0)
    q_tail = (1 - q.sum(1)).clamp_min(PROBABILITY_FLOOR)
    p_tail = (1 - p.sum(1)).clamp_min(PROBABILITY_FLOOR)
    qs = torch.cat([q, q_tail[:, None]], 1)
    ps = torch.cat([p.clamp_min(PROBABILITY_FLOOR), p_tail[:, None]], 1)
    full = torch.cat([used, torch.ones_like(used[:, :1])], 1)
    return ps, qs, full


def _dense_reverse_kl(batch):
    p, q, used = _coarse(batch)
    return torch.where(used, q * (q.log() - p.log()), 0.0).sum() / batch.mask.sum()


def _dense_jsd(batch):
    p, q, used = _coarse(batch)
    m = (p + q) / 2
    terms = 0.5 * p * (p.log() - m.log()) + 0.5 * q * (q.log() - m.log())
    return torch.where(used, terms, 0.0).sum() / batch.mask.sum()


@pytest.mark.parametrize("objective, dense", [(ReverseKL(), _dense_reverse_kl), (JensenShannon(), _dense_jsd)],
                         ids=["sdpo", "opsd"])
def test_coarse_divergences_match_the_dense_formula(objective, dense):
    batch = _problem()
    got, _ = objective.loss(batch)
    got_grads = torch.autograd.grad(got, [batch.states, batch.head.weight])
    want = dense(batch)
    want_grads = torch.autograd.grad(want, [batch.states, batch.head.weight])
    # log q at the ids comes from the loss core's statistics, fp32 by contract: the value
    # and the per-id weights carry fp32 rounding (eps 1.2e-7), the rest is float64.
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-6, atol=1e-7)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _dense_distil(batch, future_credit, discount):
    """DESIGN.md's DistIL loss, densely: the masked mean of ce, with the gradient of the surrogate."""
    logq = torch.log_softmax(batch.states @ batch.head.weight.T, dim=-1)
    ids, p = batch.expert.ids, batch.expert.probs
    used = ids != -100
    logq_ids = torch.where(used, logq.gather(2, ids.clamp_min(0)), 0.0)
    mass = torch.where(used, p, 0.0).sum(-1)
    q_tail = (1 - torch.where(used, logq_ids.exp(), 0.0).sum(-1)).clamp_min(PROBABILITY_FLOOR)
    ce = -torch.where(used, p * logq_ids, 0.0).sum(-1) - (1 - mass).clamp_min(0) * q_tail.log()
    mask = batch.mask.double()
    B, T = mask.shape
    cost = torch.zeros(B, T, dtype=torch.float64)
    for t in reversed(range(T - 1)):
        cost[:, t] = ce[:, t + 1].detach() * mask[:, t + 1] + discount * cost[:, t + 1]
    baseline = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            others = [o for o in range(B) if o != b and batch.group[o] == batch.group[b] and batch.mask[o, t]]
            baseline[b, t] = sum(cost[o, t] for o in others) / len(others) if others else 0.0
    logq_actions = logq.gather(2, batch.actions[..., None])[..., 0]
    credit = (mask * future_credit * (cost - baseline) * logq_actions).sum() / mask.sum()
    return (mask * ce).sum() / mask.sum() + credit - credit.detach()


@pytest.mark.parametrize("objective, future_credit, discount",
                         [(Distil(), 1.0, 1.0), (Distil(0.5, 0.9, "group"), 0.5, 0.9), (LocalCE(), 0.0, 1.0)],
                         ids=["distil", "distil-discounted", "ce"])
def test_distil_and_local_ce_gradients_match_the_dense_surrogate(objective, future_credit, discount):
    """The objectives hand distil_loss the rollout's group and their options: the value and
    the gradient are those of DESIGN.md's surrogate (ce alone has no future-credit term)."""
    batch = _problem(3)
    got, _ = objective.loss(batch)
    got_grads = torch.autograd.grad(got, [batch.states, batch.head.weight])
    want = _dense_distil(batch, future_credit, discount)
    want_grads = torch.autograd.grad(want, [batch.states, batch.head.weight])
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


def test_local_ce_is_the_forward_cross_entropy_with_bucket_tail():
    batch = _problem(1)
    got, _ = LocalCE().loss(batch)
    p, q, used = _coarse(batch)
    want = -torch.where(used, p * q.log(), 0.0)
    # The tail bin weighs the expert's leftover mass (0.1 per row), not the floor.
    want[:, -1] = -(1 - batch.expert.probs[batch.mask].sum(1)) * q[:, -1].log()
    want = want.sum() / batch.mask.sum()
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-10, atol=1e-12)


def test_grpo_is_the_advantage_weighted_policy_gradient():
    batch = _problem(2)
    got, _ = GRPO().loss(batch)
    logq = torch.log_softmax(batch.states @ batch.head.weight.T, -1).gather(2, batch.actions[..., None])[..., 0]
    adv = group_advantages(batch.rewards, batch.group)
    want = -(adv[:, None] * logq)[batch.mask].sum() / batch.mask.sum()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    g1 = torch.autograd.grad(got, batch.states)[0]
    g2 = torch.autograd.grad(want, batch.states)[0]
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


def test_group_advantages():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 1, 1, 1])
    adv = group_advantages(rewards, group)
    std = math.sqrt(2 / 9)
    torch.testing.assert_close(adv[:3], torch.tensor([2 / 3, -1 / 3, -1 / 3]) / (std + 1e-4))
    assert float(adv[:3].sum()) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(group_advantages(torch.ones(4), torch.tensor([0, 0, 1, 1])), torch.zeros(4))
