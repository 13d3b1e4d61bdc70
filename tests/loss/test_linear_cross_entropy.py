"""linear_cross_entropy against the float64 reference: every option, odd shapes, dtypes.

The reference (`backend="torch"` on float64 inputs) is itself checked against
`F.cross_entropy` in test_properties.py and against a hand-written dense formula here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from distil_kernels import LinearCrossEntropy, SparseTarget, linear_cross_entropy
from distil_kernels.loss.options import LossOptions
from loss_problems import (
    assert_close_all,
    assert_masked_problem_matches,
    assert_within_dtype_error,
    make_problem,
    run,
    same_dtype_pytorch,
)

BACKENDS = ["torch", "chunked"]


OPTION_GRID = [
    dict(tail=tail, label_smoothing=ls, temperature=t, softcap=sc, z_loss=zl, reduction=red)
    for tail, ls, t, sc, zl, red in itertools.product(
        ["bucket", "renormalize", "ignore"], [0.0, 0.1], [1.0, 0.7], [None, 4.0], [0.0, 1e-3], ["mean", "sum", "none"]
    )
]


@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_sparse_options_chunked_matches_reference(options):
    x, w, b, target = make_problem(29, 11, 47, k=5, seed=1, ignore_rows=(3,), pad_slots=((5, 1), (5, 4)))
    want = run(x, w, b, target, "torch", **options)
    got = run(x, w, b, target, "chunked", **options)
    assert_close_all(got, want, rtol=1e-10, atol=1e-12)
    # A workspace of 4096 bytes forces 16-row chunks of 32-column vocabulary tiles.
    tiled = run(x, w, b, target, "chunked", workspace_bytes=4096, **options)
    assert_close_all(tiled, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_odd_shapes_all_options(backend, kind):
    """N=252, V=507, d=123 with everything on at once."""
    k = None if kind == "hard" else 7
    x, w, b, target = make_problem(252, 123, 507, k=k, seed=2, ignore_rows=(0, 100, 251),
                                   pad_slots=() if k is None else ((7, 6), (8, 0)))
    options = dict(label_smoothing=0.05, temperature=0.9, softcap=6.0, z_loss=1e-4, reduction="mean")
    want = _dense_formula(x, w, b, target, **options)
    got = run(x, w, b, target, backend, **options)
    torch.testing.assert_close(got[0], want, rtol=1e-10, atol=1e-12)
    if backend == "chunked":
        assert_close_all(got, run(x, w, b, target, "torch", **options), rtol=1e-10, atol=1e-12)
        tiled = run(x, w, b, target, "chunked", workspace_bytes=64 << 10, **options)
        assert_close_all(tiled, got, rtol=1e-10, atol=1e-12)


def _dense_formula(x, w, b, target, *, label_smoothing, temperature, softcap, z_loss, reduction, tail="bucket"):
    """DESIGN.md's token loss written out over dense float64 probabilities, row by row."""
    u = x.double() @ w.double().T + b.double()
    z = softcap * torch.tanh(u / softcap) / temperature
    log_q = torch.log_softmax(z, dim=1)
    lse = torch.logsumexp(z, dim=1)
    losses, count = [], 0
    for r in range(z.shape[0]):
        if isinstance(target, SparseTarget):
            pairs = [(int(i), float(p)) for i, p in zip(target.ids[r], target.probs[r]) if int(i) != -100]
        else:
            pairs = [] if int(target[r]) == -100 else [(int(target[r]), 1.0)]
        if not pairs:
            losses.append(torch.zeros((), dtype=torch.float64))
            continue
        count += 1
        mass = sum(p for _, p in pairs)
        nll = -sum(p * log_q[r, i] for i, p in pairs)
        q_ids = sum(log_q[r, i].exp() for i, _ in pairs)
        nll = nll - max(1.0 - mass, 0.0) * torch.log(torch.clamp(1.0 - q_ids, min=1e-6))
        loss = (1 - label_smoothing) * nll - label_smoothing * log_q[r].mean() + z_loss * lse[r] ** 2
        losses.append(loss)
    total = torch.stack(losses).sum()
    assert reduction == "mean"
    return total / max(count, 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_low_precision_error_within_dtype(backend, dtype, kind):
    """Error vs float64 at most a small multiple of PyTorch's own same-dtype error.

    PyTorch's same-dtype computation: logits from `F.linear` in `dtype` (rounded to
    `dtype`, as every GEMM in that dtype returns them), then the loss in fp32.
    """
    k = None if kind == "hard" else 8
    x64, w64, b64, target = make_problem(96, 64, 1000, k=k, seed=3, ignore_rows=(5,), scale=3.0)
    options = dict(label_smoothing=0.1, softcap=20.0, z_loss=1e-4)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, backend, workspace_bytes=1 << 16, **options)
    base = same_dtype_pytorch(x, w, b, target, LossOptions(**options))

    assert_within_dtype_error(got, base, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_vocabulary_tiling_low_precision_input_grad(dtype):
    """With vocabulary tiles, d_input sums partial products over tiles in fp32."""
    x, w, b, target = make_problem(40, 32, 300, seed=4, dtype=dtype)
    whole = run(x, w, b, target, "chunked")
    tiled = run(x, w, b, target, "chunked", workspace_bytes=4096)
    ref = run(x.double(), w.double(), b.double(), target, "torch")
    for a, c, r in zip(whole[2], tiled[2], ref[2]):
        tol = 2 * (a.double() - r).abs().max().item() + 1e-7
        assert (c.double() - r).abs().max().item() <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_input(backend, reduction):
    x, w, b, target = make_problem(0, 8, 20)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    for t in leaves[1:]:
        assert t.grad is not None and not t.grad.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["hard", "sparse"])
def test_all_ignored_mean_is_zero_not_nan(backend, kind):
    k = None if kind == "hard" else 3
    x, w, b, target = make_problem(6, 8, 20, k=k, ignore_rows=range(6))
    loss, stats, grads = run(x, w, b, target, backend, label_smoothing=0.1, z_loss=1e-3)
    assert loss.item() == 0.0
    assert not stats.token_loss.any()
    for g in grads:
        assert torch.isfinite(g).all() and not g.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_row_and_leading_dims(backend):
    x, w, b, target = make_problem(1, 5, 9, k=2)
    one = run(x, w, b, target, backend, reduction="none")
    assert one[0].shape == (1,)
    x3 = x.reshape(1, 1, 5)
    target3 = SparseTarget(target.ids.reshape(1, 1, 2), target.probs.reshape(1, 1, 2))
    three = run(x3, w, b, target3, backend, reduction="none")
    assert three[0].shape == (1, 1)
    torch.testing.assert_close(three[0].reshape(1), one[0], rtol=0, atol=0)
    vector = linear_cross_entropy(x[0], w, target.ids[0, 0], bias=b, backend=backend, reduction="none")
    assert vector.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits_stay_finite(backend):
    """Logits of size ~1e4: the online log-sum-exp must not overflow."""
    x, w, b, target = make_problem(16, 8, 64, k=4, scale=5e3, dtype=torch.float32, seed=5)
    loss, stats, grads = run(x, w, b, target, backend)
    want = run(x.double(), w.double(), b.double(), target, "torch")
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    torch.testing.assert_close(stats.lse.double(), want[1].lse.double(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("options", [dict(), dict(softcap=4.0, z_loss=1e-3, temperature=0.7)], ids=["plain", "softcap"])
@pytest.mark.parametrize("kind", ["hard", "sparse"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ids_masked_by_the_bias(dtype, kind, options):
    """The chunked backend in vocabulary tiles of 25-64 columns (a 4 KiB workspace): the
    first tiles of every row are all -inf (a softcap maps -inf to -c)."""
    assert_masked_problem_matches("chunked", kind, dtype, workspace_bytes=4096, **options)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_clamp_when_ids_hold_all_student_mass(backend):
    """When the ids hold all of q's mass, log(1 - sum q) is clamped: finite, zero gradient there."""
    v, d = 10, 4
    w = torch.eye(v, d, dtype=torch.float64) * 60.0
    x = torch.zeros(2, d, dtype=torch.float64)
    x[:, 0] = 1.0
    target = SparseTarget(torch.tensor([[0, 1], [0, 1]]), torch.tensor([[0.5, 0.3], [0.5, 0.3]], dtype=torch.float64))
    loss, stats, grads = run(x, w, None, target, backend)
    assert torch.isfinite(loss)
    log_q = torch.log_softmax(x @ w.T, dim=1)
    expected = -(0.5 * log_q[:, 0] + 0.3 * log_q[:, 1]) - 0.2 * math.log(1e-6)
    # float64 math rounded once to the fp32 stats: within an fp32 ulp (2**-23 relative).
    torch.testing.assert_close(stats.token_loss.double(), expected, rtol=2**-23, atol=0)
    # The bucket term's gradient is zero where the clamp binds: what is left is that of
    # the same weights without a tail.
    untailed = run(x, w, None, target, backend, tail="ignore")
    for g, want in zip(grads, untailed[2]):
        if want is not None:
            torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunked_second_backward_through_retained_graph(reduction):
    """The forward-computed gradients are handed over once; a second backward recomputes."""
    x, w, b, target = make_problem(30, 9, 40, k=3)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    loss = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], backend="chunked",
                                reduction=reduction, label_smoothing=0.1)
    loss.sum().backward(retain_graph=True)
    first = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    (2.0 * loss.sum()).backward()
    for a, c in zip(first, leaves):
        torch.testing.assert_close(c.grad, 2.0 * a, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_requires_grad_and_no_grad(backend):
    x, w, b, target = make_problem(20, 6, 30, k=2)
    xg = x.clone().requires_grad_()
    loss = linear_cross_entropy(xg, w, target, bias=b, backend=backend)
    loss.backward()
    full = run(x, w, b, target, backend, grad_out=torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(xg.grad, full[2][0], rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        value = linear_cross_entropy(x.clone().requires_grad_(), w, target, bias=b, backend=backend)
    assert not value.requires_grad
    torch.testing.assert_close(value, loss.detach(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_no_gradient_flows_to_the_target(backend, tail):
    """DESIGN.md: gradients flow to input, weight and bias, never to target, even when
    the expert's probs come out of a graph that requires them."""
    x, w, b, target = make_problem(9, 5, 14, k=3, seed=6)
    probs = target.probs.clone().requires_grad_()
    xg = x.clone().requires_grad_()
    loss = linear_cross_entropy(xg, w, SparseTarget(target.ids, probs), bias=b, backend=backend, tail=tail,
                                label_smoothing=0.1)
    loss.backward()
    assert xg.grad is not None and probs.grad is None


def test_non_contiguous_input_and_fp32_bias_with_bf16():
    x, w, b, target = make_problem(24, 16, 50, dtype=torch.float32)
    xt = x.T.contiguous().T  # same values, column-major strides
    assert not xt.is_contiguous()
    torch.testing.assert_close(
        linear_cross_entropy(xt, w, target, bias=b), linear_cross_entropy(x, w, target, bias=b), rtol=1e-6, atol=0
    )
    bias = b.clone().requires_grad_()
    loss = linear_cross_entropy(x.bfloat16(), w.bfloat16(), target, bias=bias)
    loss.backward()
    assert loss.dtype == torch.float32 and bias.grad.dtype == torch.float32


def test_stats_are_log_softmax_values():
    x, w, b, target = make_problem(12, 7, 25, k=3, pad_slots=((2, 1),), ignore_rows=(4,))
    _, stats = linear_cross_entropy(x, w, target, bias=b, backend="chunked", return_stats=True, temperature=0.5)
    z = (x @ w.T + b) / 0.5
    # float64 math rounded once to the fp32 stats: within an fp32 ulp (2**-23 relative).
    torch.testing.assert_close(stats.lse.double(), torch.logsumexp(z, 1), rtol=2**-23, atol=0)
    logq = torch.log_softmax(z, 1).gather(1, target.ids.clamp_min(0))
    logq = torch.where(target.ids == -100, 0.0, logq)
    torch.testing.assert_close(stats.target_logprobs.double(), logq, rtol=2**-23, atol=0)
    assert stats.target_logprobs[2, 1] == 0 and stats.token_loss[4] == 0
    assert stats.lse.dtype == stats.token_loss.dtype == stats.target_logprobs.dtype == torch.float32


def test_module_matches_function_and_rejects_unknown_options():
    x, w, b, target = make_problem(10, 4, 15, k=2)
    module = LinearCrossEntropy(reduction="sum", tail="renormalize", backend="chunked")
    torch.testing.assert_close(
        module(x, w, target, b),
        linear_cross_entropy(x, w, target, bias=b, reduction="sum", tail="renormalize"),
        rtol=1e-12, atol=0,
    )
    assert "renormalize" in repr(module)
    with pytest.raises(TypeError, match="unknown options.*reductoin"):
        LinearCrossEntropy(reductoin="sum")
    with pytest.raises(ValueError, match="tail"):
        LinearCrossEntropy(tail="bukket")


def test_duplicate_ids_add_up_with_renormalize_and_ignore():
    x, w, b, _ = make_problem(3, 5, 12)
    dup = SparseTarget(torch.tensor([[1, 1, 4]] * 3), torch.tensor([[0.2, 0.3, 0.5]] * 3, dtype=torch.float64))
    merged = SparseTarget(torch.tensor([[1, 4, -100]] * 3), torch.tensor([[0.5, 0.5, 0.0]] * 3, dtype=torch.float64))
    for tail in ("renormalize", "ignore"):
        for backend in BACKENDS:
            a = run(x, w, b, dup, backend, tail=tail)
            c = run(x, w, b, merged, backend, tail=tail)
            torch.testing.assert_close(a[0], c[0], rtol=1e-12, atol=1e-14)
            for g1, g2 in zip(a[2], c[2]):
                torch.testing.assert_close(g1, g2, rtol=1e-12, atol=1e-14)


def test_signed_weights_with_ignore_tail():
    """tail="ignore" takes weights as given, negative ones included (policy-gradient terms)."""
    x, w, b, _ = make_problem(5, 6, 11)
    ids = torch.tensor([[2, 7]] * 5)
    weights = torch.tensor([[1.5, -0.5]] * 5, dtype=torch.float64)
    for backend in BACKENDS:
        loss, stats, grads = run(x, w, b, SparseTarget(ids, weights), backend, tail="ignore", reduction="sum")
        logq = torch.log_softmax(x @ w.T + b, 1)
        torch.testing.assert_close(loss.sum(), -(1.5 * logq[:, 2] - 0.5 * logq[:, 7]).sum(), rtol=1e-12, atol=0)


def test_filter_eps_is_accepted_and_exact_on_exact_backends():
    x, w, b, target = make_problem(8, 4, 16, k=2, dtype=torch.bfloat16)
    for eps in (None, "auto", 1e-3):
        loss = linear_cross_entropy(x, w, target, bias=b, filter_eps=eps)
        torch.testing.assert_close(loss, linear_cross_entropy(x, w, target, bias=b), rtol=0, atol=0)
