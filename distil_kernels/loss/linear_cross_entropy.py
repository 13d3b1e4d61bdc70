"""`linear_cross_entropy`: cross-entropy of a linear head without its logits.

Public function and Module; the work is done by a backend (`reference.py` for
`torch`, `chunked.py` for `chunked`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..backends import check_backend_dtype, resolve_backend
from ..parallel import ParallelParams, VocabParallelLinearCrossEntropy, make_shard
from ..validation import check_flags, check_linear, check_target
from .chunked import chunked_linear_cross_entropy
from .options import LossOptions
from .reference import LossStats, compute_dtype, reference_linear_cross_entropy
from .targets import SparseTarget, make_slots


def linear_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor | SparseTarget,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    z_loss: float = 0.0,
    tail: str = "bucket",
    filter_eps: float | str | None = None,
    backend: str = "auto",
    return_stats: bool = False,
    workspace_bytes: int | None = None,
    validate: bool = True,
    process_group=None,
    vocab_start: int = 0,
) -> Tensor | tuple[Tensor, LossStats]:
    """Cross-entropy of `softcap(input @ weight.T + bias) / temperature` against `target`.

    Args:
        input: hidden states [..., d], float16 / bfloat16 / float32 (float64 for tests).
        weight: the head [V, d], input's dtype and device.
        target: class ids [...] (hard labels, as `F.cross_entropy`), or a
            `SparseTarget(ids [..., k], probs [..., k])`, e.g. an expert's top-k.
        bias: [V] or None.
        ignore_index: a hard label, or a sparse slot id, equal to it is padding; a row
            whose ids are all padding is ignored (zero loss, not counted by "mean").
        reduction: "mean" over non-ignored rows (0.0 when there are none), "sum", or
            "none" (a loss per row, shaped like input's leading dims).
        label_smoothing: mixes the target with the uniform distribution, as torch does.
        temperature, softcap: z = softcap * tanh(u / softcap) / temperature.
        z_loss: adds `z_loss * lse(z) ** 2` per row.
        tail: how a sparse row's missing mass is treated: "bucket" (matched to the
            student's mass outside the ids), "renormalize" (probs scaled to sum to one)
            or "ignore" (weights used as given, may be negative).
        filter_eps: lets the triton backward skip vocabulary tiles whose softmax values
            are all below it, never a tile holding a target id ("auto": 2**-12 for
            bfloat16). `torch` and `chunked` are exact and accept it for portability.
        backend: "auto" (triton on CUDA, else chunked), "torch" (materialises fp32
            logits: the reference), "chunked", "triton" or "cuda" (the compiled csrc/
            extension, where the install built it).
        return_stats: also return `LossStats` (lse, token_loss, target_logprobs, each
            over the N flattened rows, fp32).
        workspace_bytes: bound on the logits workspace of `chunked` and `cuda` (None: a
            default sized for the device; `cuda`: 2 GiB) and on each of the triton
            backward's fp32 accumulators, the d_weight chunk and d_input (None: 28 MiB;
            a d_input [N, d] beyond it takes a pass of its own over token chunks).
        validate: check id ranges and probabilities (a host sync on CUDA). With False,
            out-of-range ids are treated as padding. Skipped under torch.compile.
        process_group, vocab_start: vocabulary parallelism (`distil_kernels.parallel`):
            `weight`/`bias` hold rows [vocab_start, vocab_start + V_local) of a vocabulary
            split over the group's ranks, ids are global; every rank gets the unsharded
            loss, stats and input gradient, and the gradient of its own shard.

    Returns:
        The loss in fp32 (float64 for float64 inputs), and the stats if asked.
    """
    options = LossOptions(
        ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        temperature=temperature, softcap=softcap, z_loss=z_loss, tail=tail, filter_eps=filter_eps,
        workspace_bytes=workspace_bytes,
    )
    check_flags(return_stats=return_stats, validate=validate)
    check_linear(input, weight, bias)
    shard = make_shard(process_group, vocab_start, weight)
    vocab_size = weight.shape[0] if shard is None else shard.vocab_size
    # Value checks sync with the host; a compiled graph keeps only the static ones.
    compiling = torch.compiler.is_compiling()
    check_target(target, input, vocab_size, ignore_index, tail, values=validate and not compiling)
    name = resolve_backend(backend, input.device, input.dtype)
    check_backend_dtype(name, input.dtype)
    slots = make_slots(target, vocab_size, ignore_index, compute_dtype(input.dtype))
    x = input.reshape(-1, input.shape[-1])
    if bias is not None:
        # Added to the logits in the compute dtype; autograd casts its gradient back.
        bias = bias.to(compute_dtype(input.dtype))
    if shard is not None:
        params = ParallelParams(options, slots.num_target, name, shard)
        loss, lse, token_loss, logq = VocabParallelLinearCrossEntropy.apply(
            x, weight, bias, slots.ids, slots.weights, slots.valid, params
        )
        stats = LossStats(lse.float(), token_loss.float(), logq.float())
    elif compiling:
        from ..library import linear_cross_entropy_op, option_args

        loss, lse, token_loss, logq, _, _ = linear_cross_entropy_op(
            x, weight, bias, slots.ids, slots.weights, slots.valid, slots.num_target,
            *option_args(options, input.dtype), name,
        )
        stats = LossStats(lse.float(), token_loss.float(), logq.float())
    elif name == "torch":
        loss, stats = reference_linear_cross_entropy(x, weight, bias, slots, options)
    elif name == "triton":
        from .triton import triton_linear_cross_entropy

        loss, stats = triton_linear_cross_entropy(x, weight, bias, slots, options)
    elif name == "cuda":
        from .cuda import cuda_linear_cross_entropy

        loss, stats = cuda_linear_cross_entropy(x, weight, bias, slots, options)
    else:
        loss, stats = chunked_linear_cross_entropy(x, weight, bias, slots, options)
    if reduction == "none":
        loss = loss.reshape(input.shape[:-1])
    return (loss, stats) if return_stats else loss


class LinearCrossEntropy(nn.Module):
    """Module form of `linear_cross_entropy`: `LinearCrossEntropy(**options)(input, weight, target)`."""

    def __init__(self, **options) -> None:
        super().__init__()
        if "bias" in options:
            raise TypeError("LinearCrossEntropy takes bias in forward(input, weight, target, bias=...)")
        # Fail at construction, not at the first batch, on a misspelt or bad option.
        unknown = set(options) - _MODULE_OPTIONS
        if unknown:
            raise TypeError(
                f"LinearCrossEntropy got unknown options {sorted(unknown)}; expected some of {sorted(_MODULE_OPTIONS)}"
            )
        LossOptions(**{k: v for k, v in options.items() if k in _LOSS_OPTION_NAMES})
        resolve_backend(options.get("backend", "auto"), None)
        self.options = dict(options)

    def forward(self, input: Tensor, weight: Tensor, target: Tensor | SparseTarget, bias: Tensor | None = None):
        return linear_cross_entropy(input, weight, target, bias=bias, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


_LOSS_OPTION_NAMES = frozenset(LossOptions.__dataclass_fields__)
_MODULE_OPTIONS = _LOSS_OPTION_NAMES | {"backend", "return_stats", "validate"}
