"""The `triton` backend: statistics pass, gradient pass, and the autograd Function.

Forward: the lse kernel and the indexed dot give every row's statistics; the per-row
algebra (`row_terms`) turns them into the loss. Backward: the same algebra gives each
row's gradient coefficients, scaled by the upstream gradient; a fused kernel recomputes
the tiles into bounded buffers of their gradient, which GEMMs push into d_input and
d_weight (backward.py). 2*N*V*d FLOPs forward, 6*N*V*d backward (8 when d_input takes a
pass of its own); O(N*k) saved statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..options import LossOptions
from ..reference import LossStats, reduce_loss
from ..targets import Slots, row_terms, row_upstream
from .backward import backward
from .indexed_dot import indexed_dot
from .lse_forward import ForwardStats, lse_forward


@dataclass(frozen=True)
class TritonStats:
    lse: Tensor  # [N] fp32
    slot_logits: Tensor  # [N, K] fp32
    logit_sum: Tensor | None  # [N] fp32, with label smoothing
    forward: ForwardStats  # carries the per-block maxima for filter_eps


def triton_stats(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor,
                 options: LossOptions) -> TritonStats:
    forward = lse_forward(x, weight, bias, options)
    return TritonStats(forward.lse, indexed_dot(x, weight, bias, slot_ids, options), forward.logit_sum, forward)


def triton_gradients(x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, stats: TritonStats,
                     row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None, options: LossOptions,
                     need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """Gradients for per-row coefficients already scaled by the upstream gradient."""
    inv_t = 1.0 / options.temperature
    result = backward(
        x, weight, bias, slot_ids, stats.lse, (row_coef * inv_t).float(), (slot_coef * inv_t).float(),
        None if uniform is None else (uniform * inv_t).float(), stats.forward, options, need,
    )
    return result.d_input, result.d_weight, result.d_bias


@dataclass(frozen=True)
class TritonParams:
    options: LossOptions
    num_target: int


class TritonLinearCrossEntropy(torch.autograd.Function):
    """Loss of 2-D `x` against `Slots`; outputs (loss, lse, token_loss, target_logprobs)."""

    @staticmethod
    def forward(ctx, x, weight, bias, slot_ids, slot_weights, slot_valid, params: TritonParams):
        options = params.options
        slots = Slots(slot_ids, slot_weights, slot_valid, params.num_target)
        stats = triton_stats(x, weight, bias, slots.ids, options)
        terms = row_terms(stats.lse, stats.slot_logits, stats.logit_sum, slots, options, weight.shape[0])
        loss = reduce_loss(terms.token_loss, slots.row_valid, options.reduction)
        token_loss = terms.token_loss.clone() if options.reduction == "none" else terms.token_loss
        ctx.params = params
        # Not the ForwardStats itself: it holds lse, an output, and would make a reference cycle.
        ctx.block_max, ctx.forward_config = stats.forward.block_max, stats.forward.config
        ctx.save_for_backward(x, weight, bias, slot_ids, slot_weights, slot_valid,
                              stats.lse, stats.slot_logits, stats.logit_sum)
        ctx.mark_non_differentiable(stats.lse, token_loss, terms.target_logprobs)
        return loss, stats.lse, token_loss, terms.target_logprobs

    @staticmethod
    def backward(ctx, grad_loss, _grad_lse, _grad_token_loss, _grad_logq):
        x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum = ctx.saved_tensors
        options = ctx.params.options
        slots = Slots(slot_ids, slot_weights, slot_valid, ctx.params.num_target)
        terms = row_terms(lse, slot_logits, logit_sum, slots, options, weight.shape[0])
        upstream = row_upstream(grad_loss, slots.row_valid, options.reduction, torch.float32)
        uniform = None if terms.uniform is None else terms.uniform * upstream
        forward = ForwardStats(lse, logit_sum, ctx.block_max, ctx.forward_config)
        stats = TritonStats(lse, slot_logits, logit_sum, forward)
        d_x, d_w, d_b = triton_gradients(
            x, weight, bias, slot_ids, stats, terms.row_coef * upstream, terms.slot_coef * upstream[:, None],
            uniform, options, ctx.needs_input_grad[:3],
        )
        return d_x, d_w, d_b, None, None, None, None


def triton_linear_cross_entropy(x: Tensor, weight: Tensor, bias: Tensor | None, slots: Slots,
                                options: LossOptions) -> tuple[Tensor, LossStats]:
    """Loss (fp32) and stats of 2-D `x` [N, d] by the triton backend."""
    loss, lse, token_loss, logq = TritonLinearCrossEntropy.apply(
        x, weight, bias, slots.ids, slots.weights, slots.valid, TritonParams(options, slots.num_target)
    )
    return loss, LossStats(lse, token_loss, logq)
