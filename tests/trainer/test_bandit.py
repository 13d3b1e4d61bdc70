"""The bandit counterexample (distil.bandit): reverse KL raises the odds of a worse action,
forward cross-entropy never does."""

from __future__ import annotations

import torch

from distil.bandit import EXPERT, START, bandit_experiment, run_bandit
from distil.objectives import LocalCE, ReverseKL


def test_reverse_kl_raises_the_odds_of_the_worse_action():
    runs = bandit_experiment(steps=60)
    odds = runs["sdpo"].odds_worse_over_best
    assert odds[1] > odds[0], "the first reverse-KL step should raise q_B / q_A"
    assert float(odds.max()) > 1.2 * float(odds[0])


def test_forward_ce_never_raises_it_and_converges_to_the_expert():
    runs = bandit_experiment(steps=300)
    probs = runs["ce"].probs
    odds = runs["ce"].odds_worse_over_best
    # The argument holds while the student plays B at least as often as A; after that CE
    # simply matches the expert's odds (it may overshoot them slightly and come back).
    over = probs[:-1, 1] >= probs[:-1, 0]
    assert int(over.sum()) >= 5
    assert bool((odds[1:][over] < odds[:-1][over]).all())
    assert float(odds.max()) == float(odds[0])
    torch.testing.assert_close(runs["ce"].probs[-1], torch.tensor(EXPERT, dtype=torch.float64), atol=2e-2, rtol=0)


def test_forward_ce_lowers_worse_odds_from_random_starts():
    """The argument of the module docstring, on random experts and students."""
    gen = torch.Generator().manual_seed(0)
    raised = {"ce": 0, "sdpo": 0}
    trials = 40
    for _ in range(trials):
        p = torch.rand(3, generator=gen, dtype=torch.float64) + 0.05
        q = torch.rand(3, generator=gen, dtype=torch.float64) + 0.01
        p, q = p / p.sum(), q / q.sum()
        best, worse = (0, 1) if p[0] > p[1] else (1, 0)
        if q[worse] < q[best]:
            q[[best, worse]] = q[[worse, best]]  # the student plays the worse action at least as often
        for name, objective in (("ce", LocalCE()), ("sdpo", ReverseKL())):
            step = run_bandit(objective, steps=1, lr=0.05, expert=tuple(p.tolist()), start=tuple(q.tolist()))
            ratio = step.probs[:, worse] / step.probs[:, best]
            raised[name] += int(ratio[1] > ratio[0])
    assert raised["ce"] == 0
    assert raised["sdpo"] > 0  # reverse KL does it on some of these random starts
    assert START[1] >= START[0] and EXPERT[1] < EXPERT[0]
