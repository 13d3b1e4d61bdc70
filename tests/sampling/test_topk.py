"""linear_topk: chunked against the torch reference, exact tie-breaking, log-probs, validation.

Ground truth is a dense float64 log-softmax written here from the formula. Ties use
integer-valued inputs, whose logits are exact in every backend and tiling, so equal
logits are bitwise equal and the lower id must win everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distil_kernels.sampling import TopK, linear_topk
from sampling_checks import dense_log_softmax, fp32_tolerance, mask_ids

BACKENDS = ["torch", "chunked"]
# 4096 bytes: 16-row chunks of 32 (fp32: 64) vocabulary columns, so V=507 spans many tiles.
WORKSPACES = [None, 4096]


def make_problem(n, v, d, dtype, seed, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype) if bias else None
    return x, w, b


def assert_topk_close(got, log_q, lse, k, tol):
    """Log-probs and lse within `tol` of float64; ids exact wherever no near-tie makes them ambiguous."""
    want_values, want_ids = torch.sort(log_q, dim=1, descending=True, stable=True)
    assert got.ids.shape == (log_q.shape[0], k) and got.ids.dtype == torch.int64
    assert got.logprobs.dtype == torch.float32 and got.lse.dtype == torch.float32
    torch.testing.assert_close(got.lse.double(), lse, rtol=0, atol=tol)
    torch.testing.assert_close(got.logprobs.double(), want_values[:, :k], rtol=0, atol=tol)
    # Each returned id really has the log-prob reported for it.
    torch.testing.assert_close(got.logprobs.double(), log_q.gather(1, got.ids), rtol=0, atol=tol)
    # Positions whose value is separated from both neighbours (and the (k+1)-th) by > 2 tol.
    padded = torch.cat([want_values, torch.full_like(want_values[:, :1], -torch.inf)], dim=1)
    gap_next = padded[:, :k] - padded[:, 1 : k + 1]
    gap_prev = torch.cat([torch.full_like(gap_next[:, :1], torch.inf), gap_next[:, :-1]], dim=1)
    clear = (gap_next > 2 * tol) & (gap_prev > 2 * tol)
    assert torch.equal(got.ids[clear], want_ids[:, :k][clear])


# --------------------------------------------------------------------------------------
# Against float64 and across backends
# --------------------------------------------------------------------------------------

SHAPES = [(37, 507, 23), (16, 64, 8), (1, 5, 3)]
OPTIONS = [{}, {"softcap": 3.0}, {"temperature": 0.7}, {"softcap": 2.5, "temperature": 1.3}]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("bias", [False, True])
def test_float64_chunked_equals_torch(shape, options, bias):
    n, v, d = shape
    x, w, b = make_problem(n, v, d, torch.float64, seed=n + v, bias=bias)
    log_q, lse = dense_log_softmax(x, w, b, **options)
    for k in sorted({1, 5, 64, v} & set(range(1, v + 1))):
        want = linear_topk(x, w, k, bias=b, backend="torch", **options)
        assert_topk_close(want, log_q, lse, k, tol=1e-6)
        assert torch.equal(want.ids, torch.sort(log_q, dim=1, descending=True, stable=True).indices[:, :k])
        for ws in WORKSPACES:
            got = linear_topk(x, w, k, bias=b, backend="chunked", workspace_bytes=ws, **options)
            assert torch.equal(got.ids, want.ids), (k, ws)
            torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
            torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend, workspace_bytes, gemm_columns",
                         [("torch", None, None), ("chunked", None, None), ("chunked", 4096, None),
                          ("chunked", None, 100), ("chunked", 4096, 7)])
@pytest.mark.parametrize("options", OPTIONS[::3], ids=["plain", "softcap-temperature"])
def test_float32_against_float64(backend, workspace_bytes, gemm_columns, options, monkeypatch):
    """`gemm_columns`: the CPU fp32 tile GEMM in pieces of that many columns (507 = 5 x 100 + 7)."""
    if gemm_columns is not None:
        monkeypatch.setattr("distil_kernels.loss.chunked.CPU_FP32_GEMM_COLUMNS", gemm_columns)
    x, w, b = make_problem(37, 507, 23, torch.float32, seed=3)
    log_q, lse = dense_log_softmax(x, w, b, **options)
    tol = fp32_tolerance(x, w, b, log_q, lse, **options)
    for k in (1, 5, 64, 507):
        got = linear_topk(x, w, k, bias=b, backend=backend, workspace_bytes=workspace_bytes, **options)
        assert_topk_close(got, log_q, lse, k, tol=tol)


def test_auto_is_chunked_on_cpu():
    x, w, b = make_problem(20, 300, 16, torch.float32, seed=4)
    auto = linear_topk(x, w, 10, bias=b)
    chunked = linear_topk(x, w, 10, bias=b, backend="chunked")
    assert isinstance(auto, TopK)
    for a, c in zip(auto, chunked):
        assert torch.equal(a, c)


def test_leading_dims_are_flattened():
    x, w, b = make_problem(2 * 7, 101, 12, torch.float64, seed=5)
    for backend in BACKENDS:
        flat = linear_topk(x, w, 9, bias=b, backend=backend)
        batched = linear_topk(x.view(2, 7, 12), w, 9, bias=b, backend=backend)
        assert batched.ids.shape == (14, 9) and batched.lse.shape == (14,)
        for a, c in zip(batched, flat):
            assert torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_and_no_grad(backend):
    x, w, b = make_problem(0, 50, 8, torch.float32, seed=6)
    out = linear_topk(x, w, 4, bias=b, backend=backend)
    assert out.ids.shape == (0, 4) and out.logprobs.shape == (0, 4) and out.lse.shape == (0,)
    x, w, b = make_problem(5, 50, 8, torch.float32, seed=6)
    out = linear_topk(x.requires_grad_(), w.requires_grad_(), 4, bias=b.requires_grad_(), backend=backend)
    assert not out.logprobs.requires_grad and not out.lse.requires_grad


# --------------------------------------------------------------------------------------
# Ties: lower ids win, at the k-th boundary and across tiles
# --------------------------------------------------------------------------------------


def tie_problem(dtype):
    """Integer data: row 400 is every token's top logit, rows 5, 40, 77, 300 tie for second
    (tiles 0, 1, 2 and 9 at 32 columns per tile), rows 10, 11, 12 tie for third (one tile)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randint(1, 4, (37, 16), generator=g).to(dtype)
    w = torch.randint(-1, 2, (507, 16), generator=g).to(dtype)
    u = torch.full((16,), 4.0, dtype=dtype)
    w[400] = 2 * u
    w[[5, 40, 77, 300]] = u
    w[[10, 11, 12]] = u - 1
    return x, w


TIE_CASES = [
    (1, [400]),
    (2, [400, 5]),
    (3, [400, 5, 40]),
    (4, [400, 5, 40, 77]),
    (5, [400, 5, 40, 77, 300]),
    (6, [400, 5, 40, 77, 300, 10]),
    (7, [400, 5, 40, 77, 300, 10, 11]),
    (8, [400, 5, 40, 77, 300, 10, 11, 12]),
]


# Softcaps wide enough not to saturate: the logits reach 256.
TIE_OPTIONS = [{}, {"softcap": 1000.0}, {"temperature": 0.5}, {"softcap": 1000.0, "temperature": 0.7}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", TIE_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_ties_go_to_the_lower_id(dtype, options):
    x, w = tie_problem(dtype)
    for k, want in TIE_CASES:
        runs = [{"backend": "torch"}] + [{"backend": "chunked", "workspace_bytes": ws} for ws in WORKSPACES]
        for run in runs:
            out = linear_topk(x, w, k, **options, **run)
            assert out.ids.tolist() == [want] * 37, (k, run)
            # Tied ids carry equal log-probs.
            if k >= 5:
                assert torch.equal(out.logprobs[:, 1:5], out.logprobs[:, 1:2].expand(-1, 4))


def test_saturated_softcap_ties_go_to_the_lower_id():
    """softcap=3 rounds tanh to exactly 1 for the eight largest logits (float64): all tie."""
    x, w = tie_problem(torch.float64)
    want = [5, 10, 11, 12, 40, 77, 300, 400]
    for run in [{"backend": "torch"}] + [{"backend": "chunked", "workspace_bytes": ws} for ws in WORKSPACES]:
        for k in (1, 3, 8):
            assert linear_topk(x, w, k, softcap=3.0, **run).ids.tolist() == [want[:k]] * 37, (k, run)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    v=st.integers(1, 150),
    d=st.integers(1, 6),
    k_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    softcap=st.sampled_from([None, 2.0]),
    temperature=st.sampled_from([1.0, 0.5]),
    small_workspace=st.booleans(),
)
def test_many_ties_chunked_equals_torch(n, v, d, k_frac, seed, softcap, temperature, small_workspace):
    """Logits from {-1, 0, 1}-valued weights tie everywhere; every tiling must break ties alike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-2, 3, (n, d), generator=g).double()
    w = torch.randint(-1, 2, (v, d), generator=g).double()
    b = torch.randint(-1, 2, (v,), generator=g).double()
    k = max(1, round(k_frac * v))
    opts = {"bias": b, "softcap": softcap, "temperature": temperature}
    want = linear_topk(x, w, k, backend="torch", **opts)
    got = linear_topk(x, w, k, backend="chunked", workspace_bytes=4096 if small_workspace else None, **opts)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_rows", [1, 64, 1024, 1 << 16])
def test_sweep_plan_tiles_the_vocabulary_before_shrinking_the_chunk(num_rows, dtype):
    """The sampling sweeps' CPU plan for a 152k vocabulary: few reads of W, within 64 MiB."""
    from distil_kernels.loss.chunked import plan_chunks
    from distil_kernels.loss.options import LossOptions
    from distil_kernels.sampling.topk import SWEEP_CPU_MIN_TILE, SWEEP_CPU_ROWS

    vocab_size = 151936
    plan = plan_chunks(num_rows, vocab_size, dtype, torch.device("cpu"), LossOptions(), SWEEP_CPU_ROWS,
                       SWEEP_CPU_MIN_TILE)
    whole_rows = plan_chunks(num_rows, vocab_size, dtype, torch.device("cpu"), LossOptions(), SWEEP_CPU_ROWS)
    per_element = 4 + (dtype.itemsize if dtype != torch.float32 else 0)
    assert plan.rows * plan.tile * per_element <= 64 << 20
    assert whole_rows.tile == vocab_size
    if num_rows <= whole_rows.rows:
        assert plan == whole_rows  # one chunk either way: whole rows
    else:
        assert plan.tile >= SWEEP_CPU_MIN_TILE and plan.rows >= 3 * whole_rows.rows


@pytest.mark.parametrize("cols", [4096, 4096 + 13])
@pytest.mark.parametrize("wide", [1, 17, 64])
@pytest.mark.parametrize("levels", [None, 3])
def test_prefiltered_topk_keeps_the_top_values(cols, wide, levels):
    """The CPU group prefilter returns torch.topk's values and ids that really hold them.

    `levels` rounds the tile to a few values, so runs of ties cross the group boundaries.
    """
    from distil_kernels.sampling.topk import PREFILTER_GROUP, _prefiltered_topk

    assert cols // PREFILTER_GROUP >= 4 * wide  # the prefilter path, not the plain topk
    g = torch.Generator().manual_seed(cols + wide)
    z = torch.randn(33, cols, generator=g)
    if levels is not None:
        z = (z * levels).round()
    z[3, cols - 1] = 50.0  # the row's maximum in the columns past the last whole group
    z[4, :] = -torch.inf
    z[5, 100:] = -torch.inf
    values, ids = _prefiltered_topk(z, wide)
    want = torch.topk(z, wide, dim=1).values
    assert torch.equal(values.sort(dim=1, descending=True).values, want)
    assert torch.equal(z.gather(1, ids), values)
    assert all(len(set(row)) == wide for row in ids.tolist())


@pytest.mark.parametrize("k", [1, 5, 40])
@pytest.mark.parametrize("nan", [False, True])
def test_wide_tiles_with_ties_chunked_equals_torch(k, nan):
    """A tile of 3605 columns takes the CPU prefilter; ties from integer weights, NaN and inf."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-2, 3, (9, 4), generator=g).double()
    w = torch.randint(-1, 2, (3605, 4), generator=g).double()
    b = torch.randint(-1, 2, (3605,), generator=g).double()
    b[[7, 3600]] = torch.inf
    if nan:
        x[2, 1] = torch.nan
    want = linear_topk(x, w, k, bias=b, backend="torch")
    got = linear_topk(x, w, k, bias=b, backend="chunked")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("workspace_bytes", WORKSPACES)
@pytest.mark.parametrize("options", [{}, {"softcap": 3.0, "temperature": 0.7}], ids=["plain", "softcap"])
def test_ids_masked_by_the_bias(workspace_bytes, options):
    x, w, b = make_problem(37, 507, 23, torch.float32, seed=9)
    b = mask_ids(b)
    log_q, lse = dense_log_softmax(x, w, b, **options)
    got = linear_topk(x, w, 8, bias=b, backend="chunked", workspace_bytes=workspace_bytes, **options)
    assert_topk_close(got, log_q, lse, 8, tol=fp32_tolerance(x, w, b, log_q, lse, **options))


@pytest.mark.parametrize("workspace_bytes", WORKSPACES)
def test_non_finite_logits_propagate_like_torch(workspace_bytes):
    x, w, b = make_problem(6, 200, 8, torch.float64, seed=8)
    x[1, 0] = float("nan")
    b[[3, 150]] = float("inf")
    want = linear_topk(x, w, 5, bias=b, backend="torch")
    got = linear_topk(x, w, 5, bias=b, backend="chunked", workspace_bytes=workspace_bytes)
    assert torch.equal(got.ids, want.ids)
    assert got.ids[1].tolist() == [0, 1, 2, 3, 4]  # NaN ranks first, lower ids first
    assert got.lse[1].isnan() and got.lse[0] == torch.inf


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"k": 0}, ValueError, r"k must be in \[1, V\] = \[1, 50\], got 0"),
        ({"k": 51}, ValueError, r"k must be in \[1, V\]"),
        ({"k": 2.0}, TypeError, "k must be an int"),
        ({"k": True}, TypeError, "k must be an int"),
        ({"temperature": 0.0}, ValueError, "temperature must be > 0.*linear_sample"),
        ({"temperature": -1.0}, ValueError, "temperature must be > 0"),
        ({"temperature": float("nan")}, ValueError, "temperature must be finite"),
        ({"softcap": 0.0}, ValueError, "softcap must be None or > 0"),
        ({"workspace_bytes": 100}, ValueError, "workspace_bytes must be at least 4096"),
        ({"backend": "triton"}, ValueError, "runs on cuda tensors|needs (the triton package|triton >= 3.2)"),
        ({"backend": "numpy"}, ValueError, "backend must be one of"),
        ({"weight": torch.zeros(50, 7)}, ValueError, "weight must have shape"),
        ({"weight": torch.zeros(50, 8, dtype=torch.float64)}, TypeError, "weight must have input's dtype"),
        ({"bias": torch.zeros(49)}, ValueError, "bias must have shape"),
        ({"input": torch.zeros(3, 8, dtype=torch.int64)}, TypeError, "input must be float16"),
    ],
)
def test_validation(kwargs, error, match):
    args = {"input": torch.zeros(3, 8), "weight": torch.zeros(50, 8), "k": 5}
    args.update(kwargs)
    with pytest.raises(error, match=match):
        linear_topk(args.pop("input"), args.pop("weight"), args.pop("k"), **args)


# --------------------------------------------------------------------------------------
# The triton backend's threshold pass: how many candidates its lists must hold
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 8, 17, 64, 100, 256])
@pytest.mark.parametrize("step", [1, 2, 5, 16])
def test_subset_rank_is_the_least_with_short_counts_this_rare(k, step):
    """The odds that a row's count at or above the subset's j-th largest is short of k are
    those of j or more of its k - 1 largest in the 1-in-`step` subset: a binomial tail,
    here in exact rationals. `subset_rank` is the least j whose tail is within the budget."""
    pytest.importorskip("triton", minversion="3.2")
    from fractions import Fraction

    from distil_kernels.sampling.triton.topk import SHORT_COUNT_PROBABILITY, subset_rank

    def tail(j):
        p = Fraction(1, step)
        return sum(math.comb(k - 1, i) * p**i * (1 - p) ** (k - 1 - i) for i in range(j, k))

    rank = subset_rank(k, step)
    assert 1 <= rank <= k
    assert tail(rank) <= SHORT_COUNT_PROBABILITY
    assert rank == 1 or tail(rank - 1) > SHORT_COUNT_PROBABILITY
    if step == 1:  # the subset is the vocabulary
        assert rank == k


@pytest.mark.parametrize("k, splits", [(1, 8), (64, 8), (64, 528), (256, 8), (256, 264)])
@pytest.mark.parametrize("logits", ["gaussian", "peaked"])
def test_threshold_lists_hold_what_the_subset_bound_lets_through(k, splits, logits):
    """Qwen2.5-7B's vocabulary (152064), 128-wide tiles cut into `splits` splits as the
    kernel's launcher does: every (row, split) count of logits at or above the subset's
    `subset_rank`-th largest fits `split_capacity`, and every row's total reaches k, so
    the merge kernel is the rare exception."""
    pytest.importorskip("triton", minversion="3.2")
    import triton

    from distil_kernels.sampling.triton.splits import SplitPlan
    from distil_kernels.sampling.triton.topk import split_capacity, subset_rank, subset_step

    vocab, block_n, rows = 152064, 128, 64
    gen = torch.Generator().manual_seed(k * 1000 + splits)
    z = torch.randn(rows, vocab, generator=gen)
    if logits == "peaked":  # a few hundred ids far above the rest, as in a confident LM
        z[:, torch.randperm(vocab, generator=gen)[:300]] += 8.0
    step = subset_step(vocab, k)
    rank = subset_rank(k, step)
    bound = torch.topk(z[:, ::step], rank, dim=1).values[:, -1:]
    num_tiles = triton.cdiv(vocab, block_n)
    plan = SplitPlan(1, num_tiles, splits, *divmod(num_tiles, splits))
    # `split_range`'s tiles: the first `longer_splits` take one more.
    firsts = [s * plan.tiles_per_split + min(s, plan.longer_splits) for s in range(splits + 1)]
    counts = torch.stack([(z[:, firsts[s] * block_n : firsts[s + 1] * block_n] >= bound).sum(dim=1)
                          for s in range(splits)], dim=1)
    capacity = split_capacity(rank, step, plan.most_tiles * block_n, vocab)
    assert (counts.sum(dim=1) >= k).all()
    assert int(counts.max()) <= capacity, f"{int(counts.max())} > {capacity}"
    # Not wastefully large either: the mean count is within 4x of the list.
    assert capacity <= 4 * max(float(counts.float().mean()), 8.0) + 64


@pytest.mark.parametrize("rows, vocab, block_n, target", [(64, 152064, 128, 264), (8192, 152064, 256, 528),
                                                          (2048, 152064, 128, 528), (5, 601, 64, 6), (1, 7, 64, 6)])
def test_split_plan_deals_the_tiles_out_evenly(monkeypatch, rows, vocab, block_n, target):
    """Splits differ by at most one tile, the longer ones first, and cover every tile once:
    the sampler at B=64 on Qwen2.5-7B's head (1188 passes of 128 ids) gets 132 splits of 5
    passes then 132 of 4, one of each an SM of an H100, where ceil-sized splits made 238
    programs, 106 of them a second wave."""
    pytest.importorskip("triton", minversion="3.2")
    from distil_kernels.sampling.triton import splits as splits_module

    monkeypatch.setattr(splits_module, "target_programs", lambda kind: target)
    plan = splits_module.plan_splits(rows, vocab, 64, block_n)
    assert plan.num_m_blocks * plan.num_splits <= max(target, plan.num_m_blocks)
    assert 0 <= plan.longer_splits < plan.num_splits and plan.tiles_per_split >= 1
    sizes = [plan.tiles_per_split + (s < plan.longer_splits) for s in range(plan.num_splits)]
    assert sum(sizes) == plan.num_tiles == -(-vocab // block_n) and max(sizes) == plan.most_tiles
    if (rows, vocab, block_n) == (64, 152064, 128):
        assert sizes == [5] * 132 + [4] * 132


def test_every_backend_gives_candidates_with_the_raw_lse():
    """Truncated sampling asks the top-k pass for the log-sum-exp at temperature 1 too; the
    torch and chunked passes give the same candidates' logits and both lse."""
    from distil_kernels.loss.options import LossOptions
    from distil_kernels.sampling.topk import topk_candidates

    gen = torch.Generator().manual_seed(4)
    x, w, b = (torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(70, 16, generator=gen,
               dtype=torch.float64), torch.randn(70, generator=gen, dtype=torch.float64))
    options = LossOptions(softcap=3.0, temperature=0.7)
    want = topk_candidates(x, w, b, 6, options, "torch", raw_lse=True)
    got = topk_candidates(x, w, b, 6, options, "chunked", raw_lse=True)
    assert torch.equal(got.ids, want.ids)
    for name in ("values", "lse", "lse_raw"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-12, atol=1e-12)
    raw = torch.logsumexp(3.0 * torch.tanh((x @ w.T + b) / 3.0), dim=1)
    torch.testing.assert_close(want.lse_raw, raw, rtol=1e-12, atol=1e-12)


def test_scaled_lse_fold_in_row_blocks_equals_one_fold(monkeypatch):
    """The raw log-sum-exp of truncated sampling, folded a block of rows at a time over
    the products it overwrites, equals the fold of the whole tile's products; a fold that
    does not consume its values leaves them as they were."""
    from distil_kernels.sampling import topk

    gen = torch.Generator().manual_seed(5)
    tiles = [torch.randn(7, 40, generator=gen) * 4 for _ in range(3)]
    tiles[1][2] = -math.inf  # a row that sees only -inf in one tile
    state = [(torch.full((7,), -math.inf), torch.zeros(7)) for _ in range(2)]
    monkeypatch.setattr(topk, "LSE_BLOCK_BYTES", 3 * 40 * 4)  # blocks of 3 rows: 3 + 3 + 1
    for z in tiles:
        before = z.clone()
        topk.fold_scaled_lse_(*state[0], z, 0.7)
        topk.fold_lse_(*state[1], z * 0.7)
        assert torch.equal(z, before)
    want = torch.logsumexp(torch.cat(tiles, dim=1) * 0.7, dim=1)
    for run_max, run_sum in state:
        torch.testing.assert_close(run_max + run_sum.log(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(state[0][0], state[1][0]) and torch.equal(state[0][1], state[1][1])
