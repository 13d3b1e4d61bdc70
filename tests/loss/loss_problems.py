"""Problems, runners and tolerance rules shared by the loss tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from distil_kernels import SparseTarget, linear_cross_entropy
from distil_kernels.loss.options import LossOptions
from distil_kernels.loss.reference import reduce_loss, reference_token_loss
from distil_kernels.loss.targets import make_slots


def make_problem(n, d, v, *, k=None, dtype=torch.float64, seed=0, scale=1.0, bias=True, ignore_rows=(),
                 pad_slots=(), mass=0.9):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=gen, dtype=torch.float64) * scale / math.sqrt(d)).to(dtype)
    w = (torch.randn(v, d, generator=gen, dtype=torch.float64) * 2.0).to(dtype)
    b = (torch.randn(v, generator=gen, dtype=torch.float64) * 0.5).to(dtype) if bias else None
    if k is None:
        target = torch.randint(0, v, (n,), generator=gen)
        for r in ignore_rows:
            target[r] = -100
    else:
        ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(n)]) if n else torch.zeros(0, k).long()
        probs = torch.rand(n, k, generator=gen, dtype=torch.float64)
        probs = probs / probs.sum(dim=1, keepdim=True) * mass
        for r, j in pad_slots:
            ids[r, j] = -100
        for r in ignore_rows:
            ids[r] = -100
        target = SparseTarget(ids, probs)
    return x, w, b, target


def masked_problem(n, d, v, *, k=None, seed=0):
    """`make_problem`'s float64 problem with a bias of -inf on the first 3/5 of the
    vocabulary and on every 7th id: targets only on the ids left.

    A bias masking ids (a padded vocabulary, banned tokens) makes whole tiles, splits or
    chunks of a row -inf; they must add nothing to its log-sum-exp, not turn it NaN.
    """
    x, w, b, _ = make_problem(n, d, v, seed=seed)
    masked = torch.zeros(v, dtype=torch.bool)
    masked[: 3 * v // 5] = True
    masked[::7] = True
    b = b.masked_fill(masked, -math.inf)
    allowed = (~masked).nonzero()[:, 0]
    gen = torch.Generator().manual_seed(seed + 1)
    if k is None:
        return x, w, b, allowed[torch.randint(0, len(allowed), (n,), generator=gen)]
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=gen)[:k]] for _ in range(n)])
    probs = torch.rand(n, k, generator=gen, dtype=torch.float64)
    return x, w, b, SparseTarget(ids, probs / probs.sum(dim=1, keepdim=True) * 0.9)


def assert_masked_problem_matches(backend, kind, dtype, **options):
    """`backend` on `masked_problem` in `dtype`: finite everywhere, within dtype error of float64."""
    k = None if kind == "hard" else 5
    x64, w64, b64, target = masked_problem(45, 24, 301, k=k, seed=51)
    want = run(x64, w64, b64, target, "torch", **options)
    x, w, b = x64.to(dtype), w64.to(dtype), b64.to(dtype)
    got = run(x, w, b, target, backend, **options)
    assert torch.isfinite(got[1].lse).all() and all(torch.isfinite(g).all() for g in got[2])
    assert_within_dtype_error(got, same_dtype_pytorch(x, w, b, target, LossOptions(**options)), want)


def make_distil_problem(batch, steps, d, v, k, *, seed, pad_slots=()):
    """float64 (x [B, T, d], w [V, d], b [V]), an expert SparseTarget [B, T, k] holding 0.8 of
    the mass, actions [B, T] and a response mask [B, T], for distil_loss tests."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, steps, d, generator=gen, dtype=torch.float64)
    w = torch.randn(v, d, generator=gen, dtype=torch.float64)
    b = torch.randn(v, generator=gen, dtype=torch.float64)
    ids = torch.stack([torch.randperm(v, generator=gen)[:k] for _ in range(batch * steps)]).reshape(batch, steps, k)
    for slot in pad_slots:
        ids[slot] = -100
    probs = torch.rand(batch, steps, k, generator=gen, dtype=torch.float64)
    expert = SparseTarget(ids, probs / probs.sum(-1, keepdim=True) * 0.8)
    actions = torch.randint(0, v, (batch, steps), generator=gen)
    mask = torch.rand(batch, steps, generator=gen) > 0.2
    return x, w, b, expert, actions, mask


def run_distil(problem, backend, dtype, **kwargs):
    """[loss, d_input, d_weight, d_bias] of distil_loss on `make_distil_problem`'s problem in `dtype`."""
    from distil_kernels import distil_loss

    x, w, b, expert, actions, mask = problem
    leaves = [t.to(dtype).clone().requires_grad_() for t in (x, w, b)]
    loss = distil_loss(leaves[0], leaves[1], expert, actions, mask, bias=leaves[2], backend=backend, **kwargs)
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves]


def run(x, w, b, target, backend, grad_out=None, **options):
    """Loss, stats and the gradients of (loss * grad_out).sum() w.r.t. x, w, b."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    loss, stats = linear_cross_entropy(leaves[0], leaves[1], target, bias=leaves[2], backend=backend,
                                       return_stats=True, **options)
    if grad_out is None:
        grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * grad_out).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return loss.detach(), stats, grads


def assert_close_all(got, want, rtol, atol):
    loss_g, stats_g, grads_g = got
    loss_w, stats_w, grads_w = want
    torch.testing.assert_close(loss_g.double(), loss_w.double(), rtol=rtol, atol=atol)
    for name in ("lse", "token_loss", "target_logprobs"):
        torch.testing.assert_close(getattr(stats_g, name).double(), getattr(stats_w, name).double(),
                                   rtol=rtol, atol=atol, msg=lambda m, name=name: f"stats.{name}: {m}")
    for name, g, w in zip(("input", "weight", "bias"), grads_g, grads_w):
        if w is None:
            assert g is None
            continue
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"d_{name}: {m}")


def same_dtype_pytorch(x, w, b, target, options):
    """PyTorch in x's dtype: logits from F.linear (rounded to that dtype), the loss in fp32.

    Returns (loss, [d_input, d_weight, d_bias]) of the same objective as `run`.
    """
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    u = F.linear(leaves[0], leaves[1]).float()
    if leaves[2] is not None:
        u = u + leaves[2].float()
    if options.softcap is not None:
        u = options.softcap * torch.tanh(u / options.softcap)
    z = u / options.temperature
    slots = make_slots(target, w.shape[0], options.ignore_index, torch.float32)
    token_loss, _, _ = reference_token_loss(z, slots, options)
    loss = reduce_loss(token_loss, slots.row_valid, options.reduction)
    grad_out = torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype, device=loss.device).reshape(loss.shape)
    (loss * grad_out).sum().backward()
    return loss.detach(), [t.grad if t is not None else None for t in leaves]


def max_error(a, ref):
    return (a.double() - ref.double()).abs().max().item()


def assert_within_dtype_error(got, same_dtype, want, factor=4.0, rounded_inputs=None):
    """`got` (a `run` result) is within `factor` x PyTorch's same-dtype error of the float64 `want`.

    `rounded_inputs`, a float64 `run` on the inputs rounded to the dtype, adds the error
    of that rounding alone to what the dtype explains: PyTorch's same-dtype error holds it
    too, but may cancel it by chance (its logits' own rounding pulls the other way), which
    would leave a baseline far below what the inputs' dtype allows.
    """
    def baseline(same, rounded, exact):
        error = max_error(same, exact)
        return error if rounded is None else max(error, max_error(rounded, exact))

    rounded_loss, rounded_grads = (None, [None] * 3) if rounded_inputs is None else (rounded_inputs[0],
                                                                                      rounded_inputs[2])
    # The loss is an fp32 value (a sum over rows with reduction="sum"): besides `factor` x
    # PyTorch's error, allow two fp32 ulps of it for the rounding of a sum in another order.
    loss_tol = factor * baseline(same_dtype[0], rounded_loss, want[0]) + 2 * torch.finfo(torch.float32).eps * \
        want[0].abs().max().item() + 1e-6
    assert max_error(got[0], want[0]) <= loss_tol, f"loss: error {max_error(got[0], want[0]):.3e} > {loss_tol:.3e}"
    for name, g, g_base, g_rounded, g_want in zip(("input", "weight", "bias"), got[2], same_dtype[1], rounded_grads,
                                                  want[2]):
        if g_want is None:
            continue
        tol = factor * baseline(g_base, g_rounded, g_want) + 1e-6 * g_want.abs().max().item()
        assert max_error(g, g_want) <= tol, f"d_{name}: error {max_error(g, g_want):.3e} > {tol:.3e}"


def fp16_small_gradient_problem(rows=512, dim=16, vocab=4096, seed=33):
    """fp16 (x, w, b, y) whose mean loss has a mostly subnormal logits gradient in fp16:
    dL/du ~ 1/V/N = 5e-7 for 512 rows of a 4096-id softmax (smallest normal 6.1e-5)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen).half()
    w = (torch.randn(vocab, dim, generator=gen) / 4).half()
    b = torch.randn(vocab, generator=gen).half()
    y = torch.randint(0, vocab, (rows,), generator=gen)
    return x, w, b, y


def assert_fp16_gradient_keeps_its_small_values(grads, x, w, b, y, upstream):
    """Gradients (d_input, d_weight, d_bias) of `upstream` times the mean cross-entropy of
    `fp16_small_gradient_problem`: where the fp16 logits gradient keeps its 11 bits (written
    times a power of two and scaled back in the GEMMs), each stays within 2**-11 of the
    sums of |terms| it adds, plus its own final rounding into fp16."""
    x64, w64, b64 = (t.double().requires_grad_() for t in (x, w, b))
    u64 = (x64 @ w64.T + b64).detach().requires_grad_()
    (g64,) = torch.autograd.grad(F.cross_entropy(u64, y), u64)
    assert g64.abs().median() < 6.1e-5  # most of the gradient is subnormal in fp16
    unit = 2.0**-11 * 1.05  # fp16's relative rounding, and the fp32 sums' slack
    w64, x64 = w64.detach(), x64.detach()
    want_x, want_w, want_b = (upstream * t for t in (g64 @ w64, g64.T @ x64, g64.sum(dim=0)))
    # Each gradient's own rounding into fp16 at the end: relative, or half the spacing of
    # fp16's subnormals (2**-25) for a value below its normal range.
    out_x, out_w, out_b = (torch.clamp_min(unit * t.abs(), 2.0**-25) for t in (want_x, want_w, want_b))
    bound_x = upstream * unit * (g64.abs() @ w64.abs()) + out_x
    bound_w = upstream * unit * (g64.abs().T @ x64.abs()) + out_w
    bound_b = upstream * unit * g64.abs().sum(dim=0) + out_b
    for name, g, want, bound in (("input", grads[0], want_x, bound_x), ("weight", grads[1], want_w, bound_w),
                                 ("bias", grads[2], want_b, bound_b)):
        excess = ((g.double() - want).abs() - bound).max().item()
        assert excess <= 0, f"d_{name}: exceeds its bound by {excess:.3e}"
