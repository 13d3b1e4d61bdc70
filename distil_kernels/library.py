"""The ops as `torch.library` custom ops, so `torch.compile(fullgraph=True)` traces them.

Under `torch.compile` the public functions route their work through these ops (each
with a fake implementation giving output shapes and dtypes, and the loss ops with
registered autograd), so Dynamo sees one opaque node per vocabulary pass instead of
Python loops over chunks, Triton launches and host-side bookkeeping. Eagerly the public
functions call the backends directly, as before.

    distil_kernels::loss_stats        lse, logits at the slot ids, logit sums (no autograd)
    distil_kernels::loss_gradients    d_input, d_weight, d_bias for per-row coefficients
    distil_kernels::linear_cross_entropy    the loss and its stats; backward: loss_gradients
    distil_kernels::coefficient_loss  distil_loss's precomputed loss; backward: loss_gradients
    distil_kernels::linear_topk, distil_kernels::linear_sample    (no autograd)

A compiled loss always takes the statistics pass and, in backward, the gradient pass:
8*N*V*d FLOPs where the eager chunked and cuda backends fuse the gradients into the
forward (6*N*V*d). The `torch` backend's compiled gradients come from the chunked pass
(the same arithmetic in fp32). With `filter_eps`, the compiled triton backward repeats
the statistics pass to get the per-block maxima the filter reads.
"""

# No `from __future__ import annotations`: torch 2.4's custom_op reads the annotations
# as objects and refuses the strings that import leaves.
from typing import Optional

import torch
from torch import Tensor

from .loss.options import LossOptions
from .loss.reference import compute_dtype, reduce_loss, reference_logits
from .loss.targets import Slots, row_terms, row_upstream

_EMPTY = (0,)


def _options(ignore_index: int, reduction: str, label_smoothing: float, temperature: float,
             softcap: Optional[float], z_loss: float, tail: str, filter_eps: Optional[float],
             workspace_bytes: Optional[int]) -> LossOptions:
    return LossOptions(ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
                       temperature=temperature, softcap=softcap, z_loss=z_loss, tail=tail, filter_eps=filter_eps,
                       workspace_bytes=workspace_bytes)


def option_args(options: LossOptions, dtype: torch.dtype) -> tuple:
    """LossOptions as the ops' scalar arguments (filter_eps resolved for `dtype`)."""
    return (options.ignore_index, options.reduction, float(options.label_smoothing), float(options.temperature),
            None if options.softcap is None else float(options.softcap), float(options.z_loss), options.tail,
            options.resolved_filter_eps(dtype), options.workspace_bytes)


def _or_none(t: Tensor, label_smoothing: float) -> Tensor | None:
    """The ops pass an optional [N] tensor (logit sums, the uniform coefficient: both exist
    only with label smoothing) as an empty one (custom ops return no None). Whether it
    exists comes from the option, not from its size: with N = 0 rows a present one is empty.
    """
    return t if label_smoothing else None


# --------------------------------------------------------------------------------------
# The two vocabulary passes
# --------------------------------------------------------------------------------------


def _stats(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor,
           options: LossOptions) -> tuple[Tensor, Tensor, Tensor | None]:
    if backend == "torch":
        z = reference_logits(x, weight, bias, options)
        lse = torch.logsumexp(z, dim=1)
        logit_sum = z.sum(dim=1) if options.label_smoothing else None
        return lse, z.gather(1, slot_ids), logit_sum
    from .loss.passes import stats_pass

    stats = stats_pass(backend, x, weight, bias, slot_ids, options)
    return stats.lse, stats.slot_logits, stats.logit_sum


@torch.library.custom_op("distil_kernels::loss_stats", mutates_args=())
def loss_stats(x: Tensor, weight: Tensor, bias: Optional[Tensor], slot_ids: Tensor, ignore_index: int,
               reduction: str, label_smoothing: float, temperature: float, softcap: Optional[float], z_loss: float,
               tail: str, filter_eps: Optional[float], workspace_bytes: Optional[int],
               backend: str) -> tuple[Tensor, Tensor, Tensor]:
    options = _options(ignore_index, reduction, label_smoothing, temperature, softcap, z_loss, tail, filter_eps,
                       workspace_bytes)
    with torch.no_grad():
        lse, slot_logits, logit_sum = _stats(backend, x, weight, bias, slot_ids, options)
    empty = lse.new_empty(_EMPTY)
    return lse.clone(), slot_logits.clone(), empty if logit_sum is None else logit_sum.clone()


@loss_stats.register_fake
def _(x, weight, bias, slot_ids, ignore_index, reduction, label_smoothing, temperature, softcap, z_loss, tail,
      filter_eps, workspace_bytes, backend):
    cdt = compute_dtype(x.dtype)
    n = x.shape[0]
    return (x.new_empty((n,), dtype=cdt), x.new_empty(tuple(slot_ids.shape), dtype=cdt),
            x.new_empty((n,) if label_smoothing else _EMPTY, dtype=cdt))


def _gradients(backend: str, x: Tensor, weight: Tensor, bias: Tensor | None, slot_ids: Tensor, lse: Tensor,
               slot_logits: Tensor, logit_sum: Tensor | None, row_coef: Tensor, slot_coef: Tensor,
               uniform: Tensor | None, options: LossOptions, need: tuple[bool, bool, bool]):
    from .loss.chunked import SweepStats, chunked_gradients

    if backend == "triton":
        from .loss.triton import TritonStats, triton_gradients
        from .loss.triton.configs import FORWARD_DEFAULT
        from .loss.triton.lse_forward import ForwardStats, lse_forward

        if options.resolved_filter_eps(x.dtype) is not None:
            # The per-block maxima the filter reads, from the lse pass; the statistics
            # themselves stay those given (a vocabulary shard's own lse is not the row's).
            fresh = lse_forward(x, weight, bias, options)
            forward = ForwardStats(lse, logit_sum, fresh.block_max, fresh.config)
        else:
            forward = ForwardStats(lse, logit_sum, lse.new_empty((1, 1)), FORWARD_DEFAULT)
        stats = TritonStats(lse, slot_logits, logit_sum, forward)
        return triton_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)
    stats = SweepStats(lse, slot_logits, logit_sum)
    if backend == "cuda":
        from .loss.cuda import cuda_gradients

        return cuda_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)
    return chunked_gradients(x, weight, bias, slot_ids, stats, row_coef, slot_coef, uniform, options, need)


@torch.library.custom_op("distil_kernels::loss_gradients", mutates_args=())
def loss_gradients(x: Tensor, weight: Tensor, bias: Optional[Tensor], slot_ids: Tensor, lse: Tensor,
                   slot_logits: Tensor, logit_sum: Tensor, row_coef: Tensor, slot_coef: Tensor, uniform: Tensor,
                   ignore_index: int, reduction: str, label_smoothing: float, temperature: float,
                   softcap: Optional[float], z_loss: float, tail: str, filter_eps: Optional[float],
                   workspace_bytes: Optional[int], backend: str, need_input: bool, need_weight: bool,
                   need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients for coefficients already scaled by the upstream gradient; empty where not needed."""
    options = _options(ignore_index, reduction, label_smoothing, temperature, softcap, z_loss, tail, filter_eps,
                       workspace_bytes)
    with torch.no_grad():
        d_x, d_w, d_b = _gradients(backend, x, weight, bias, slot_ids, lse, slot_logits,
                                   _or_none(logit_sum, label_smoothing), row_coef, slot_coef,
                                   _or_none(uniform, label_smoothing), options,
                                   (need_input, need_weight, need_bias and bias is not None))
    # One empty tensor each: a custom op's outputs may not alias one another (a frozen
    # head without a bias leaves two of them empty).
    return tuple(x.new_empty(_EMPTY) if g is None else g for g in (d_x, d_w, d_b))


@loss_gradients.register_fake
def _(x, weight, bias, slot_ids, lse, slot_logits, logit_sum, row_coef, slot_coef, uniform, ignore_index, reduction,
      label_smoothing, temperature, softcap, z_loss, tail, filter_eps, workspace_bytes, backend, need_input,
      need_weight, need_bias):
    return (torch.empty_like(x) if need_input else x.new_empty(_EMPTY),
            torch.empty_like(weight) if need_weight else x.new_empty(_EMPTY),
            bias.new_empty(bias.shape, dtype=compute_dtype(x.dtype)) if (need_bias and bias is not None)
            else x.new_empty(_EMPTY))


def _grads_from(outputs: tuple[Tensor, Tensor, Tensor], needs: tuple[bool, ...]):
    return tuple(g if need else None for g, need in zip(outputs, needs))


# --------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------


@torch.library.custom_op("distil_kernels::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], slot_ids: Tensor,
                            slot_weights: Tensor, slot_valid: Tensor, num_target: int, ignore_index: int,
                            reduction: str, label_smoothing: float, temperature: float, softcap: Optional[float],
                            z_loss: float, tail: str, filter_eps: Optional[float], workspace_bytes: Optional[int],
                            backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, lse, token_loss, target logprobs, slot logits, logit sums or empty)."""
    args = (ignore_index, reduction, label_smoothing, temperature, softcap, z_loss, tail, filter_eps, workspace_bytes)
    options = _options(*args)
    lse, slot_logits, logit_sum = loss_stats(x, weight, bias, slot_ids, *args, backend)
    slots = Slots(slot_ids, slot_weights, slot_valid, num_target)
    terms = row_terms(lse, slot_logits, _or_none(logit_sum, label_smoothing), slots, options, weight.shape[0])
    loss = reduce_loss(terms.token_loss, slots.row_valid, reduction)
    return loss, lse.clone(), terms.token_loss.clone(), terms.target_logprobs, slot_logits, logit_sum


@linear_cross_entropy_op.register_fake
def _(x, weight, bias, slot_ids, slot_weights, slot_valid, num_target, ignore_index, reduction, label_smoothing,
      temperature, softcap, z_loss, tail, filter_eps, workspace_bytes, backend):
    cdt = compute_dtype(x.dtype)
    n = x.shape[0]
    loss = x.new_empty((n,) if reduction == "none" else (), dtype=cdt)
    return (loss, x.new_empty((n,), dtype=cdt), x.new_empty((n,), dtype=cdt), x.new_empty((n, num_target), dtype=cdt),
            x.new_empty(tuple(slot_ids.shape), dtype=cdt), x.new_empty((n,) if label_smoothing else _EMPTY, dtype=cdt))


def _lce_setup(ctx, inputs, output):
    x, weight, bias, slot_ids, slot_weights, slot_valid = inputs[:6]
    ctx.scalars = inputs[6:]
    ctx.has_bias = bias is not None
    _, lse, token_loss, target_logprobs, slot_logits, logit_sum = output
    # The stats are detached, as the eager backends return them: gradients reach the
    # operands through the loss only.
    ctx.mark_non_differentiable(lse, token_loss, target_logprobs, slot_logits, logit_sum)
    ctx.save_for_backward(x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum)


def _lce_backward(ctx, grad_loss, *_unused):
    x, weight, bias, slot_ids, slot_weights, slot_valid, lse, slot_logits, logit_sum = ctx.saved_tensors
    num_target, *args = ctx.scalars
    backend = args[-1]
    options = _options(*args[:-1])
    slots = Slots(slot_ids, slot_weights, slot_valid, num_target)
    terms = row_terms(lse, slot_logits, _or_none(logit_sum, options.label_smoothing), slots, options,
                      weight.shape[0])
    upstream = row_upstream(grad_loss, slots.row_valid, options.reduction, lse.dtype)
    uniform = lse.new_empty(_EMPTY) if terms.uniform is None else terms.uniform * upstream
    needs = ctx.needs_input_grad[:3]
    grads = loss_gradients(x, weight, bias, slot_ids, lse, slot_logits, logit_sum, terms.row_coef * upstream,
                           terms.slot_coef * upstream[:, None], uniform, *args[:-1], backend, *needs)
    return (*_grads_from(grads, needs), None, None, None) + (None,) * len(ctx.scalars)


linear_cross_entropy_op.register_autograd(_lce_backward, setup_context=_lce_setup)


# --------------------------------------------------------------------------------------
# distil_loss's weighted loss
# --------------------------------------------------------------------------------------


@torch.library.custom_op("distil_kernels::coefficient_loss", mutates_args=())
def coefficient_loss(x: Tensor, weight: Tensor, bias: Optional[Tensor], value: Tensor, slot_ids: Tensor,
                     row_coef: Tensor, slot_coef: Tensor, lse: Tensor, slot_logits: Tensor, ignore_index: int,
                     reduction: str, label_smoothing: float, temperature: float, softcap: Optional[float],
                     z_loss: float, tail: str, filter_eps: Optional[float], workspace_bytes: Optional[int],
                     backend: str) -> Tensor:
    """`value` itself; its gradient is one gradient pass with the given coefficients."""
    return value.clone()


@coefficient_loss.register_fake
def _(x, weight, bias, value, *args):
    return torch.empty_like(value)


def _coefficient_setup(ctx, inputs, output):
    x, weight, bias, _, slot_ids, row_coef, slot_coef, lse, slot_logits = inputs[:9]
    ctx.scalars = inputs[9:]
    ctx.save_for_backward(x, weight, bias, slot_ids, row_coef, slot_coef, lse, slot_logits)


def _coefficient_backward(ctx, grad_value):
    x, weight, bias, slot_ids, row_coef, slot_coef, lse, slot_logits = ctx.saved_tensors
    g = grad_value.to(row_coef.dtype)
    needs = ctx.needs_input_grad[:3]
    empty = lse.new_empty(_EMPTY)
    grads = loss_gradients(x, weight, bias, slot_ids, lse, slot_logits, empty, row_coef * g, slot_coef * g, empty,
                           *ctx.scalars, *needs)
    return (*_grads_from(grads, needs),) + (None,) * (6 + len(ctx.scalars))


coefficient_loss.register_autograd(_coefficient_backward, setup_context=_coefficient_setup)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@torch.library.custom_op("distil_kernels::linear_topk", mutates_args=())
def linear_topk_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], k: int, softcap: Optional[float],
                   temperature: float, backend: str, workspace_bytes: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    from .sampling.topk import linear_topk

    top = linear_topk(x, weight, k, bias=bias, softcap=softcap, temperature=temperature, backend=backend,
                      workspace_bytes=workspace_bytes)
    # Fresh outputs: a custom op's results may not alias each other or its inputs.
    return top.ids.clone(), top.logprobs.clone(), top.lse.clone()


@linear_topk_op.register_fake
def _(x, weight, bias, k, softcap, temperature, backend, workspace_bytes):
    rows = x.shape[0]
    return (x.new_empty((rows, k), dtype=torch.int64), x.new_empty((rows, k), dtype=torch.float32),
            x.new_empty((rows,), dtype=torch.float32))


@torch.library.custom_op("distil_kernels::linear_sample", mutates_args=())
def linear_sample_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], seed: int, row_seeds: Optional[Tensor],
                     positions: Optional[Tensor], temperature: float, top_k: Optional[int], top_p: Optional[float],
                     min_p: Optional[float], num_samples: int, softcap: Optional[float], backend: str,
                     workspace_bytes: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .sampling.sample import linear_sample

    sample = linear_sample(x, weight, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           seed=seed if row_seeds is None else row_seeds, positions=positions,
                           num_samples=num_samples, bias=bias, softcap=softcap, backend=backend,
                           workspace_bytes=workspace_bytes)
    return tuple(t.clone() for t in sample)


@linear_sample_op.register_fake
def _(x, weight, bias, seed, row_seeds, positions, temperature, top_k, top_p, min_p, num_samples, softcap, backend,
      workspace_bytes):
    rows = x.shape[0]
    return (x.new_empty((rows, num_samples), dtype=torch.int64), x.new_empty((rows, num_samples), dtype=torch.float32),
            x.new_empty((rows, num_samples), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32))

