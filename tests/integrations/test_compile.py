"""`torch.compile(fullgraph=True)` traces the public ops: no graph break, same results.

`fullgraph=True` turns any graph break (a host sync such as `.item()`, untraceable
Python) into an error. The `aot_eager` backend runs Dynamo and AOTAutograd, the fake
implementations and the registered autograd of distil_kernels/library.py, without
generating code (the ops' own kernels do the work either way).
"""

from __future__ import annotations

import pytest
import torch

from distil_kernels import SparseTarget, distil_loss, linear_cross_entropy, linear_sample, linear_topk

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def compiled(fn):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend="aot_eager")


def grads_of(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    loss = fn(*leaves)
    loss.sum().backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("kind", ["hard", "sparse"])
@pytest.mark.parametrize("options", [dict(), dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-3, reduction="none")],
                         ids=["plain", "options-none"])
def test_linear_cross_entropy(backend, kind, options):
    gen = torch.Generator().manual_seed(61)
    x, w, b = torch.randn(23, 16, generator=gen), torch.randn(67, 16, generator=gen), torch.randn(67, generator=gen)
    if kind == "hard":
        target = torch.randint(0, 67, (23,), generator=gen)
        target[2] = -100
    else:
        probs = torch.rand(23, 4, generator=gen)
        ids = torch.stack([torch.randperm(67, generator=gen)[:4] for _ in range(23)])
        target = SparseTarget(ids, probs / probs.sum(1, keepdim=True) * 0.9)

    def loss_fn(x, w, b):
        return linear_cross_entropy(x, w, target, bias=b, backend=backend, **options)

    want, want_grads = grads_of(loss_fn, x, w, b)
    got, got_grads = grads_of(compiled(loss_fn), x, w, b)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_distil_loss(backend):
    gen = torch.Generator().manual_seed(62)
    batch, steps, d, v, k = 3, 5, 12, 41, 4
    x = torch.randn(batch, steps, d, generator=gen)
    w = torch.randn(v, d, generator=gen)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(batch * steps)]).reshape(batch, steps, k)
    probs = torch.rand(batch, steps, k, generator=gen)
    expert = SparseTarget(ids, probs / probs.sum(-1, keepdim=True) * 0.8)
    actions = torch.randint(0, v, (batch, steps), generator=gen)
    mask = torch.rand(batch, steps, generator=gen) > 0.2
    group = torch.tensor([0, 0, 1])

    def loss_fn(x, w):
        return distil_loss(x, w, expert, actions, mask, group=group, discount=0.9, future_credit=0.5,
                           backend=backend)

    want, want_grads = grads_of(loss_fn, x, w)
    got, got_grads = grads_of(compiled(loss_fn), x, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("trainable", ["input", "weight", "bias"])
@pytest.mark.parametrize("has_bias", [False, True], ids=["no-bias", "bias"])
def test_linear_cross_entropy_with_frozen_operands(trainable, has_bias):
    """A frozen head (LoRA, a fixed embedding) or frozen hidden states: only the asked-for gradient comes back."""
    if trainable == "bias" and not has_bias:
        pytest.skip("no bias to train")
    gen = torch.Generator().manual_seed(67)
    x, w, b = torch.randn(9, 16, generator=gen), torch.randn(41, 16, generator=gen), torch.randn(41, generator=gen)
    y = torch.randint(0, 41, (9,), generator=gen)

    def loss_fn(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, backend="chunked")

    def leaves():
        named = dict(input=x, weight=w, bias=b if has_bias else None)
        return {name: None if t is None else t.clone().requires_grad_(name == trainable) for name, t in named.items()}

    want, got = leaves(), leaves()
    loss_fn(*want.values()).backward()
    compiled(loss_fn)(*got.values()).backward()
    torch.testing.assert_close(got[trainable].grad, want[trainable].grad, rtol=1e-5, atol=1e-6)
    assert all(t.grad is None for name, t in got.items() if t is not None and name != trainable)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_an_empty_batch_with_label_smoothing(backend, reduction):
    """No rows: the logit sums label smoothing needs are present but empty, not absent."""
    x, w, b = torch.randn(0, 8), torch.randn(29, 8), torch.randn(29)
    y = torch.zeros(0, dtype=torch.int64)

    def loss_fn(x, w, b):
        return linear_cross_entropy(x, w, y, bias=b, label_smoothing=0.1, reduction=reduction, backend=backend)

    want, want_grads = grads_of(loss_fn, x, w, b)
    got, got_grads = grads_of(compiled(loss_fn), x, w, b)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for g, e in zip(got_grads, want_grads):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["chunked", "torch"])
def test_stats_are_detached_as_in_eager(backend):
    """Gradients reach the operands through the loss only, compiled or not."""
    x, w = torch.randn(6, 8, requires_grad=True), torch.randn(29, 8, requires_grad=True)
    y = torch.tensor([1, 2, -100, 4, 5, 6])

    def loss_fn(x, w):
        return linear_cross_entropy(x, w, y, backend=backend, return_stats=True)

    for _, stats in (loss_fn(x, w), compiled(loss_fn)(x, w)):
        assert not any(t.requires_grad for t in (stats.lse, stats.token_loss, stats.target_logprobs))


@pytest.mark.skipif(not hasattr(torch.compiler, "set_stance"), reason="torch.compiler.set_stance needs torch >= 2.6")
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_linear_cross_entropy_with_a_dynamic_number_of_rows(kind):
    """A second row count makes Dynamo's shapes symbolic; that graph then serves every N unchanged."""
    gen = torch.Generator().manual_seed(66)
    w = torch.randn(67, 16, generator=gen)
    options = dict(label_smoothing=0.1, reduction="none", backend="chunked")

    def loss_fn(x, w, target):
        return linear_cross_entropy(x, w, target, return_stats=True, **options)

    compiled_fn = compiled(loss_fn)
    for rows in (7, 12, 30):
        x = torch.randn(rows, 16, generator=gen)
        ids = torch.stack([torch.randperm(67, generator=gen)[:3] for _ in range(rows)])
        target = ids[:, 0].clone() if kind == "hard" else SparseTarget(ids, torch.full((rows, 3), 0.3))
        with torch.compiler.set_stance("fail_on_recompile" if rows == 30 else "default"):
            got, got_grads = grads_of(lambda x, w, t=target: compiled_fn(x, w, t)[0], x, w)
            stats = compiled_fn(x, w, target)[1]
        want, want_grads = grads_of(lambda x, w, t=target: loss_fn(x, w, t)[0], x, w)
        assert got.shape == (rows,)
        assert stats.lse.shape == (rows,) and stats.target_logprobs.shape == (rows, 1 if kind == "hard" else 3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for g, e in zip(got_grads, want_grads):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [dict(temperature=0.8, num_samples=2), dict(top_p=0.7, seed="rows")],
                         ids=["plain", "top_p-row-seeds"])
def test_linear_sample(options):
    gen = torch.Generator().manual_seed(63)
    x, w = torch.randn(9, 16, generator=gen), torch.randn(80, 16, generator=gen)
    options = dict(options)
    if options.get("seed") == "rows":
        options["seed"] = torch.arange(9, dtype=torch.int64) * 31

    def sample_fn(x, w):
        return linear_sample(x, w, backend="chunked", **options)

    want, got = sample_fn(x, w), compiled(sample_fn)(x, w)
    assert torch.equal(got.ids, want.ids)
    for a, e in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_linear_topk():
    gen = torch.Generator().manual_seed(64)
    x, w = torch.randn(2, 5, 16, generator=gen), torch.randn(80, 16, generator=gen)

    def topk_fn(x, w):
        return linear_topk(x, w, 6, temperature=0.7, softcap=3.0, backend="chunked")

    want, got = topk_fn(x, w), compiled(topk_fn)(x, w)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_triton_backend_compiled_on_cuda():
    """The custom ops around the Triton kernels: the compiled loss, gradients and draws are eager's."""
    gen = torch.Generator(device="cuda").manual_seed(65)
    x = torch.randn(300, 256, generator=gen, device="cuda").bfloat16()
    w = (torch.randn(5000, 256, generator=gen, device="cuda") / 16).bfloat16()
    y = torch.randint(0, 5000, (300,), generator=gen, device="cuda")

    def loss_fn(x, w):
        return linear_cross_entropy(x, w, y, softcap=30.0, backend="triton")

    # Deterministic mode fixes the backward's summation order: the same kernels in a fixed
    # order give the same bits, compiled or not.
    torch.use_deterministic_algorithms(True)
    try:
        want, want_grads = grads_of(loss_fn, x, w)
        got, got_grads = grads_of(compiled(loss_fn), x, w)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(got, want)
    for g, e in zip(got_grads, want_grads):
        assert torch.equal(g, e)

    def sample_fn(x, w):
        return linear_sample(x, w, temperature=0.8, seed=3, backend="triton")

    assert torch.equal(compiled(sample_fn)(x, w).ids, sample_fn(x, w).ids)


def test_vocabulary_parallelism_is_refused_inside_a_compiled_region():
    x, w, y = torch.randn(4, 8), torch.randn(20, 8), torch.tensor([1, 2, 3, 4])
    group = "a process group"  # any non-None value: the refusal comes before any collective

    def loss_fn(x, w):
        return linear_cross_entropy(x, w, y, process_group=group, vocab_start=0)

    # Older Dynamo replaces an exception raised in a traced callee by its own "Observed
    # exception" (seen with torch 2.4, 2.5 and 2.6; 2.13 keeps the message): there the
    # refusal itself is what can be checked.
    message = "vocabulary parallelism .* not traced by torch.compile"
    with pytest.raises(Exception, match=message if dynamo_keeps_exception_messages() else "Observed exception"):
        compiled(loss_fn)(x, w)


def dynamo_keeps_exception_messages() -> bool:
    """Whether an exception raised in a function the compiled one calls keeps its message."""
    def refuse(x):
        raise NotImplementedError("a message to keep")

    def calls_refuse(x):
        return refuse(x) + 1

    with pytest.raises(Exception) as caught:
        compiled(calls_refuse)(torch.zeros(1))
    return "a message to keep" in str(caught.value)


def test_dynamic_shapes_and_float_options():
    """`torch.compile(dynamic=True)` passes float options as symbolic values: the options'
    checks must trace them (math.isfinite cannot), for every public op."""
    gen = torch.Generator().manual_seed(67)
    x, w = torch.randn(11, 16, generator=gen), torch.randn(80, 16, generator=gen)
    y = torch.randint(0, 80, (11,), generator=gen)
    ops = {
        "linear_cross_entropy": lambda x, w: linear_cross_entropy(x, w, y, temperature=0.9, label_smoothing=0.1,
                                                                  softcap=6.0, backend="chunked"),
        "linear_topk": lambda x, w: linear_topk(x, w, 4, temperature=0.7, backend="chunked").logprobs,
        "linear_sample": lambda x, w: linear_sample(x, w, temperature=0.8, seed=3, backend="chunked").logprobs,
    }
    for name, op in ops.items():
        torch._dynamo.reset()
        got = torch.compile(op, fullgraph=True, dynamic=True, backend="aot_eager")(x, w)
        torch.testing.assert_close(got, op(x, w), rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")
