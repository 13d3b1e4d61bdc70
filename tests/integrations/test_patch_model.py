"""`patch_model` on tiny random transformers models: the same loss and gradients, no logits.

Each family is built from its config with random weights (no download): Llama, Mistral,
Qwen2, Qwen3 (untied heads), Gemma2 and Gemma3 (tied embeddings and final-logit
softcapping). A patched copy and the original see the same batch with padded labels;
fp32 on the CPU, so the two agree to fp32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch

# patch_model refuses transformers before 4.53 (test_an_older_transformers_is_refused).
transformers = pytest.importorskip("transformers", minversion="4.53")

from distil_kernels import patch_model  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(head_dim=8, final_logit_softcapping=3.0)),
    # base_model_prefix "language_model", its decoder at `model`; a mixture-of-experts layer.
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM", dict(
        head_dim=8, intermediate_size_mlp=64, num_local_experts=2, attention_chunk_size=4, moe_layers=[1],
        layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0])),
}


def tiny_model(family: str, seed: int = 0):
    config_name, model_name, extra = FAMILIES[family]
    config = getattr(transformers, config_name)(**COMMON, **extra)
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(config).float()


def test_an_older_transformers_is_refused(monkeypatch):
    """patch_model reproduces the models of transformers >= 4.53 (its tests pass there); with
    an older one it says so instead of patching."""
    from distil_kernels.integrations import transformers as integration

    model = tiny_model("llama")
    monkeypatch.setattr(integration, "_transformers_version", lambda: "4.52.4")
    with pytest.raises(RuntimeError, match=r"patch_model needs transformers >= 4.53, found 4.52.4: "
                                           r"pip install 'transformers>=4.53'"):
        patch_model(model)
    monkeypatch.setattr(integration, "_transformers_version", lambda: "4.53.0.dev0")
    assert patch_model(model) is model


def batch(seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (3, 11), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[2, :4] = 0  # a left-padded row
    labels = ids.clone()
    labels[attention_mask == 0] = -100
    labels[0, 5:7] = -100
    return ids, attention_mask, labels


def loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs)
    out.loss.backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("num_items", [None, 13], ids=["mean", "num_items_in_batch"])
def test_training_loss_and_every_gradient_match(family, num_items):
    reference = tiny_model(family).train()
    patched = patch_model(copy.deepcopy(reference), backend="chunked")
    ids, attention_mask, labels = batch()
    extra = {} if num_items is None else dict(num_items_in_batch=torch.tensor(num_items))
    want, want_grads = loss_and_grads(reference, input_ids=ids, attention_mask=attention_mask, labels=labels, **extra)
    got, got_grads = loss_and_grads(patched, input_ids=ids, attention_mask=attention_mask, labels=labels, **extra)
    assert got.logits is None
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_head_with_a_bias_and_logits_to_keep():
    """The head's bias enters the loss and gets its gradient; `logits_to_keep` does not shorten the loss."""
    reference = tiny_model("qwen2").train()
    torch.manual_seed(4)
    reference.lm_head = torch.nn.Linear(32, 97, bias=True)
    patched = patch_model(copy.deepcopy(reference), backend="chunked")
    ids, attention_mask, labels = batch()
    want, want_grads = loss_and_grads(reference, input_ids=ids, attention_mask=attention_mask, labels=labels)
    got, got_grads = loss_and_grads(patched, input_ids=ids, attention_mask=attention_mask, labels=labels,
                                    logits_to_keep=1)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert "lm_head.bias" in got_grads and set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_shift_labels_and_ignore_index_are_honoured():
    reference = tiny_model("llama").train()
    patched = patch_model(copy.deepcopy(reference), backend="torch")
    ids, attention_mask, _ = batch(seed=2)
    # Targets that are not the labels' own shift, so a patch that shifted `labels` itself
    # would give another loss; no -100 anywhere, so only -1 can mark the ignored ones.
    gen = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 97, ids.shape, generator=gen)
    shifted = torch.randint(0, 97, ids.shape, generator=gen)
    shifted[attention_mask == 0] = -1
    shifted[0, 5:7] = -1
    inputs = dict(input_ids=ids, attention_mask=attention_mask, labels=labels, shift_labels=shifted, ignore_index=-1)
    want, _ = loss_and_grads(reference, **inputs)
    got, _ = loss_and_grads(patched, **inputs)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_eval_and_generate_are_unchanged(family):
    reference = tiny_model(family).eval()
    patched = patch_model(copy.deepcopy(reference))
    ids, attention_mask, labels = batch(seed=3)
    with torch.no_grad():
        want = reference(input_ids=ids, attention_mask=attention_mask, labels=labels)
        got = patched(input_ids=ids, attention_mask=attention_mask, labels=labels)
    assert got.logits is not None
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(patched.generate(ids[:1], **kwargs), reference.generate(ids[:1], **kwargs))


def test_training_without_labels_returns_logits():
    patched = patch_model(tiny_model("qwen2").train())
    ids, attention_mask, _ = batch()
    assert patched(input_ids=ids, attention_mask=attention_mask).logits.shape == (3, 11, 97)


def test_return_dict_false_gives_a_tuple_with_the_loss_first():
    patched = patch_model(tiny_model("llama").train(), backend="chunked")
    ids, attention_mask, labels = batch()
    out = patched(input_ids=ids, attention_mask=attention_mask, labels=labels, return_dict=False)
    assert isinstance(out, tuple) and out[0].dim() == 0


def test_patching_twice_replaces_the_options():
    model = tiny_model("llama").train()
    patch_model(model, backend="torch")
    patch_model(model, backend="chunked", filter_eps=1e-3)
    options, _ = model._distil_kernels_patch
    assert options.backend == "chunked" and options.filter_eps == 1e-3
    ids, attention_mask, labels = batch()
    assert model(input_ids=ids, attention_mask=attention_mask, labels=labels).logits is None


def test_refuses_what_it_cannot_reproduce():
    with pytest.raises(TypeError, match="transformers causal LM"):
        patch_model(torch.nn.Linear(3, 4))
    model = tiny_model("llama")
    model.config.logit_scale = 0.5
    with pytest.raises(NotImplementedError, match="logit_scale"):
        patch_model(model)
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_model(tiny_model("llama"), backend="fast")


@pytest.mark.parametrize("name, value", [("lm_head_multiplier", 0.25), ("logits_mup_width_multiplier", 2.0),
                                         ("unpadded_vocab_size", 90), ("z_loss_coefficient", 1e-4)])
def test_refuses_config_terms_it_does_not_reproduce(name, value):
    """Falcon-H1 scales its logits, Inkling scales them and drops padded vocabulary rows, Bamba adds a z-loss."""
    model = tiny_model("llama")
    setattr(model.config, name, value)
    with pytest.raises(NotImplementedError, match=name):
        patch_model(model)


SMALL_ENCODER = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
SMALL_BART = dict(vocab_size=97, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                  decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)


@pytest.mark.parametrize("family, match", [
    ("BertLMHeadModel", "cls.predictions.transform"),  # dense + norm before the output embedding
    ("RobertaForCausalLM", "lm_head.dense"),
    ("BartForCausalLM", "shifted causal-LM loss"),  # takes labels already shifted, unshifted CrossEntropyLoss
])
def test_refuses_heads_and_losses_it_would_mis_train(family, match):
    if family == "BartForCausalLM":
        model = transformers.BartForCausalLM(transformers.BartConfig(**SMALL_BART))
    else:
        config_name = family.replace("LMHeadModel", "Config").replace("ForCausalLM", "Config")
        model = getattr(transformers, family)(getattr(transformers, config_name)(**SMALL_ENCODER, is_decoder=True))
    with pytest.raises(NotImplementedError, match=match):
        patch_model(model)


def test_recurrent_gemma_logits_soft_cap():
    """RecurrentGemma names its final-logit softcap `logits_soft_cap`."""
    config = transformers.RecurrentGemmaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, lru_width=32,
                                               attention_window_size=16, logits_soft_cap=3.0, use_cache=False)
    torch.manual_seed(0)
    reference = transformers.RecurrentGemmaForCausalLM(config).float().train()
    patched = patch_model(copy.deepcopy(reference), backend="chunked")
    ids, attention_mask, labels = batch()
    want, want_grads = loss_and_grads(reference, input_ids=ids, attention_mask=attention_mask, labels=labels)
    got, got_grads = loss_and_grads(patched, input_ids=ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(got.loss, want.loss, rtol=1e-5, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_deep_copy_trains_its_own_weights():
    """`copy.deepcopy` of a patched model (a reference or EMA model) runs on the copy's parameters."""
    patched = patch_model(tiny_model("llama").train(), backend="chunked")
    duplicate = copy.deepcopy(patched)
    with torch.no_grad():
        duplicate.lm_head.weight.mul_(2.0)
    ids, attention_mask, labels = batch()
    loss_and_grads(patched, input_ids=ids, attention_mask=attention_mask, labels=labels)
    patched.zero_grad()
    out, grads = loss_and_grads(duplicate, input_ids=ids, attention_mask=attention_mask, labels=labels)
    assert out.logits is None and "lm_head.weight" in grads
    assert all(p.grad is None for p in patched.parameters())
    unpatched = copy.deepcopy(duplicate)
    del unpatched.forward, unpatched._distil_kernels_patch  # back to the class's forward
    want, _ = loss_and_grads(unpatched, input_ids=ids, attention_mask=attention_mask, labels=labels)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_refuses_a_router_load_balancing_loss():
    """MoE models add `router_aux_loss_coef * aux_loss` to the loss when router logits are output."""
    config = transformers.MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    patched = patch_model(transformers.MixtralForCausalLM(config).train(), backend="chunked")
    ids, attention_mask, labels = batch()
    assert patched(input_ids=ids, attention_mask=attention_mask, labels=labels).logits is None
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        patched(input_ids=ids, attention_mask=attention_mask, labels=labels, output_router_logits=True)
    patched.config.output_router_logits = True
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        patched(input_ids=ids, attention_mask=attention_mask, labels=labels)
    with pytest.raises(NotImplementedError, match="output_router_logits"):
        patch_model(patched)
    assert patched(input_ids=ids, attention_mask=attention_mask, labels=labels,
                   output_router_logits=False).logits is None


def test_a_bad_filter_eps_fails_when_patching():
    with pytest.raises(ValueError, match="filter_eps"):
        patch_model(tiny_model("llama"), filter_eps=2.0)
