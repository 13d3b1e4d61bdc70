"""The bandit counterexample: reverse-KL distillation can raise the odds of a worse action.

One state, three actions: a best action A, a worse action B, and C. The expert
prefers A to B (p_B < p_A); the student starts playing B at least as often as A
(q_B >= q_A) and most often C. A gradient step on the forward cross-entropy changes the
logits by lr * (p - q), so the log-odds log(q_B / q_A) change by
lr * ((p_B - p_A) - (q_B - q_A)) < 0: forward CE never raises the odds of the worse
action over the better one. A reverse-KL step changes logit a by
-lr * q_a * (log(q_a / p_a) - KL(q || p)); when C is over-played by far, KL is large
and both A and B rise, B (the larger q) faster: the odds of the worse action go up.

Both updates run through the trainer's own objectives (`LocalCE`, `ReverseKL`) on a
one-state "model" whose logits are a learnable vector, so the experiment checks the
code as well as the argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distil_kernels import SparseTarget

from .model import Head
from .objectives import Batch, LocalCE, Objective, ReverseKL

EXPERT = (0.8, 0.1, 0.1)  # A (best), B (worse), C
START = (0.01, 0.2, 0.79)  # the student over-plays C, and B over A


@dataclass
class Trajectory:
    objective: str
    probs: torch.Tensor  # [steps + 1, 3]

    @property
    def odds_worse_over_best(self) -> torch.Tensor:
        return self.probs[:, 1] / self.probs[:, 0]


def run_bandit(objective: Objective, *, steps: int = 200, lr: float = 0.5, expert=EXPERT, start=START
               ) -> Trajectory:
    """Gradient descent on `objective` from `start` toward the expert; q after every step."""
    logits = torch.tensor(start, dtype=torch.float64).log()
    weight = torch.zeros(3, 3, dtype=torch.float64)
    weight[:, 0] = logits  # state e_0: the logits are the weight's first column
    weight.requires_grad_(True)
    state = torch.zeros(1, 1, 3, dtype=torch.float64)
    state[..., 0] = 1.0
    target = SparseTarget(torch.tensor([[[0, 1, 2]]]), torch.tensor([[expert]], dtype=torch.float64))
    history = [torch.softmax(weight[:, 0].detach(), 0)]
    for _ in range(steps):
        batch = Batch(state, Head(weight, None, None), torch.zeros(1, 1, dtype=torch.int64),
                      torch.ones(1, 1, dtype=torch.bool), torch.zeros(1, dtype=torch.int64),
                      torch.zeros(1, dtype=torch.float64), target, "chunked")
        loss, _ = objective.loss(batch)
        (grad,) = torch.autograd.grad(loss, weight)
        with torch.no_grad():
            weight -= lr * grad
        history.append(torch.softmax(weight[:, 0].detach(), 0))
    return Trajectory(objective.name, torch.stack(history))


def bandit_experiment(steps: int = 200, lr: float = 0.5) -> dict[str, Trajectory]:
    return {name: run_bandit(obj, steps=steps, lr=lr) for name, obj in (("ce", LocalCE()), ("sdpo", ReverseKL()))}
