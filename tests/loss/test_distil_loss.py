"""Tests of `distil_loss`: the DistIL gradient is exact, its stats and value are as
DESIGN.md defines them, the backends agree, and bad arguments are named.

Ground truth is float64 and independent of the library: the token loss, the
cost-to-go and the group baseline are written out below from DESIGN.md, and the key
test checks the gradient against the exact gradient of the expected sequence loss,
obtained by enumerating every trajectory of a tiny autoregressive policy.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from distil_kernels import DistilStats, SparseTarget, distil_loss, linear_cross_entropy

BACKENDS = ("torch", "chunked")
F64 = torch.float64
# Padding slot id of an expert row (distil_loss's ignore_index).
PAD = -100
# DESIGN.md: the bucket's clamp on the student's mass outside the expert ids.
BUCKET_CLAMP = 1e-6


# --------------------------------------------------------------------------------------
# Ground truth, written from DESIGN.md
# --------------------------------------------------------------------------------------


def dense_logits(x, weight, bias, temperature=1.0, softcap=None):
    """z = softcap(x W^T + b) / temperature, [..., V].

    The GEMM runs in the inputs' dtype and is rounded once, as eager PyTorch does
    (F.linear); the rest is fp32, or float64 for float64 inputs.
    """
    cdt = F64 if x.dtype == F64 else torch.float32
    u = (x @ weight.T).to(cdt)
    if bias is not None:
        u = u + bias.to(cdt)
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


def dense_token_loss(z, ids, probs, tail):
    """The token loss of DESIGN.md for logits z [..., V] and expert slots [..., k]."""
    log_q = torch.log_softmax(z, dim=-1)
    valid = ids != PAD
    logq_ids = torch.where(valid, log_q.gather(-1, ids.clamp_min(0)), 0.0)
    p = torch.where(valid, probs.to(z.dtype), 0.0)
    mass = p.sum(dim=-1)
    if tail == "renormalize":
        p = p / torch.where(mass > 0, mass, 1.0)[..., None]
    loss = -(p * logq_ids).sum(dim=-1)
    if tail == "bucket":
        q_ids = torch.where(valid, logq_ids.exp(), 0.0).sum(dim=-1)
        loss = loss - (1.0 - mass).clamp_min(0.0) * torch.clamp(1.0 - q_ids, min=BUCKET_CLAMP).log()
    return torch.where(valid.any(dim=-1), loss, 0.0)


def loop_cost_to_go(ce, mask, discount):
    """G[b, t] = sum_{i>t} discount**(i-t-1) * ce[b, i] * mask[b, i], by a double loop."""
    batch, steps = ce.shape
    g = torch.zeros_like(ce)
    for b in range(batch):
        for t in range(steps):
            for i in range(t + 1, steps):
                if mask[b, i]:
                    g[b, t] += discount ** (i - t - 1) * ce[b, i]
    return g


def loop_group_baseline(g, mask, group):
    """Mean of G[., t] over the other rollouts of b's group unmasked at t (0 if none)."""
    batch, steps = g.shape
    base = torch.zeros_like(g)
    if group is None:
        return base
    for b in range(batch):
        for t in range(steps):
            others = [o for o in range(batch) if o != b and group[o] == group[b] and mask[o, t]]
            if others:
                base[b, t] = sum(g[o, t] for o in others) / len(others)
    return base


def dense_distil(x, weight, bias, expert, actions, mask, *, group=None, future_credit=1.0, discount=1.0,
                 baseline="group", temperature=1.0, softcap=None, tail="bucket"):
    """(value, surrogate, ce) of DESIGN.md: the surrogate's gradient is the DistIL gradient."""
    z = dense_logits(x, weight, bias, temperature, softcap)
    ce = dense_token_loss(z, expert.ids, expert.probs, tail)
    log_q = torch.log_softmax(z, dim=-1)
    log_q_action = log_q.gather(-1, torch.where(mask, actions, 0)[..., None])[..., 0]
    g = loop_cost_to_go(ce.detach(), mask, discount)
    base = loop_group_baseline(g, mask, group) if baseline == "group" else torch.zeros_like(g)
    live = mask.to(ce.dtype)
    count = live.sum().clamp_min(1.0)
    value = (ce * live).sum() / count
    surrogate = value + (live * future_credit * (g - base) * log_q_action).sum() / count
    return value, surrogate, ce


def random_expert(gen, shape, vocab_size, k, *, mass=(0.5, 0.9), num_pad=0):
    """Unique ids per row, probs summing to a mass in `mass`; the last `num_pad` slots padding."""
    rows = math.prod(shape)
    ids = torch.stack([torch.randperm(vocab_size, generator=gen)[:k] for _ in range(rows)])
    probs = torch.rand(rows, k, generator=gen, dtype=F64) + 0.1
    if num_pad:
        ids[:, k - num_pad:] = PAD
        probs[:, k - num_pad:] = 0.7  # ignored: a padding slot's prob carries no mass
    live = ids != PAD
    lo, hi = mass
    total = lo + (hi - lo) * torch.rand(rows, 1, generator=gen, dtype=F64)
    probs = torch.where(live, probs / torch.where(live, probs, 0.0).sum(1, keepdim=True) * total, probs)
    return SparseTarget(ids.reshape(*shape, k), probs.reshape(*shape, k))


def leaf(t, dtype=F64):
    return t.detach().to(dtype).requires_grad_()


GRADS = ("d_input", "d_weight", "d_bias")


def assert_all_close(names, got, want, **tolerances):
    for name, a, b in zip(names, got, want, strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerances)


# --------------------------------------------------------------------------------------
# 1, 2. The gradient is exact: every trajectory of a tiny autoregressive policy
# --------------------------------------------------------------------------------------

VOCAB, HORIZON, HIDDEN, SLOTS = 3, 3, 5, 2
# One student hidden state per distinct prefix of a rollout, the empty one included.
PREFIXES = [p for t in range(HORIZON) for p in itertools.product(range(VOCAB), repeat=t)]
PREFIX_INDEX = {p: i for i, p in enumerate(PREFIXES)}
TRAJECTORIES = torch.tensor(list(itertools.product(range(VOCAB), repeat=HORIZON)))  # [V^T, T]
TRAJECTORY_STATES = torch.tensor(
    [[PREFIX_INDEX[tuple(a[:t].tolist())] for t in range(HORIZON)] for a in TRAJECTORIES]
)  # [V^T, T] prefix index of the state at each step


@pytest.fixture
def one_thread():
    """The enumeration tests make thousands of calls on [2, 3, 5] tensors, where waking a
    second OpenMP thread costs more than the work (16 ms per log_softmax on a busy
    2-core host): run them on one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TOY_OPTIONS = [
    pytest.param(dict(tail="bucket"), id="bucket"),
    pytest.param(dict(tail="renormalize"), id="renormalize"),
    pytest.param(dict(tail="bucket", temperature=0.7, softcap=2.0), id="bucket-temperature-softcap"),
]


def toy_policy(seed):
    """Student (prefix states H, head W, bias b) and a fixed sparse expert per prefix."""
    gen = torch.Generator().manual_seed(seed)
    states = leaf(torch.randn(len(PREFIXES), HIDDEN, generator=gen, dtype=F64))
    weight = leaf(torch.randn(VOCAB, HIDDEN, generator=gen, dtype=F64))
    bias = leaf(0.5 * torch.randn(VOCAB, generator=gen, dtype=F64))
    # k=2 of 3 ids carrying 0.5-0.9 of the mass: the bucket (the third id) always matters.
    expert = random_expert(gen, (len(PREFIXES),), VOCAB, SLOTS)
    return states, weight, bias, expert


def exact_objective(states, weight, bias, expert, *, tail, temperature=1.0, softcap=None):
    """J = E_{a ~ q}[sum_t CE(p_t, q_t)] summed over all V^T trajectories; and P(a) (detached)."""
    z = dense_logits(states, weight, bias, temperature, softcap)  # [prefixes, V]
    log_q = torch.log_softmax(z, dim=-1)
    ce = dense_token_loss(z, expert.ids, expert.probs, tail)  # [prefixes]
    log_prob = log_q[TRAJECTORY_STATES, TRAJECTORIES].sum(dim=1)
    cost = ce[TRAJECTORY_STATES].sum(dim=1)
    prob = log_prob.exp()
    return (prob * cost).sum(), prob.detach()


def rollout_batch(states, expert, trajectory_indices):
    """distil_loss inputs for the rollouts with these trajectory indices: [B, T, ...]."""
    idx = torch.as_tensor(trajectory_indices)
    prefix = TRAJECTORY_STATES[idx]
    return (
        states[prefix],
        SparseTarget(expert.ids[prefix], expert.probs[prefix]),
        TRAJECTORIES[idx],
        torch.ones(prefix.shape, dtype=torch.bool),
    )


def expected_distil_grad(states, weight, bias, expert, prob, *, group_size, backend, **kwargs):
    """E[grad distil_loss] over all tuples of `group_size` independent rollouts, times B*T.

    The loss is a mean over the B*T response tokens, so B*T times its expected gradient
    is the expected gradient of the summed sequence losses: group_size * grad J.
    """
    params = (states, weight, bias)
    total = [torch.zeros_like(p) for p in params]
    group = torch.zeros(group_size, dtype=torch.long) if group_size > 1 else None
    for rollouts in itertools.product(range(len(TRAJECTORIES)), repeat=group_size):
        x, exp, actions, mask = rollout_batch(states, expert, rollouts)
        loss = distil_loss(x, weight, exp, actions, mask, bias=bias, group=group, backend=backend, **kwargs)
        grads = torch.autograd.grad(loss, params)
        p = math.prod(prob[r] for r in rollouts)
        for acc, g in zip(total, grads, strict=True):
            acc += p * g
    scale = group_size * HORIZON
    return [scale * g for g in total]


@pytest.mark.parametrize("options", TOY_OPTIONS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_exact_by_enumerating_trajectories(backend, options, one_thread):
    states, weight, bias, expert = toy_policy(seed=1)
    objective, prob = exact_objective(states, weight, bias, expert, **options)
    assert float(prob.sum()) == pytest.approx(1.0, abs=1e-14)
    exact = torch.autograd.grad(objective, (states, weight, bias))

    estimate = expected_distil_grad(states, weight, bias, expert, prob, group_size=1, backend=backend,
                                    baseline="none", future_credit=1.0, discount=1.0, **options)
    assert_all_close(GRADS, estimate, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_local_term_alone_is_not_the_exact_gradient(backend, one_thread):
    """The enumeration test can fail: without the credit term the gradient is biased."""
    states, weight, bias, expert = toy_policy(seed=1)
    objective, prob = exact_objective(states, weight, bias, expert, tail="bucket")
    exact = torch.autograd.grad(objective, (states, weight, bias))
    local = expected_distil_grad(states, weight, bias, expert, prob, group_size=1, backend=backend,
                                 baseline="none", future_credit=0.0, tail="bucket")
    for got, want in zip(local, exact, strict=True):
        assert (got - want).abs().max() > 1e-2 * want.abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_baseline_keeps_the_gradient_exact(backend, one_thread):
    """Two independent rollouts of one prompt, every (V^T)^2 pair: the leave-one-out
    baseline changes each sample's gradient but not its expectation."""
    states, weight, bias, expert = toy_policy(seed=2)
    objective, prob = exact_objective(states, weight, bias, expert, tail="bucket")
    exact = torch.autograd.grad(objective, (states, weight, bias))

    estimate = expected_distil_grad(states, weight, bias, expert, prob, group_size=2, backend=backend,
                                    baseline="group", tail="bucket")
    assert_all_close(GRADS, estimate, [2.0 * g for g in exact], rtol=1e-9, atol=1e-12)

    # The baseline is really applied: one pair's gradient differs from baseline="none".
    x, exp, actions, mask = rollout_batch(states, expert, [0, len(TRAJECTORIES) - 1])
    per_baseline = [
        torch.autograd.grad(
            distil_loss(x, weight, exp, actions, mask, group=torch.tensor([0, 0]), bias=bias,
                        baseline=baseline, backend=backend),
            weight,
        )[0]
        for baseline in ("group", "none")
    ]
    assert (per_baseline[0] - per_baseline[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------
# 3. Cost-to-go and group baseline in the stats
# --------------------------------------------------------------------------------------


def stats_problem(seed=3):
    """B=5 rollouts in groups {0, 2, 4}, {1}, {3}; masked positions, and a step where
    only one rollout of the big group is unmasked."""
    gen = torch.Generator().manual_seed(seed)
    batch, steps, dim, vocab, k = 5, 6, 7, 11, 3
    x = torch.randn(batch, steps, dim, generator=gen, dtype=F64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=F64)
    expert = random_expert(gen, (batch, steps), vocab, k)
    actions = torch.randint(0, vocab, (batch, steps), generator=gen)
    mask = torch.tensor([
        [0, 1, 1, 1, 1, 1],
        [0, 0, 1, 1, 1, 0],
        [0, 1, 1, 0, 1, 1],
        [1, 1, 1, 1, 1, 1],
        [1, 0, 1, 1, 0, 1],
    ], dtype=torch.bool)
    group = torch.tensor([0, 1, 0, 2, 0])
    return x, weight, expert, actions, mask, group


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_cost_to_go_and_group_baseline(backend):
    x, weight, expert, actions, mask, group = stats_problem()
    discount = 0.5
    _, stats = distil_loss(x, weight, expert, actions, mask, group=group, discount=discount, backend=backend,
                           return_stats=True)
    assert isinstance(stats, DistilStats)

    z = dense_logits(x, weight, None)
    ce = dense_token_loss(z, expert.ids, expert.probs, "bucket")
    g = loop_cost_to_go(ce, mask, discount)
    base = loop_group_baseline(g, mask, group)
    # Rollouts 1 and 3 are alone in their groups; at t=0 only rollout 4 of group 0 is unmasked.
    assert (base[[1, 3]] == 0).all() and base[4, 0] == 0 and base[0, 0] != 0
    log_q = torch.log_softmax(z, dim=-1)

    # DistilStats are fp32: compared to the float64 truth at fp32 rounding.
    close = dict(rtol=2**-23, atol=1e-12)
    torch.testing.assert_close(stats.ce, ce.float(), **close)
    torch.testing.assert_close(stats.cost_to_go, g.float(), **close)
    torch.testing.assert_close(stats.baseline, base.float(), **close)
    torch.testing.assert_close(stats.lse, torch.logsumexp(z, dim=-1).float(), **close)
    action_logprobs = log_q.gather(-1, actions[..., None])[..., 0]
    torch.testing.assert_close(stats.action_logprobs[mask], action_logprobs[mask].float(), **close)
    for field in (stats.ce, stats.cost_to_go, stats.baseline, stats.action_logprobs, stats.lse):
        assert field.dtype == torch.float32 and field.shape == mask.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_baseline_is_zero_without_groups_or_with_baseline_none(backend):
    x, weight, expert, actions, mask, group = stats_problem()
    for kwargs in (dict(group=None, baseline="group"), dict(group=group, baseline="none")):
        _, stats = distil_loss(x, weight, expert, actions, mask, backend=backend, return_stats=True, **kwargs)
        assert (stats.baseline == 0).all()
        assert (stats.cost_to_go != 0).any()


# --------------------------------------------------------------------------------------
# 4. The value is the masked mean of linear_cross_entropy; the gradient is DESIGN's
# --------------------------------------------------------------------------------------

TAIL_PROBLEMS = [
    pytest.param("bucket", (0.5, 0.9), id="bucket"),
    pytest.param("renormalize", (0.5, 0.9), id="renormalize"),
    # tail="ignore" takes signed weights (policy-gradient terms).
    pytest.param("ignore", (-0.5, 0.9), id="ignore-signed"),
]


def value_problem(seed, tail_mass):
    gen = torch.Generator().manual_seed(seed)
    batch, steps, dim, vocab, k = 3, 5, 6, 19, 3
    x = leaf(torch.randn(batch, steps, dim, generator=gen, dtype=F64))
    weight = leaf(torch.randn(vocab, dim, generator=gen, dtype=F64))
    bias = leaf(0.3 * torch.randn(vocab, generator=gen, dtype=F64))
    expert = random_expert(gen, (batch, steps), vocab, k, mass=tail_mass)
    actions = torch.randint(0, vocab, (batch, steps), generator=gen)
    mask = torch.rand(batch, steps, generator=gen) < 0.7
    group = torch.tensor([0, 0, 1])
    return x, weight, bias, expert, actions, mask, group


@pytest.mark.parametrize("tail, tail_mass", TAIL_PROBLEMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_is_masked_mean_of_linear_cross_entropy(backend, tail, tail_mass):
    x, weight, bias, expert, actions, mask, group = value_problem(4, tail_mass)
    options = dict(bias=bias, temperature=0.8, softcap=4.0, tail=tail, backend=backend)
    value = distil_loss(x, weight, expert, actions, mask, group=group, discount=0.9, future_credit=0.5, **options)
    ce = linear_cross_entropy(x, weight, expert, reduction="none", **options)
    assert ce.shape == mask.shape
    want = (ce * mask).sum() / mask.sum()
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("tail, tail_mass", TAIL_PROBLEMS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_is_that_of_the_design_surrogate(backend, tail, tail_mass):
    """grad of sum(mask * (ce + future_credit * sg(G - baseline) * log q[a])) / mask.sum()."""
    x, weight, bias, expert, actions, mask, group = value_problem(5, tail_mass)
    options = dict(group=group, future_credit=0.5, discount=0.9, temperature=0.8, softcap=4.0, tail=tail)
    value = distil_loss(x, weight, expert, actions, mask, bias=bias, backend=backend, **options)
    grads = torch.autograd.grad(value, (x, weight, bias))
    want_value, surrogate, _ = dense_distil(x, weight, bias, expert, actions, mask, **options)
    want_grads = torch.autograd.grad(surrogate, (x, weight, bias))
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-14)
    assert_all_close(GRADS, grads, want_grads, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_flows_to_the_expert(backend):
    """DESIGN.md: gradients never flow to a target; the expert's probs may come out of a graph."""
    x, weight, bias, expert, actions, mask, group = value_problem(8, (0.5, 0.9))
    probs = expert.probs.detach().clone().requires_grad_()
    loss = distil_loss(x, weight, SparseTarget(expert.ids, probs), actions, mask, bias=bias, group=group,
                       backend=backend)
    loss.backward()
    assert x.grad is not None and probs.grad is None


@pytest.mark.parametrize("batch, steps", [(3, 5), (0, 5), (3, 0)], ids=["masked", "no-rollouts", "no-steps"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_no_response_tokens_gives_zero_loss_and_zero_gradients(backend, batch, steps):
    x, weight, bias, expert, actions, _, group = value_problem(6, (0.5, 0.9))
    expert = SparseTarget(expert.ids[:batch, :steps], expert.probs[:batch, :steps])
    mask = torch.zeros(batch, steps, dtype=torch.bool)
    value, stats = distil_loss(x[:batch, :steps], weight, expert, actions[:batch, :steps], mask, bias=bias,
                               group=group[:batch], backend=backend, return_stats=True)
    assert value.item() == 0.0
    for name, g in zip(GRADS, torch.autograd.grad(value, (x, weight, bias)), strict=True):
        assert torch.equal(g, torch.zeros_like(g)), name
    assert stats.cost_to_go.shape == (batch, steps)
    assert (stats.cost_to_go == 0).all() and (stats.baseline == 0).all()


# --------------------------------------------------------------------------------------
# 5. The backends agree
# --------------------------------------------------------------------------------------

AGREE_OPTIONS = dict(discount=0.9, future_credit=0.5, softcap=5.0, temperature=0.8)
SMALL_WORKSPACE = 4096


def agree_problem(seed=7):
    """B=3, T=7, d=13, V=37, k=4: padding slots, an all-padding expert row on a response
    token, a random mask with junk actions on prompt positions, two groups."""
    gen = torch.Generator().manual_seed(seed)
    batch, steps, dim, vocab, k = 3, 7, 13, 37, 4
    x = torch.randn(batch, steps, dim, generator=gen, dtype=F64)
    weight = 0.5 * torch.randn(vocab, dim, generator=gen, dtype=F64)
    bias = 0.2 * torch.randn(vocab, generator=gen, dtype=F64)
    expert = random_expert(gen, (batch, steps), vocab, k, num_pad=1, mass=(0.3, 0.95))
    expert.ids[1, :, 2] = PAD  # rollout 1 has two padding slots per row
    expert.ids[2, 3] = PAD  # an expert row that is all padding
    actions = torch.randint(0, vocab, (batch, steps), generator=gen)
    mask = torch.rand(batch, steps, generator=gen) < 0.75
    mask[2, 3] = True
    mask[0, 0] = mask[1, 0] = False
    # Prompt positions may hold anything: padding ids, ids past the vocabulary.
    actions[0, 0], actions[1, 0] = PAD, vocab + 3
    group = torch.tensor([5, 2, 5])
    return x, weight, bias, expert, actions, mask, group


def run(x, weight, bias, expert, actions, mask, group, dtype, backend, **kwargs):
    """(value, (d_input, d_weight, d_bias), stats) of distil_loss on inputs cast to `dtype`."""
    params = [leaf(t, dtype) for t in (x, weight, bias)]
    workspace = SMALL_WORKSPACE if backend == "chunked" else None
    value, stats = distil_loss(params[0], params[1], expert, actions, mask, bias=params[2], group=group,
                               backend=backend, workspace_bytes=workspace, return_stats=True,
                               **AGREE_OPTIONS, **kwargs)
    return value, torch.autograd.grad(value, params), stats


class WeightGemmExtents(TorchFunctionMode):
    """Records how many vocabulary rows of `weight` each matrix product reads."""

    GEMMS = {torch.mm, torch.matmul, torch.addmm, torch.nn.functional.linear, Tensor.mm, Tensor.matmul,
             Tensor.addmm, Tensor.addmm_, Tensor.__matmul__, Tensor.__rmatmul__}

    def __init__(self, weight):
        super().__init__()
        self.storage = weight.untyped_storage().data_ptr()
        self.dim = weight.shape[1]
        self.extents = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.GEMMS:
            for a in args:
                if isinstance(a, Tensor) and a.untyped_storage().data_ptr() == self.storage:
                    self.extents.append(a.numel() // self.dim)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_small_workspace_tiles_the_vocabulary(dtype):
    """The agreement tests run the chunked backend on several vocabulary tiles: no
    product, forward or backward, reads the whole head (the torch backend does)."""
    x, weight, bias, expert, actions, mask, group = agree_problem()
    vocab = weight.shape[0]
    for backend in BACKENDS:
        params = [leaf(t, dtype) for t in (x, weight, bias)]
        with WeightGemmExtents(params[1]) as seen:
            workspace = SMALL_WORKSPACE if backend == "chunked" else None
            value = distil_loss(params[0], params[1], expert, actions, mask, bias=params[2], group=group,
                                backend=backend, workspace_bytes=workspace, **AGREE_OPTIONS)
            torch.autograd.grad(value, params)
        assert seen.extents, f"{backend}: no product read the weight"
        if backend == "chunked":
            assert max(seen.extents) < vocab, seen.extents
        else:
            assert max(seen.extents) == vocab


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_backends_agree_float64(tail):
    problem = agree_problem()
    ref_value, ref_grads, ref_stats = run(*problem, F64, "torch", tail=tail)
    value, grads, stats = run(*problem, F64, "chunked", tail=tail)
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    assert_all_close(GRADS, grads, ref_grads, rtol=1e-12, atol=1e-12)
    # The stats are fp32: float64 values 1e-12 apart may round one fp32 ulp apart.
    fields = list(DistilStats.__dataclass_fields__)
    assert_all_close(fields, [getattr(stats, f) for f in fields], [getattr(ref_stats, f) for f in fields],
                     rtol=2**-23, atol=1e-12)


def test_float64_reference_keeps_future_credit_in_float64():
    """future_credit = 0.3 is no fp32 number (AGREE_OPTIONS' 0.5 is): the dense reference's
    credit term once took it through a bool mask times a Python float, which promotes to
    fp32, and its float64 gradient was off by ~1e-8 relative. Both backends in float64 agree
    to float64 rounding."""
    x, weight, bias, expert, actions, mask, group = agree_problem()
    options = dict(AGREE_OPTIONS, future_credit=0.3)
    grads = {}
    for backend in ("torch", "chunked"):
        params = [leaf(t) for t in (x, weight, bias)]
        value = distil_loss(params[0], params[1], expert, actions, mask, bias=params[2], group=group,
                            backend=backend, **options)
        grads[backend] = torch.autograd.grad(value, params)
    assert_all_close(GRADS, grads["torch"], grads["chunked"], rtol=1e-12, atol=1e-12)


# A low-precision result's error against float64 truth on the same (rounded) inputs is
# at most this multiple of eager PyTorch's error in the same dtype, plus an atol of a
# few fp32 ulps of an O(1) quantity (the loss math is fp32 in both).
ERROR_MULTIPLE = 4.0
FP32_ATOL = 2**-20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_low_precision_against_float64(dtype):
    x, weight, bias, expert, actions, mask, group = agree_problem()
    # Truth: float64 on the inputs rounded to `dtype`, so only the arithmetic differs.
    x, weight, bias = (t.to(dtype).to(F64) for t in (x, weight, bias))
    problem = (x, weight, bias, expert, actions, mask, group)
    true_params = [leaf(t) for t in (x, weight, bias)]
    true_value, true_surrogate, _ = dense_distil(*true_params, expert, actions, mask, group=group, **AGREE_OPTIONS)
    true_grads = torch.autograd.grad(true_surrogate, true_params)

    # Same-dtype PyTorch: eager ops in `dtype` (the GEMM rounds its output to `dtype`,
    # as F.linear does), the loss math in fp32, autograd for the gradients.
    eager_params = [leaf(t, dtype) for t in (x, weight, bias)]
    eager_value, eager_surrogate, _ = dense_distil(*eager_params, expert, actions, mask, group=group, **AGREE_OPTIONS)
    eager_grads = torch.autograd.grad(eager_surrogate, eager_params)

    value, grads, _ = run(*problem, dtype, "chunked")
    assert value.dtype == torch.float32
    for name, got, eager, true in zip(("value", *GRADS), (value, *grads), (eager_value, *eager_grads),
                                      (true_value, *true_grads), strict=True):
        assert got.dtype == (torch.float32 if name == "value" else dtype), name
        err = (got.double() - true).abs().max().item()
        eager_err = (eager.double() - true).abs().max().item()
        assert err <= ERROR_MULTIPLE * eager_err + FP32_ATOL, f"{name}: error {err:.3g}, eager {dtype} {eager_err:.3g}"


# --------------------------------------------------------------------------------------
# 6. Validation names the bad argument
# --------------------------------------------------------------------------------------


def valid_arguments():
    x, weight, bias, expert, actions, mask, group = agree_problem()
    return dict(input=x, weight=weight, expert=expert, actions=actions, mask=mask, group=group, bias=bias)


def call(args):
    return distil_loss(args.pop("input"), args.pop("weight"), args.pop("expert"), args.pop("actions"),
                       args.pop("mask"), **args)


def out_of_range_action(args):
    actions = args["actions"].clone()
    actions[2, 3] = args["weight"].shape[0]  # a response token
    return dict(actions=actions)


BAD_ARGUMENTS = [
    pytest.param(lambda a: dict(input=a["input"][0]), ValueError, "^input must", id="input-2d"),
    pytest.param(lambda a: dict(expert=a["expert"].ids), TypeError, "^expert must", id="expert-not-sparse"),
    pytest.param(lambda a: dict(expert=SparseTarget(a["expert"].ids[:, 1:], a["expert"].probs[:, 1:])),
                 ValueError, "^expert must", id="expert-shape"),
    pytest.param(lambda a: dict(actions=a["actions"][:, 1:]), ValueError, "^actions must", id="actions-shape"),
    pytest.param(lambda a: dict(mask=a["mask"].long()), TypeError, "^mask must", id="mask-not-bool"),
    pytest.param(lambda a: dict(group=a["group"][:2]), ValueError, "^group must", id="group-shape"),
    pytest.param(lambda a: dict(group=a["group"].float()), TypeError, "^group must be an integer tensor",
                 id="group-float"),
    pytest.param(out_of_range_action, IndexError, "^actions", id="action-out-of-range"),
    pytest.param(lambda a: dict(actions=a["actions"] > 3), TypeError, "^actions must have an integer dtype",
                 id="actions-bool"),
    pytest.param(lambda a: dict(actions=a["actions"].float()), TypeError, "^actions must have an integer dtype",
                 id="actions-float"),
    pytest.param(lambda a: dict(baseline="foo"), ValueError, "^baseline must", id="baseline"),
    pytest.param(lambda a: dict(expert=SparseTarget(a["expert"].ids, a["expert"].probs * float("nan"))), ValueError,
                 "^expert.probs must be finite", id="expert-probs-nan"),
    pytest.param(lambda a: dict(expert=SparseTarget(a["expert"].ids, a["expert"].probs * 3)), ValueError,
                 "^expert.probs must sum to at most 1", id="expert-mass"),
    pytest.param(lambda a: dict(expert=SparseTarget(a["expert"].ids[..., :1].expand_as(a["expert"].ids),
                                                    a["expert"].probs / 4)), ValueError,
                 "^expert.ids must be unique", id="expert-duplicate-ids"),
    pytest.param(lambda a: dict(discount=-0.1), ValueError, "^discount must", id="discount-negative"),
    pytest.param(lambda a: dict(backend="cudnn"), ValueError, "^backend must", id="backend"),
    pytest.param(lambda a: dict(validate="no"), TypeError, "^validate must be True or False", id="validate-str"),
]


@pytest.mark.parametrize("change, error, match", BAD_ARGUMENTS)
def test_validation_names_the_argument(change, error, match):
    args = valid_arguments()
    args.update(change(args))
    with pytest.raises(error, match=match):
        call(args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unvalidated_out_of_range_actions_are_padding(backend):
    """validate=False: an action outside [0, V) on a response token gets no credit and
    log q = 0 in the stats, on every backend alike (its own loss term still counts)."""
    x, weight, bias, expert, actions, mask, group = agree_problem()
    vocab = weight.shape[0]
    bad = actions.clone()
    bad[0, 2], bad[2, 5] = vocab + 7, -3
    mask = mask.clone()
    mask[0, 2] = mask[2, 5] = True
    leaves = [leaf(t) for t in (x, weight, bias)]
    value, stats = distil_loss(leaves[0], leaves[1], expert, bad, mask, bias=leaves[2], group=group,
                               backend=backend, validate=False, return_stats=True, **AGREE_OPTIONS)
    grads = torch.autograd.grad(value, leaves)
    assert stats.action_logprobs[0, 2] == 0 and stats.action_logprobs[2, 5] == 0

    # DESIGN's surrogate, the credit term left out where the action is out of range.
    params = [leaf(t) for t in (x, weight, bias)]
    z = dense_logits(*params, AGREE_OPTIONS["temperature"], AGREE_OPTIONS["softcap"])
    ce = dense_token_loss(z, expert.ids, expert.probs, "bucket")
    g = loop_cost_to_go(ce.detach(), mask, AGREE_OPTIONS["discount"])
    advantage = g - loop_group_baseline(g, mask, group)
    log_q_action = torch.log_softmax(z, dim=-1).gather(-1, bad.clamp(0, vocab - 1)[..., None])[..., 0]
    credited = mask & (bad >= 0) & (bad < vocab)
    count = mask.sum()
    want_value = (ce * mask).sum() / count
    surrogate = want_value + (credited * AGREE_OPTIONS["future_credit"] * advantage * log_q_action).sum() / count
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=1e-14)
    assert_all_close(GRADS, grads, torch.autograd.grad(surrogate, params), rtol=1e-10, atol=1e-13)


def test_valid_arguments_pass_validation():
    """The baseline of the validation cases, junk prompt-position actions included."""
    args = valid_arguments()
    assert (args["actions"][~args["mask"]] >= args["weight"].shape[0]).any()
    assert torch.isfinite(call(args))
