"""Ground truths shared by the sampling tests on every backend and device: the float64
log-softmax of a linear head, the exact sampling distribution of one row, and a
chi-square check."""

from __future__ import annotations

import torch

def dense_log_softmax(x, w, b, softcap=None, temperature=1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 log-softmax and lse over the vocabulary of the inputs as given, from the formula."""
    z = x.double() @ w.double().T
    if b is not None:
        z = z + b.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    return torch.log_softmax(z, dim=-1), torch.logsumexp(z, dim=-1)


def fp32_tolerance(x, w, b, log_q, lse, softcap=None, temperature=1.0) -> float:
    """Twice the error of PyTorch's own fp32 log-softmax and logsumexp of fp32 logits, plus 1e-6
    (`b` may be None)."""
    z = x.float() @ w.float().T
    if b is not None:
        z = z + b.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    finite = log_q.isfinite()  # ids masked by a -inf bias are -inf in both
    error = max(float((torch.log_softmax(z, dim=1).double() - log_q)[finite].abs().max()),
                float((torch.logsumexp(z, dim=1).double() - lse).abs().max()))
    return 2 * error + 1e-6


def mask_ids(bias: torch.Tensor) -> torch.Tensor:
    """`bias` with -inf on its first 3/5 ids and every 7th (a padded vocabulary, banned
    tokens): tiles, splits and chunks of only -inf logits, which must add nothing."""
    masked = torch.zeros(len(bias), dtype=torch.bool)
    masked[: 3 * len(bias) // 5] = True
    masked[::7] = True
    return bias.masked_fill(masked, -torch.inf)


# Chi-square critical values at p = 1e-3 by degrees of freedom.
CHI2_CRITICAL = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def truncated(probs: torch.Tensor, temperature=1.0, top_k=None, top_p=None, min_p=None, num_samples=1
              ) -> torch.Tensor:
    """The distribution DESIGN.md describes, written out for one row (`num_samples` ignored)."""
    p = probs ** (1.0 / temperature)
    p = p / p.sum()
    order = sorted(range(len(p)), key=lambda i: (-float(p[i]), i))
    keep = len(p) if top_k is None else top_k
    if top_p is not None:
        inside = p[order[:keep]] / p[order[:keep]].sum() if top_k is not None else p[order[:keep]]
        keep = min(keep, int((inside.cumsum(0) < top_p).sum()) + 1)
    if min_p is not None:
        keep = min(keep, int((p >= min_p * p.max()).sum()))
    out = torch.zeros_like(p)
    out[order[:keep]] = p[order[:keep]]
    return out / out.sum()


def chi_square(ids: torch.Tensor, expected: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom) of the drawn `ids` against `expected` probabilities."""
    counts = torch.bincount(ids.flatten().cpu(), minlength=len(expected)).double()
    assert (counts[expected == 0] == 0).all(), "an id outside the kept set was drawn"
    live = expected > 0
    e = expected[live] * ids.numel()
    # The statistic is chi-square distributed only where every expected count is large;
    # no cell is pooled here, so a test must draw enough for its smallest one.
    assert float(e.min()) >= 5, f"expected counts down to {float(e.min()):.1f}: draw more"
    return float(((counts[live] - e) ** 2 / e).sum()), int(live.sum()) - 1
