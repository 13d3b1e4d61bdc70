"""The `torch` backend: the loss written plainly over materialised logits.

This is the ground truth of the project: tests run it in float64 and compare every
other backend to it, and the benchmarks use it as the eager baseline. It builds the
full [N, V] logits in fp32 (float64 for float64 inputs) and lets autograd
differentiate, so it shares no gradient algebra with the fused backends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .options import BUCKET_CLAMP, LossOptions
from .targets import Slots


@dataclass(frozen=True)
class LossStats:
    """Per-row statistics returned with `return_stats=True` (N = rows, k = slots)."""

    lse: Tensor  # [N] fp32, log-sum-exp of z
    token_loss: Tensor  # [N] fp32, 0 on ignored rows
    target_logprobs: Tensor  # [N, k] fp32, log q at the ids, 0 at padding


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Logits and softmax statistics are fp32 for fp32/fp16/bf16 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_logits(x: Tensor, weight: Tensor, bias: Tensor | None, options: LossOptions) -> Tensor:
    """z = softcap(x @ weight.T + bias) / temperature in the compute dtype, [N, V]."""
    dtype = compute_dtype(x.dtype)
    logits = x.to(dtype) @ weight.to(dtype).T
    if bias is not None:
        logits = logits + bias.to(dtype)
    if options.softcap is not None:
        logits = options.softcap * torch.tanh(logits / options.softcap)
    return logits / options.temperature


def reference_token_loss(z: Tensor, slots: Slots, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """(token_loss [N], lse [N], log q at the target ids [N, k]) from dense logits z [N, V].

    Extra (credit) slots of `slots`, if any, are not part of the loss value.
    """
    kt = slots.num_target
    lse = torch.logsumexp(z, dim=1)
    log_q = z - lse[:, None]
    valid = slots.valid[:, :kt]
    logq_ids = torch.where(valid, log_q.gather(1, slots.ids[:, :kt]), 0.0)
    w = slots.weights[:, :kt]
    if options.tail == "renormalize":
        mass = w.sum(dim=1, keepdim=True)
        w = torch.where(mass > 0, w / torch.where(mass > 0, mass, 1.0), 0.0)
    loss = -(w * logq_ids).sum(dim=1)
    if options.tail == "bucket":
        q_ids = torch.where(valid, logq_ids.exp(), 0.0)
        rest = (1.0 - slots.weights[:, :kt].sum(dim=1)).clamp_min(0.0)
        loss = loss - rest * torch.clamp(1.0 - q_ids.sum(dim=1), min=BUCKET_CLAMP).log()
    eps = options.label_smoothing
    if eps:
        loss = (1.0 - eps) * loss - eps * log_q.mean(dim=1)
    if options.z_loss:
        loss = loss + options.z_loss * lse.square()
    loss = torch.where(valid.any(dim=1), loss, 0.0)
    return loss, lse, logq_ids


def reduce_loss(token_loss: Tensor, row_valid: Tensor, reduction: str) -> Tensor:
    """mean over valid rows (0 when there are none), sum, or the per-row losses."""
    if reduction == "none":
        return token_loss
    total = token_loss.sum()
    if reduction == "sum":
        return total
    return total / row_valid.sum().clamp_min(1).to(total.dtype)


def reference_linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, slots: Slots,
                                   options: LossOptions) -> tuple[Tensor, LossStats]:
    """Loss (reduced as asked, in the compute dtype) and stats of 2-D `x` [N, d]."""
    z = reference_logits(x, weight, bias, options)
    token_loss, lse, logq_ids = reference_token_loss(z, slots, options)
    loss = reduce_loss(token_loss, slots.row_valid, options.reduction)
    stats = LossStats(lse.detach().float(), token_loss.detach().float(), logq_ids.detach().float())
    return loss, stats
