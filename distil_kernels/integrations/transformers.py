"""`patch_model`: a transformers causal LM whose training loss never builds [tokens x vocab] logits.

The patch replaces the instance's `forward`. In training (`model.training`) with
`labels`, it runs the decoder alone and takes the loss from its last hidden states with
`linear_cross_entropy` on the LM head: the model's own label shift (labels padded with
`ignore_index` and shifted left, or `shift_labels` as given), `ignore_index` (-100 unless
passed), `num_items_in_batch` (a sum divided by it, as transformers' loss does) and the
final-logit softcapping of Gemma 2 and 3. `logits` is None in that output. Anything else
(evaluation, no labels, `generate`) goes to the original forward unchanged.

Covered: Llama, Llama 4, Mistral, Qwen2, Qwen3, Gemma2, Gemma3, and any `*ForCausalLM` whose
logits are its `lm_head` (an `nn.Linear`) applied to the decoder's `last_hidden_state`
and whose loss is transformers' shifted causal-LM loss (`self.loss_function`). Refused,
not silently mis-trained: heads that rescale logits (a `logit_scale`, `logits_scaling`,
`lm_head_multiplier`... in the config) or drop padded vocabulary rows; prediction heads
with layers of their own before the output embedding (BERT, RoBERTa, ELECTRA,
ModernBERT decoders); models that add a z-loss; models whose loss is not the shifted
one (the Bart-style decoders, which take labels already shifted); and mixture-of-experts
models asked for their router's load-balancing loss (`output_router_logits`).
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass

import torch
from torch import nn

from ..backends import major_minor, resolve_backend
from ..loss.linear_cross_entropy import linear_cross_entropy
from ..loss.options import LossOptions

# The oldest transformers whose models the patch reproduces: its tests pass from 4.53 to
# 5.x. Before, models differ from the patched loss (Mistral's forward inlined its own loss
# through 4.46; Gemma 2's gradients with num_items_in_batch differed under 4.48 and 4.51).
MIN_TRANSFORMERS = (4, 53)

# Config attributes that mean the logits are not lm_head(hidden) (up to a final softcap)
# unless they are 1: Cohere, Granite, MiniCPM3, HyperCLOVAX, Falcon-H1, Inkling.
_RESCALING_ATTRIBUTES = ("logit_scale", "logits_scaling", "output_multiplier_scale", "lm_head_multiplier",
                         "logits_mup_width_multiplier")
# The final-logit softcap `c * tanh(u / c)` by its names: Gemma 2/3 and most others,
# RecurrentGemma, xLSTM.
_SOFTCAP_ATTRIBUTES = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")
# Keyword arguments of transformers' causal-LM loss, not of the decoder.
_LOSS_KWARGS = ("num_items_in_batch", "shift_labels", "ignore_index")


@dataclass(frozen=True)
class PatchOptions:
    backend: str
    filter_eps: float | str | None
    softcap: float | None


def _softcap(config) -> float | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for name in _SOFTCAP_ATTRIBUTES:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value:
                return float(value)
    return None


def _decoder(model: nn.Module) -> nn.Module:
    # `base_model_prefix` names the decoder, except where a class shares its prefix with
    # a multimodal sibling (Llama 4's text model says "language_model" and holds `model`).
    prefix = getattr(model, "base_model_prefix", "model")
    for name in dict.fromkeys((prefix, "model")):
        decoder = getattr(model, name, None)
        if isinstance(decoder, nn.Module) and decoder is not model:
            return decoder
    raise TypeError(f"patch_model: {type(model).__name__} has no decoder at model.{prefix} or model.model; "
                    f"expected a transformers *ForCausalLM")


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _check_transformers_version() -> None:
    version = _transformers_version()
    if major_minor(version) < MIN_TRANSFORMERS:
        raise RuntimeError(f"patch_model needs transformers >= 4.53, found {version}: "
                           f"pip install 'transformers>=4.53'")


def _check_model(model: nn.Module) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise TypeError(f"patch_model takes a transformers causal LM (an nn.Module with a config), "
                        f"got {type(model).__name__}")
    _check_transformers_version()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear):
        raise TypeError(f"patch_model: {type(model).__name__}'s output embeddings are "
                        f"{type(head).__name__}, not an nn.Linear LM head")
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        for name in _RESCALING_ATTRIBUTES:
            value = getattr(cfg, name, None) if cfg is not None else None
            if value not in (None, 1, 1.0):
                raise NotImplementedError(f"patch_model: {type(model).__name__} rescales its logits "
                                          f"(config.{name}={value}), which the patched loss does not reproduce")
        unpadded = getattr(cfg, "unpadded_vocab_size", None) if cfg is not None else None
        if unpadded is not None and unpadded < head.out_features:
            raise NotImplementedError(f"patch_model: {type(model).__name__} keeps {unpadded} of its head's "
                                      f"{head.out_features} logits (config.unpadded_vocab_size), which the patched "
                                      f"loss does not reproduce")
        if cfg is not None and getattr(cfg, "z_loss_coefficient", None):
            raise NotImplementedError(f"patch_model: {type(model).__name__} adds a z-loss over every position "
                                      f"(config.z_loss_coefficient={cfg.z_loss_coefficient}), which the patched "
                                      f"loss does not reproduce")
    _check_router_loss(model, getattr(model.config, "output_router_logits", None))
    _check_head_on_decoder(model, head, _decoder(model))
    _check_shifted_loss(model)


def _check_head_on_decoder(model: nn.Module, head: nn.Linear, decoder: nn.Module) -> None:
    # A prediction head with layers before its output embedding (BERT's transform,
    # RoBERTa's dense + norm, ELECTRA's generator) holds parameters outside the decoder
    # and the output embedding, which the patched loss would skip.
    owned = {id(p) for p in decoder.parameters()} | {id(p) for p in head.parameters()}
    skipped = [name for name, p in model.named_parameters() if id(p) not in owned]
    if skipped:
        raise NotImplementedError(f"patch_model: {type(model).__name__}'s logits are not its output embedding "
                                  f"applied to the decoder's last hidden state: parameters such as {skipped[0]} "
                                  f"lie between them, which the patched loss would skip")


def _check_shifted_loss(model: nn.Module) -> None:
    # transformers' shifted causal-LM loss is `self.loss_function`; the Bart-style
    # *ForCausalLM decoders (Bart, mBART, Marian, Pegasus, Whisper, TrOCR...) instead take
    # labels already aligned with the logits and call CrossEntropyLoss on them unshifted.
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source to read (a class built at run time): trust the docs
        return
    if "self.loss_function(" not in source:
        raise NotImplementedError(f"patch_model: {type(model).__name__}'s forward does not compute transformers' "
                                  f"shifted causal-LM loss (self.loss_function), so the patched loss would not "
                                  f"match its own")


def _check_router_loss(model: nn.Module, output_router_logits) -> None:
    # MoE *ForCausalLM add `router_aux_loss_coef * aux_loss` to the loss in their own forward.
    if output_router_logits:
        raise NotImplementedError(f"patch_model: {type(model).__name__} adds its router's load-balancing loss "
                                  f"(output_router_logits=True), which the patched loss does not reproduce; "
                                  f"pass output_router_logits=False")


def _shifted_targets(labels: torch.Tensor, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """Token t predicts token t + 1: labels shifted left, the last position ignored."""
    if shift_labels is not None:
        return shift_labels
    return nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]


def _output(model: nn.Module, decoder_output, loss: torch.Tensor):
    """The model's own output class, with the decoder's cache, hidden states and attentions."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    fields = {name: value for name, value in decoder_output.items() if name != "last_hidden_state"}
    known = CausalLMOutputWithPast.__dataclass_fields__
    return CausalLMOutputWithPast(loss=loss, logits=None, **{k: v for k, v in fields.items() if k in known})


def patch_model(model: nn.Module, *, backend: str = "auto", filter_eps: float | str | None = None) -> nn.Module:
    """Patch a transformers causal LM in place (and return it): see the module docstring.

    `backend` and `filter_eps` go to `linear_cross_entropy`. Patching again replaces the
    options; `model.forward` stays the original's when the patch does not apply.
    """
    _check_model(model)
    # A bad backend name or filter_eps fails here, not at the first step.
    resolve_backend(backend, None)
    LossOptions(filter_eps=filter_eps)
    state = getattr(model, "_distil_kernels_patch", None)
    original = state[1] if state is not None else model.forward
    options = PatchOptions(backend, filter_eps, _softcap(model.config))
    signature = inspect.signature(original)

    # A method of `model`, not a closure over it: `copy.deepcopy` (reference and EMA models)
    # rebinds it and the original forward in the state to the copy.
    def forward(model, *args, **kwargs):
        options, original = model._distil_kernels_patch
        if not (model.training and _labels(signature, args, kwargs) is not None):
            return original(*args, **kwargs)
        bound = signature.bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        for name, parameter in signature.parameters.items():
            if parameter.kind is inspect.Parameter.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        labels = arguments.pop("labels")
        loss_kwargs = {name: arguments.pop(name) for name in _LOSS_KWARGS if name in arguments}
        return_dict = arguments.pop("return_dict", None)
        _check_router_loss(model, arguments.get("output_router_logits",
                                                getattr(model.config, "output_router_logits", None)))
        arguments.pop("logits_to_keep", None)  # the loss needs every position
        decoder_output = _decoder(model)(**arguments)
        hidden = decoder_output.last_hidden_state
        head = model.get_output_embeddings()
        ignore_index = loss_kwargs.get("ignore_index", -100)
        targets = _shifted_targets(labels, loss_kwargs.get("shift_labels"), ignore_index).to(hidden.device)
        num_items = loss_kwargs.get("num_items_in_batch")
        loss = linear_cross_entropy(
            hidden.reshape(-1, hidden.shape[-1]), head.weight, targets.reshape(-1), bias=head.bias,
            ignore_index=ignore_index, reduction="mean" if num_items is None else "sum",
            softcap=options.softcap, filter_eps=options.filter_eps, backend=options.backend,
        )
        if num_items is not None:
            loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
        output = _output(model, decoder_output, loss)
        return output.to_tuple() if return_dict is False else output

    model.forward = types.MethodType(forward, model)
    model._distil_kernels_patch = (options, original)
    return model


def _labels(signature: inspect.Signature, args: tuple, kwargs: dict):
    if "labels" in kwargs:
        return kwargs["labels"]
    names = [n for n, p in signature.parameters.items()
             if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return args[names.index("labels")] if "labels" in names and names.index("labels") < len(args) else None
