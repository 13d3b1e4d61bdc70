"""Targets of the loss core and the per-row algebra every backend shares.

A target row is a short list of (vocabulary id, weight) slots. Hard labels are rows
with one slot of weight one; an expert's top-k distribution is a row of k slots.
Given the three per-row statistics a vocabulary sweep produces (the log-sum-exp, the
logits at the slot ids, and the sum of the logits), everything else about a row is
O(k) work: its loss, and the coefficients of its logits gradient

    dL/dz_v = row_coef * q_v - uniform - sum_j slot_coef_j * [v == id_j]

so a backward pass needs only those coefficients and a recomputed softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import BUCKET_CLAMP, LossOptions


@dataclass(frozen=True)
class SparseTarget:
    """A sparse distribution per row: `ids` [..., k] int, `probs` [..., k] float.

    A slot whose id equals the loss's `ignore_index` is padding; a row whose ids are
    all `ignore_index` is ignored. Gradients never flow to a target.
    """

    ids: Tensor
    probs: Tensor

    def __post_init__(self) -> None:
        if not isinstance(self.ids, Tensor):
            raise TypeError(f"SparseTarget.ids must be a torch.Tensor, got {type(self.ids).__name__}")
        if not isinstance(self.probs, Tensor):
            raise TypeError(f"SparseTarget.probs must be a torch.Tensor, got {type(self.probs).__name__}")
        if self.ids.dtype.is_floating_point or self.ids.dtype.is_complex or self.ids.dtype == torch.bool:
            raise TypeError(f"SparseTarget.ids must have an integer dtype, got {self.ids.dtype}")
        if not self.probs.dtype.is_floating_point:
            raise TypeError(f"SparseTarget.probs must have a floating dtype, got {self.probs.dtype}")
        if self.ids.dim() < 1:
            raise ValueError("SparseTarget.ids must have shape [..., k] with k >= 1, got a scalar")
        if self.ids.shape != self.probs.shape:
            raise ValueError(
                f"SparseTarget.ids and SparseTarget.probs must have the same shape [..., k], "
                f"got {tuple(self.ids.shape)} and {tuple(self.probs.shape)}"
            )
        if self.ids.shape[-1] < 1:
            raise ValueError("SparseTarget must have at least one slot per row (k >= 1), got k = 0")
        if self.ids.device != self.probs.device:
            raise ValueError(
                f"SparseTarget.ids and SparseTarget.probs must be on one device, "
                f"got {self.ids.device} and {self.probs.device}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]

    @property
    def batch_shape(self) -> torch.Size:
        return self.ids.shape[:-1]

    def flatten(self) -> "SparseTarget":
        """The same target with its leading dims flattened to one: [N, k]."""
        return SparseTarget(self.ids.reshape(-1, self.k), self.probs.reshape(-1, self.k))


@dataclass(frozen=True)
class Slots:
    """Target rows flattened to [N, K] with padding made safe to index.

    Columns `[:num_target]` follow the loss's tail rules and label smoothing; columns
    after them (used by `distil_loss` for its credit term) are plain signed weights on
    `log q`, reported by no loss value but present in the gradient.
    """

    ids: Tensor  # [N, K] int64 in [0, V): padding and invalid ids replaced by 0
    weights: Tensor  # [N, K] compute dtype, 0 at padding
    valid: Tensor  # [N, K] bool
    num_target: int

    @property
    def row_valid(self) -> Tensor:
        return self.valid[:, : self.num_target].any(dim=1)

    def rows(self, start: int, stop: int) -> "Slots":
        return Slots(self.ids[start:stop], self.weights[start:stop], self.valid[start:stop], self.num_target)

    def with_extra(self, ids: Tensor, weights: Tensor, valid: Tensor) -> "Slots":
        """These slots followed by plain weighted slots [N, K2] (ids already in range)."""
        return Slots(
            torch.cat([self.ids, torch.where(valid, ids, 0)], dim=1),
            torch.cat([self.weights, torch.where(valid, weights.to(self.weights.dtype), 0)], dim=1),
            torch.cat([self.valid, valid], dim=1),
            self.num_target,
        )

    def with_extra_weights(self, weights: Tensor) -> "Slots":
        """The same slots with the weights of the plain weighted columns replaced."""
        kt = self.num_target
        extra = torch.where(self.valid[:, kt:], weights.to(self.weights.dtype), 0)
        return Slots(self.ids, torch.cat([self.weights[:, :kt], extra], dim=1), self.valid, kt)


def make_slots(target: Tensor | SparseTarget, vocab_size: int, ignore_index: int, dtype: torch.dtype) -> Slots:
    """Flatten a hard or sparse target into `Slots`.

    Ids outside [0, vocab_size) that are not `ignore_index` were rejected by validation;
    with `validate=False` they are treated as padding here so that no kernel ever
    indexes with them.
    """
    if isinstance(target, SparseTarget):
        ids = target.ids.reshape(-1, target.k).long()
        # Detached: gradients never flow to a target, and the dense `torch` backend lets
        # autograd differentiate everything its loss reads.
        weights = target.probs.reshape(-1, target.k).detach().to(dtype)
    else:
        ids = target.reshape(-1, 1).long()
        weights = torch.ones(ids.shape, dtype=dtype, device=ids.device)
    valid = (ids != ignore_index) & (ids >= 0) & (ids < vocab_size)
    return Slots(torch.where(valid, ids, 0), torch.where(valid, weights, 0), valid, ids.shape[1])


@dataclass(frozen=True)
class RowTerms:
    """Per-row loss and logits-gradient coefficients (before any upstream scaling)."""

    token_loss: Tensor  # [N], 0 on ignored rows
    target_logprobs: Tensor  # [N, num_target], log q at the target ids, 0 at padding
    row_coef: Tensor  # [N]
    slot_coef: Tensor  # [N, K]
    uniform: Tensor | None  # [N], label_smoothing / V on valid rows, subtracted from every logit's gradient


@dataclass(frozen=True)
class TargetWeights:
    """What the per-row algebra needs of the targets alone, before any statistics.

    A device kernel that holds a row's statistics computes the rest of the algebra itself
    (csrc/row_terms.h) from these.
    """

    weights: Tensor  # [N, K]: a target slot's weight (renormalised where the tail asks), a plain slot's own
    rest: Tensor | None  # [N] a bucket tail's missing mass clamp(1 - sum w, 0); None for the other tails
    valid: Tensor  # [N, K] bool
    num_target: int


def target_weights(slots: Slots, options: LossOptions) -> TargetWeights:
    kt = slots.num_target
    w_t = slots.weights[:, :kt]
    rest = None
    if options.tail == "renormalize":
        mass = w_t.sum(dim=1, keepdim=True)
        # A row with no mass has nothing to renormalise; validation rejects it and
        # validate=False gives it zero loss instead of a NaN.
        a = torch.where(mass > 0, w_t / torch.where(mass > 0, mass, 1.0), 0.0)
    else:
        a = w_t
        if options.tail == "bucket":
            rest = (1.0 - w_t.sum(dim=1)).clamp_min(0.0)
    weights = a if slots.weights.shape[1] == kt else torch.cat([a, slots.weights[:, kt:]], dim=1)
    return TargetWeights(weights, rest, slots.valid, kt)


def row_terms(lse: Tensor, slot_logits: Tensor, logit_sum: Tensor | None, slots: Slots,
              options: LossOptions, vocab_size: int) -> RowTerms:
    """Loss and gradient coefficients of each row from its sweep statistics.

    `lse` [N], `slot_logits` [N, K] (z at the slot ids) and `logit_sum` [N] (sum of z,
    needed only with label smoothing) are in the compute dtype.
    """
    return weighted_row_terms(target_weights(slots, options), lse, slot_logits, logit_sum, options, vocab_size)


def weighted_row_terms(targets: TargetWeights, lse: Tensor, slot_logits: Tensor, logit_sum: Tensor | None,
                       options: LossOptions, vocab_size: int) -> RowTerms:
    """`row_terms` from the targets' `TargetWeights`."""
    kt = targets.num_target
    valid_t = targets.valid[:, :kt]
    logq = torch.where(targets.valid, slot_logits - lse[:, None], 0.0)
    logq_t = logq[:, :kt]
    a = targets.weights[:, :kt]
    token_loss = -(a * logq_t).sum(dim=1)
    row_coef = a.sum(dim=1)
    slot_coef = a
    if targets.rest is not None:
        q = torch.where(valid_t, logq_t.exp(), 0.0)
        q_sum = q.sum(dim=1)
        outside = 1.0 - q_sum
        clamped = outside < BUCKET_CLAMP
        token_loss = token_loss - targets.rest * outside.clamp_min(BUCKET_CLAMP).log()
        # Where the clamp binds its gradient is zero; elsewhere outside >= 1e-6.
        beta = torch.where(clamped, 0.0, targets.rest / torch.where(clamped, 1.0, outside))
        row_coef = row_coef - beta * q_sum
        slot_coef = a - beta[:, None] * q
    eps = options.label_smoothing
    if eps:
        token_loss = (1.0 - eps) * token_loss + eps * (lse - logit_sum / vocab_size)
        row_coef = (1.0 - eps) * row_coef + eps
        slot_coef = (1.0 - eps) * slot_coef
    if options.z_loss:
        token_loss = token_loss + options.z_loss * lse.square()
        row_coef = row_coef + 2.0 * options.z_loss * lse
    # An ignored row has no loss, so no smoothing or z-loss gradient either.
    row_valid = valid_t.any(dim=1)
    token_loss = torch.where(row_valid, token_loss, 0.0)
    row_coef = torch.where(row_valid, row_coef, 0.0)
    uniform = row_valid.to(lse.dtype) * (eps / vocab_size) if eps else None
    if targets.weights.shape[1] > kt:
        w_extra = targets.weights[:, kt:]
        row_coef = row_coef + w_extra.sum(dim=1)
        slot_coef = torch.cat([slot_coef, w_extra], dim=1)
    return RowTerms(token_loss, logq_t, row_coef, slot_coef, uniform)


def row_weights(row_valid: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """d(reduced loss)/d(token loss) for the scalar reductions: 1/count or 1 on valid rows."""
    weights = row_valid.to(dtype)
    if reduction == "mean":
        weights = weights / weights.sum().clamp_min(1.0)
    return weights


def row_upstream(grad_loss: Tensor, row_valid: Tensor, reduction: str, dtype: torch.dtype) -> Tensor:
    """Each row's upstream gradient: `grad_loss` [N] itself for "none", else scalar x row_weights."""
    if reduction == "none":
        return grad_loss.to(dtype)
    return row_weights(row_valid, reduction, dtype) * grad_loss.to(dtype)
