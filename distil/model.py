"""The student (and model experts): a transformers causal LM, its tokenizer, its LM head.

Rollouts and losses never call the model's own head: they take the decoder's last
hidden states and hand them, with the head's weight, to `linear_sample`,
`linear_topk` and `distil_loss`, so no [tokens x vocab] logits exist. `Head` carries
what those ops need to reproduce the model's logits: weight, bias and the final-logit
softcap (Gemma 2).
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .tokenizer import CharTokenizer, HFTokenizer, Tokenizer


@dataclass(frozen=True)
class TinyConfig:
    """The built-in student of the demo: a small Llama over the character tokenizer."""

    hidden_size: int = 128
    intermediate_size: int = 384  # 3x the width
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    max_position_embeddings: int = 256


@dataclass
class Head:
    weight: Tensor  # [V, d]
    bias: Tensor | None
    softcap: float | None


@dataclass
class LanguageModel:
    model: nn.Module
    tokenizer: Tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def head(self) -> Head:
        return head_of(self.model)


def flash_attention_available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None


def tiny_student(seed: int, device: torch.device, config: TinyConfig = TinyConfig()) -> LanguageModel:
    """A randomly initialised tiny Llama (seeded) over `CharTokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = CharTokenizer()
    llama = LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, bos_token_id=tokenizer.bos_id,
        eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, tie_word_embeddings=False,
    )
    if flash_attention_available(device):
        llama._attn_implementation = "flash_attention_2"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama)
    return LanguageModel(model.to(device), tokenizer)


def load_model(path: str | Path, device: torch.device, what: str = "--model") -> LanguageModel:
    """A transformers causal LM and its tokenizer from a local directory (no downloads).

    `what` names the option that gave the path, for the errors: a directory without
    weights or with a config transformers does not know is a ValueError naming it, and so
    is one without a tokenizer (transformers would then build an empty one that encodes
    every prompt to nothing, and the run would train on empty prompts)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} must be a local directory holding a transformers causal LM; "
                                f"{str(path)!r} is not a directory (nothing is downloaded)")
    kwargs = {"local_files_only": True}
    if flash_attention_available(device):
        kwargs["attn_implementation"] = "flash_attention_2"
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs).to(device)
        inner = AutoTokenizer.from_pretrained(path, local_files_only=True)
    # ImportError: transformers 4.x, short of a tokenizer's files, tries converting one and
    # asks for protobuf or sentencepiece.
    except (OSError, ValueError, KeyError, ImportError) as err:
        reason = " ".join(str(err).split())
        raise ValueError(f"{what} {str(path)!r}: not a transformers causal LM with its tokenizer: {reason}") from None
    tokenizer = HFTokenizer(inner)
    rows = head_of(model).weight.shape[0]
    sample = "12+34=\nsort: b a"
    ids = tokenizer.encode(sample)
    if not ids:
        raise ValueError(f"{what} {str(path)!r}: its tokenizer encodes {sample!r} to no tokens "
                         f"(no tokenizer files there?)")
    largest = max(ids + [tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id])
    if largest >= rows:
        raise ValueError(f"{what} {str(path)!r}: its tokenizer gives id {largest}, beyond the model's "
                         f"{rows}-row output head")
    return LanguageModel(model, tokenizer)


def head_of(model: nn.Module) -> Head:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"{type(model).__name__} has no nn.Linear output head (got {type(head).__name__}); "
                        f"the trainer needs the LM head's weight")
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return Head(head.weight, head.bias, float(softcap) if softcap else None)


def _decoder(model: nn.Module) -> nn.Module:
    if hasattr(model, "get_decoder"):
        return model.get_decoder()
    return getattr(model, model.base_model_prefix)


def _cache_keyword(decoder: nn.Module) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache`; support both.
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


def hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None,
                  cache=None, use_cache: bool = False):
    """(last hidden states [B, L, d] after the final norm, cache): the decoder without the head."""
    decoder = _decoder(model)
    keyword = _cache_keyword(decoder)
    out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                  use_cache=use_cache, **{keyword: cache})
    return out.last_hidden_state, getattr(out, keyword, None)
