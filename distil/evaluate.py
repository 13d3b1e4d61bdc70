"""Evaluation on held-out prompts: pass@1 and unbiased pass@k, avg@n, maj@n, and the
expert-weighted reward.

For each of the prompts, n responses are sampled; with c of them correct, the unbiased
pass@k estimate (Chen et al., 2021) is 1 - C(n - c, k) / C(n, k), pass@1 being c / n.
avg@n is the mean reward of the n responses, maj@n whether the most frequent response
(ties to the earliest sampled) is correct. The expert-weighted reward is the mean over
the visited states of sum_j p_j q(id_j): the probability that the student's next token is
one the expert would pick, weighted by how much the expert wants it (1 for a student that
always follows a deterministic expert).
"""

from __future__ import annotations

import math
from collections import Counter

import torch

from distil_kernels import SparseTarget, linear_cross_entropy

from .experts import Expert, ExpertQuery
from .model import LanguageModel
from .rollout import SamplingConfig, sample_rollouts
from .tasks import Task

# Evaluation draws from its own seed stream, the same at every evaluation of a run, so
# two checkpoints are compared on the same prompts with the same noise.
EVAL_STEP = -1


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n samples, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(lm: LanguageModel, task: Task, *, prompts: int, samples: int, seed: int, sampling: SamplingConfig,
             expert: Expert | None = None, backend: str = "auto") -> dict[str, float]:
    problems = task.problems(prompts, seed=seed, split="eval")
    rollouts = sample_rollouts(lm, [p.prompt for p in problems], num_rollouts=samples,
                               max_tokens=task.max_response_chars + 1, sampling=sampling, seed=seed, step=EVAL_STEP,
                               backend=backend)
    repeated = [p for p in problems for _ in range(samples)]
    feedback = task.verify_batch(repeated, rollouts.texts)
    correct = [f.correct for f in feedback]
    pass1, passk, majority = [], [], []
    for i in range(len(problems)):
        block = slice(i * samples, (i + 1) * samples)
        c = sum(correct[block])
        pass1.append(pass_at_k(samples, c, 1))
        passk.append(pass_at_k(samples, c, samples))
        votes = Counter(rollouts.texts[block])
        top = max(votes.values())
        winner = next(t for t in rollouts.texts[block] if votes[t] == top)
        majority.append(correct[block][rollouts.texts[block].index(winner)])
    metrics = {
        "pass@1": sum(pass1) / len(pass1),
        f"pass@{samples}": sum(passk) / len(passk),
        f"avg@{samples}": sum(f.reward for f in feedback) / len(feedback),
        f"maj@{samples}": sum(majority) / len(majority),
    }
    if expert is not None:
        metrics["expert_weighted"] = expert_weighted_reward(lm, expert, ExpertQuery(repeated, rollouts, feedback),
                                                            backend)
    return metrics


@torch.no_grad()
def expert_weighted_reward(lm: LanguageModel, expert: Expert, query: ExpertQuery, backend: str = "auto") -> float:
    from .rollout import visited_states

    r = query.rollouts
    target = expert.targets(query)
    states = visited_states(lm, r.prompt_ids, r.prompt_mask, r.actions, r.mask)[r.mask]
    ids, probs = target.ids[r.mask], target.probs[r.mask]
    head = lm.head
    _, stats = linear_cross_entropy(states, head.weight, SparseTarget(ids, probs), bias=head.bias,
                                    softcap=head.softcap, tail="ignore", reduction="none", return_stats=True,
                                    backend=backend)
    used = ids != -100
    weighted = torch.where(used, probs.float() * stats.target_logprobs.exp(), 0.0).sum(dim=1)
    return float(weighted.mean()) if len(weighted) else 0.0
