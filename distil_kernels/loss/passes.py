"""The two vocabulary passes of the fused backends, and a loss built from them.

`distil_loss` needs every row's statistics before it can weigh any row (its credit
term at step t depends on the losses after t), so it runs a statistics pass, computes
per-row coefficients on [B, T] tensors, and makes the gradient pass in backward.
Each fused backend provides both passes with the same meaning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .chunked import chunked_gradients, sweep
from .options import LossOptions


def stats_pass(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor,
               options: LossOptions):
    """lse [N], logits at `slot_ids` [N, K] and (with label smoothing) logit sums [N]."""
    if backend == "triton":
        from .triton import triton_stats

        return triton_stats(x, weight, bias, slot_ids, options)
    if backend == "cuda":
        from .cuda import cuda_sweep

        return cuda_sweep(x, weight, bias, slot_ids, options)
    return sweep(x, weight, bias, slot_ids, options)


def gradient_pass(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, stats,
                  row_coef: Tensor, slot_coef: Tensor, uniform: Tensor | None, options: LossOptions,
                  need: tuple[bool, bool, bool]) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """d_input, d_weight, d_bias of sum_rows (row_coef, slot_coef, uniform) applied to the softmax."""
    if backend == "triton":
        from .triton import triton_gradients

        return triton_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)
    if backend == "cuda":
        from .cuda import cuda_gradients

        return cuda_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)
    return chunked_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)


@dataclass(frozen=True)
class PassParams:
    backend: str
    options: LossOptions
    shard: object = None  # a parallel.VocabShard: the gradient pass of a vocabulary shard


class PrecomputedCoefficientLoss(torch.autograd.Function):
    """A loss whose value is already known and whose gradient is one gradient pass with
    given per-row coefficients (`distil_loss`'s weighted loss pass)."""

    @staticmethod
    def forward(ctx, x, weight, bias, value, slot_ids, row_coef, slot_coef, stats, params: PassParams):
        ctx.params = params
        ctx.stats = stats
        ctx.save_for_backward(x, weight, bias, slot_ids, row_coef, slot_coef)
        return value.clone()

    @staticmethod
    def backward(ctx, grad_value):
        x, weight, bias, slot_ids, row_coef, slot_coef = ctx.saved_tensors
        g = grad_value.to(row_coef.dtype)
        params = ctx.params
        if params.shard is not None:
            from ..parallel import sharded_gradients

            d_x, d_w, d_b = sharded_gradients(
                params.backend, x, weight, bias, slot_ids, ctx.stats.lse, ctx.stats.slot_logits, None, row_coef * g,
                slot_coef * g, None, params.options, ctx.needs_input_grad[:3], params.shard,
            )
            return d_x, d_w, d_b, None, None, None, None, None, None
        d_x, d_w, d_b = gradient_pass(
            params.backend, x, weight, bias, slot_ids, ctx.stats, row_coef * g, slot_coef * g, None,
            params.options, ctx.needs_input_grad[:3],
        )
        return d_x, d_w, d_b, None, None, None, None, None, None
