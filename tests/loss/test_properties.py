"""Property tests of `linear_cross_entropy`: identities that must hold on every backend.

Shapes, options and targets are drawn by hypothesis; tensor values come from a
generator seeded by a drawn integer, so a failing example replays exactly. Every
property runs in float64 on `torch`, on `chunked` with its default workspace, and on
`chunked` with a 4096-byte workspace whose shapes are drawn so that the vocabulary is
split into several tiles (asserted through `plan_chunks`, so the tiled sweeps are
really what runs).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distil_kernels import SparseTarget, linear_cross_entropy
from distil_kernels.loss.chunked import plan_chunks
from distil_kernels.loss.options import LossOptions

DTYPE = torch.float64
# float64 end to end: the only differences are summation order (online lse, tiles).
TOL = dict(rtol=1e-9, atol=1e-11)

CONFIGS = ("torch", "chunked", "chunked-tiled")
TILED_WORKSPACE = 4096  # the smallest workspace LossOptions accepts: 512 float64 elements
MAX_ROWS = 40
MAX_VOCAB_SPAN = 160

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------------------
# Problems and evaluation
# --------------------------------------------------------------------------------------


def backend_kwargs(config: str) -> dict:
    if config == "chunked-tiled":
        return dict(backend="chunked", workspace_bytes=TILED_WORKSPACE)
    return dict(backend=config)


def min_tiled_vocab(num_rows: int) -> int:
    """Smallest V for which a 4096-byte float64 workspace must tile the vocabulary.

    plan_chunks keeps whole rows while `elements // V >= min(16, N)`; with 512
    elements (fewer with a softcap) any V above 512 // min(16, N) is split.
    """
    return TILED_WORKSPACE // 8 // min(16, max(num_rows, 1)) + 1


@st.composite
def problems(draw, config: str, min_rows: int = 0, min_vocab: int = 2):
    """(num_rows, vocab_size, dim, seed, scale) for `config`."""
    num_rows = draw(st.integers(min_rows, MAX_ROWS))
    low = max(min_vocab, min_tiled_vocab(num_rows)) if config == "chunked-tiled" else min_vocab
    vocab_size = draw(st.integers(low, low + MAX_VOCAB_SPAN))
    dim = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([0.1, 1.0, 3.0]))  # logits of order 0.1 to ~10
    return num_rows, vocab_size, dim, seed, scale


def linear_inputs(seed: int, num_rows: int, vocab_size: int, dim: int, scale: float):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, dim, generator=gen, dtype=DTYPE)
    w = torch.randn(vocab_size, dim, generator=gen, dtype=DTYPE) * (scale / math.sqrt(dim))
    b = torch.randn(vocab_size, generator=gen, dtype=DTYPE) * scale
    return x, w, b, gen


def assert_tiles(config: str, num_rows: int, vocab_size: int, dim: int, **options) -> None:
    """The tiled configuration must really split the vocabulary (or there is nothing to run)."""
    if config != "chunked-tiled" or num_rows == 0:
        return
    plan = plan_chunks(num_rows=num_rows, vocab_size=vocab_size, dtype=DTYPE, device=torch.device("cpu"),
                       options=LossOptions(workspace_bytes=TILED_WORKSPACE, **options))
    assert plan.tile < vocab_size, (plan, num_rows, vocab_size)


def evaluate(fn, x, w, b, upstream_seed: int = 0):
    """(loss, d_input, d_weight, d_bias) of `fn(x, w, b)`.

    A "none" loss is pulled back through fixed random upstream weights, so that each
    row's gradient is checked and not only their sum.
    """
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    b = None if b is None else b.detach().clone().requires_grad_()
    loss = fn(x, w, b)
    if loss.dim() == 0:
        upstream = torch.ones((), dtype=loss.dtype)
    else:
        gen = torch.Generator().manual_seed(upstream_seed)
        upstream = torch.rand(loss.shape, generator=gen, dtype=loss.dtype) + 0.5
    (loss * upstream).sum().backward()
    zeros = lambda t: torch.zeros_like(t) if t is not None else None  # noqa: E731
    d_b = None if b is None else (b.grad if b.grad is not None else zeros(b))
    return (loss.detach(), x.grad if x.grad is not None else zeros(x),
            w.grad if w.grad is not None else zeros(w), d_b)


def assert_same(actual, expected, **tol) -> None:
    tol = tol or TOL
    names = ("loss", "d_input", "d_weight", "d_bias")
    for name, a, e in zip(names, actual, expected):
        if a is None and e is None:
            continue
        torch.testing.assert_close(a, e, **tol, msg=lambda m, name=name: f"{name}: {m}")


def hard_labels(gen, num_rows: int, vocab_size: int, ignore_index: int, ignore_frac: float) -> torch.Tensor:
    y = torch.randint(0, vocab_size, (num_rows,), generator=gen)
    ignored = torch.rand(num_rows, generator=gen) < ignore_frac
    return torch.where(ignored, ignore_index, y)


def sparse_target(gen, num_rows: int, vocab_size: int, k: int, tail: str, ignore_index: int,
                  ignore_frac: float, pad_frac: float) -> SparseTarget:
    """k unique ids per row; probs valid for `tail`; some padding slots (garbage probs)."""
    ids = torch.stack([torch.randperm(vocab_size, generator=gen)[:k] for _ in range(num_rows)]) \
        if num_rows else torch.zeros(0, k, dtype=torch.long)
    raw = torch.rand(num_rows, k, generator=gen, dtype=DTYPE)
    pad = torch.rand(num_rows, k, generator=gen) < pad_frac
    pad |= (torch.rand(num_rows, 1, generator=gen) < ignore_frac)  # whole row ignored
    live = (~pad).to(DTYPE)
    if tail == "bucket":
        mass = torch.rand(num_rows, 1, generator=gen, dtype=DTYPE)  # the expert's top-k mass <= 1
        probs = raw * live / (raw * live).sum(dim=1, keepdim=True).clamp_min(1e-300) * mass
    elif tail == "renormalize":
        probs = raw + 0.05  # positive mass on every live row
    else:
        probs = (raw - 0.3) * 3.0  # signed weights
    garbage = torch.rand(num_rows, k, generator=gen, dtype=DTYPE) * 5.0
    return SparseTarget(torch.where(pad, ignore_index, ids), torch.where(pad, garbage, probs))


tails = st.sampled_from(["bucket", "renormalize", "ignore"])
reductions = st.sampled_from(["mean", "sum", "none"])
smoothings = st.one_of(st.just(0.0), st.floats(0.0, 1.0))
temperatures = st.floats(0.25, 4.0)
softcaps = st.one_of(st.none(), st.floats(0.5, 30.0))
z_losses = st.one_of(st.just(0.0), st.floats(0.0, 0.1))
ignore_fracs = st.sampled_from([0.0, 0.3, 1.0])
ignore_indices = st.sampled_from([-100, -1])

config_param = pytest.mark.parametrize("config", CONFIGS)


# --------------------------------------------------------------------------------------
# Properties
# --------------------------------------------------------------------------------------


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_logit_shift_invariance(config, data):
    """Adding c to every logit (bias + c) changes neither the loss nor any gradient."""
    num_rows, vocab_size, dim, seed, scale = data.draw(problems(config))
    tail = data.draw(tails)
    options = dict(reduction=data.draw(reductions), label_smoothing=data.draw(smoothings),
                   temperature=data.draw(temperatures), tail=tail, ignore_index=data.draw(ignore_indices))
    shift = data.draw(st.floats(-30.0, 30.0))
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    if data.draw(st.booleans(), label="sparse"):
        k = data.draw(st.integers(1, min(vocab_size, 6)))
        target = sparse_target(gen, num_rows, vocab_size, k, tail, options["ignore_index"],
                               data.draw(ignore_fracs), data.draw(st.sampled_from([0.0, 0.4])))
    else:
        target = hard_labels(gen, num_rows, vocab_size, options["ignore_index"], data.draw(ignore_fracs))
    assert_tiles(config, num_rows, vocab_size, dim)
    kw = backend_kwargs(config)

    def loss(shift_by):
        return lambda x, w, b: linear_cross_entropy(x, w, target, bias=b + shift_by, **options, **kw)

    base = evaluate(loss(0.0), x, w, b)
    shifted = evaluate(loss(shift), x, w, b)
    # Shifted logits are rounded at the shift's magnitude: float64 error grows with |c| / T.
    growth = 1.0 + abs(shift) / options["temperature"]
    assert_same(shifted, base, rtol=TOL["rtol"] * growth, atol=TOL["atol"] * growth)


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_hard_labels_match_torch_cross_entropy(config, data):
    """Hard labels are `F.cross_entropy(F.linear(x, w, b) / T, y, ...)`, value and gradients."""
    num_rows, vocab_size, dim, seed, scale = data.draw(problems(config))
    # ignore_index may also be a real class id, as torch allows.
    ignore_index = data.draw(st.one_of(ignore_indices, st.integers(0, vocab_size - 1)))
    reduction = data.draw(reductions)
    smoothing = data.draw(smoothings)
    temperature = data.draw(temperatures)
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    y = hard_labels(gen, num_rows, vocab_size, ignore_index, data.draw(ignore_fracs))
    assert_tiles(config, num_rows, vocab_size, dim)
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                   temperature=temperature)

    ours = evaluate(lambda x, w, b: linear_cross_entropy(x, w, y, bias=b, **options, **backend_kwargs(config)),
                    x, w, b)
    if reduction == "mean" and not bool((y != ignore_index).any()):
        # F.cross_entropy gives NaN here; the contract says 0.0 and no gradient.
        assert ours[0].item() == 0.0
        for grad in ours[1:]:
            assert torch.count_nonzero(grad) == 0
        return
    expected = evaluate(
        lambda x, w, b: F.cross_entropy(F.linear(x, w, b) / temperature, y, ignore_index=ignore_index,
                                        reduction=reduction, label_smoothing=smoothing),
        x, w, b,
    )
    assert_same(ours, expected)


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_one_hot_sparse_target_equals_hard_label(config, data):
    """A sparse row with one slot of prob 1 (other slots padding) is the hard label."""
    num_rows, vocab_size, dim, seed, scale = data.draw(problems(config))
    ignore_index = data.draw(ignore_indices)
    k = data.draw(st.integers(1, 4), label="k")
    softcap = data.draw(softcaps)
    options = dict(ignore_index=ignore_index, reduction=data.draw(reductions), tail=data.draw(tails),
                   label_smoothing=data.draw(smoothings), z_loss=data.draw(z_losses),
                   softcap=softcap, temperature=data.draw(temperatures))
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    y = hard_labels(gen, num_rows, vocab_size, ignore_index, data.draw(ignore_fracs))
    slot = torch.randint(0, k, (num_rows, 1), generator=gen)
    at_slot = torch.arange(k)[None, :] == slot
    ids = torch.where(at_slot, y[:, None], ignore_index)
    # Padding probs are arbitrary: the contract says they are ignored.
    probs = torch.where(at_slot, 1.0, torch.rand(num_rows, k, generator=gen, dtype=DTYPE) * 3.0)
    target = SparseTarget(ids, probs)
    assert_tiles(config, num_rows, vocab_size, dim, softcap=softcap)
    kw = backend_kwargs(config)

    sparse = evaluate(lambda x, w, b: linear_cross_entropy(x, w, target, bias=b, **options, **kw), x, w, b)
    hard = evaluate(lambda x, w, b: linear_cross_entropy(x, w, y, bias=b, **options, **kw), x, w, b)
    assert_same(sparse, hard)


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_reductions_agree(config, data):
    """mean == sum / (non-ignored rows) (0 with none); none.sum() == sum; none is 0 on ignored rows."""
    num_rows, vocab_size, dim, seed, scale = data.draw(problems(config))
    ignore_index = data.draw(ignore_indices)
    tail = data.draw(tails)
    softcap = data.draw(softcaps)
    options = dict(ignore_index=ignore_index, tail=tail, label_smoothing=data.draw(smoothings),
                   z_loss=data.draw(z_losses), softcap=softcap, temperature=data.draw(temperatures))
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    if data.draw(st.booleans(), label="sparse"):
        k = data.draw(st.integers(1, min(vocab_size, 6)))
        target = sparse_target(gen, num_rows, vocab_size, k, tail, ignore_index, data.draw(ignore_fracs),
                               data.draw(st.sampled_from([0.0, 0.4])))
        row_valid = (target.ids != ignore_index).any(dim=1)
    else:
        target = hard_labels(gen, num_rows, vocab_size, ignore_index, data.draw(ignore_fracs))
        row_valid = target != ignore_index
    assert_tiles(config, num_rows, vocab_size, dim, softcap=softcap)
    kw = backend_kwargs(config)

    def run(reduction):
        return lambda x, w, b: linear_cross_entropy(x, w, target, bias=b, reduction=reduction, **options, **kw)

    mean = evaluate(run("mean"), x, w, b)
    total = evaluate(run("sum"), x, w, b)
    count = int(row_valid.sum())
    assert_same(mean, tuple(t / max(count, 1) for t in total))

    per_row = linear_cross_entropy(x, w, target, bias=b, reduction="none", **options, **kw)
    assert per_row.shape == (num_rows,)
    torch.testing.assert_close(per_row.sum(), total[0], **TOL)
    assert torch.count_nonzero(per_row[~row_valid]) == 0
    # With unit upstream weights the "none" gradients are those of "sum".
    none_sum = evaluate(lambda x, w, b: run("none")(x, w, b).sum(), x, w, b)
    assert_same(none_sum, total)


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_normalised_soft_targets_agree_across_tails_and_with_torch(config, data):
    """Probs summing to 1: bucket (no mass left), renormalize and ignore give F.cross_entropy
    with the dense probability target (plus z_loss * lse**2), value and gradients."""
    num_rows, vocab_size, dim, seed, scale = data.draw(problems(config))
    ignore_index = data.draw(ignore_indices)
    k = data.draw(st.integers(1, min(vocab_size, 8)), label="k")
    reduction = data.draw(reductions)
    smoothing = data.draw(smoothings)
    temperature = data.draw(temperatures)
    softcap = data.draw(softcaps)
    z_loss = data.draw(z_losses)
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    ids = torch.stack([torch.randperm(vocab_size, generator=gen)[:k] for _ in range(num_rows)]) \
        if num_rows else torch.zeros(0, k, dtype=torch.long)
    pad = torch.rand(num_rows, k, generator=gen) < data.draw(st.sampled_from([0.0, 0.4]))
    pad[:, 0] = False  # at least one live slot, so that the live probs can sum to 1
    pad |= torch.rand(num_rows, 1, generator=gen) < data.draw(ignore_fracs)  # ignored rows
    raw = torch.rand(num_rows, k, generator=gen, dtype=DTYPE).pow(3) + 1e-3
    raw = torch.where(pad, 0.0, raw)
    probs = raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-300)
    garbage = torch.rand(num_rows, k, generator=gen, dtype=DTYPE)
    target = SparseTarget(torch.where(pad, ignore_index, ids), torch.where(pad, garbage, probs))
    row_valid = ~pad.all(dim=1)
    assert_tiles(config, num_rows, vocab_size, dim, softcap=softcap)
    options = dict(ignore_index=ignore_index, reduction=reduction, label_smoothing=smoothing,
                   temperature=temperature, softcap=softcap, z_loss=z_loss)
    kw = backend_kwargs(config)

    results = {
        tail: evaluate(lambda x, w, b, tail=tail: linear_cross_entropy(x, w, target, bias=b, tail=tail,
                                                                      **options, **kw), x, w, b)
        for tail in ("bucket", "renormalize", "ignore")
    }
    assert_same(results["bucket"], results["renormalize"])
    assert_same(results["ignore"], results["renormalize"])

    dense = torch.zeros(num_rows, vocab_size, dtype=DTYPE)
    dense.scatter_(1, ids, torch.where(pad, 0.0, probs))

    def reference(x, w, b):
        u = F.linear(x, w, b)
        s = u if softcap is None else softcap * torch.tanh(u / softcap)
        z = s / temperature
        rows = F.cross_entropy(z, dense, reduction="none", label_smoothing=smoothing)
        rows = rows + z_loss * torch.logsumexp(z, dim=1).square()
        rows = torch.where(row_valid, rows, 0.0)
        if reduction == "none":
            return rows
        if reduction == "sum":
            return rows.sum()
        return rows.sum() / max(int(row_valid.sum()), 1)

    assert_same(results["renormalize"], evaluate(reference, x, w, b))


@config_param
@PROPERTY_SETTINGS
@given(data=st.data())
def test_leading_dims_equal_flattened_call(config, data):
    """input [B, T, d] with target [B, T] or SparseTarget [B, T, k] is the flattened call;
    "none" has shape [B, T]."""
    batch = data.draw(st.integers(1, 3), label="B")
    steps = data.draw(st.integers(0, 12), label="T")
    num_rows = batch * steps
    _, vocab_size, dim, seed, scale = data.draw(problems(config, min_vocab=2))
    if config == "chunked-tiled":
        vocab_size = max(vocab_size, min_tiled_vocab(num_rows))
    ignore_index = data.draw(ignore_indices)
    tail = data.draw(tails)
    reduction = data.draw(reductions)
    options = dict(ignore_index=ignore_index, tail=tail, reduction=reduction,
                   label_smoothing=data.draw(smoothings), z_loss=data.draw(z_losses),
                   softcap=data.draw(softcaps), temperature=data.draw(temperatures))
    x, w, b, gen = linear_inputs(seed, num_rows, vocab_size, dim, scale)
    if data.draw(st.booleans(), label="sparse"):
        k = data.draw(st.integers(1, min(vocab_size, 5)))
        flat = sparse_target(gen, num_rows, vocab_size, k, tail, ignore_index, data.draw(ignore_fracs), 0.3)
        shaped = SparseTarget(flat.ids.reshape(batch, steps, k), flat.probs.reshape(batch, steps, k))
    else:
        flat = hard_labels(gen, num_rows, vocab_size, ignore_index, data.draw(ignore_fracs))
        shaped = flat.reshape(batch, steps)
    assert_tiles(config, num_rows, vocab_size, dim, softcap=options["softcap"])
    kw = backend_kwargs(config)

    def run_shaped(x, w, b):
        return linear_cross_entropy(x.reshape(batch, steps, dim), w, shaped, bias=b, **options, **kw)

    loss_shaped = run_shaped(x, w, b)
    if reduction == "none":
        assert loss_shaped.shape == (batch, steps)
    else:
        assert loss_shaped.shape == ()
    # Flattening the per-row losses lines them up with the flat call's rows.
    flatten = (lambda t: t.reshape(-1)) if reduction == "none" else (lambda t: t)  # noqa: E731
    shaped_result = evaluate(lambda x, w, b: flatten(run_shaped(x, w, b)), x, w, b)
    flat_result = evaluate(lambda x, w, b: linear_cross_entropy(x, w, flat, bias=b, **options, **kw), x, w, b)
    assert_same(shaped_result, flat_result)

    _, stats = linear_cross_entropy(x.reshape(batch, steps, dim), w, shaped, bias=b, return_stats=True,
                                    **options, **kw)
    _, flat_stats = linear_cross_entropy(x, w, flat, bias=b, return_stats=True, **options, **kw)
    assert stats.lse.shape == (num_rows,)
    torch.testing.assert_close(stats.lse, flat_stats.lse)
    torch.testing.assert_close(stats.token_loss, flat_stats.token_loss)
    torch.testing.assert_close(stats.target_logprobs, flat_stats.target_logprobs)
