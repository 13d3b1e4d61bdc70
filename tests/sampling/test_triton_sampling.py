"""The triton backend of linear_topk and linear_sample under Triton's CPU interpreter.

Triton decides at import whether kernels are interpreted, so these tests run in their
own pytest process with TRITON_INTERPRET=1 (`make test` does both runs). The
interpreter's bf16 `tl.dot` is unreliable, so inputs are fp32 and fp16. The kernels use
16-row tiles of 64 vocabulary columns here (256 for k > 64) and split the vocabulary
for 6 programs, so the small odd shapes below cover masked edges, several splits and
several tiles per split.

Top-k is checked against the float64 formula; exact ties use integer-valued inputs,
whose logits are exact in every backend. Sampling must draw the torch backend's ids for
the same seed: both use the same Philox stream and fp32 transform.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (make test runs it)", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from distil_kernels import linear_sample, linear_topk  # noqa: E402
from distil_kernels.loss.options import LossOptions  # noqa: E402
from distil_kernels.sampling.triton import topk as topk_module  # noqa: E402
from distil_kernels.sampling.triton.configs import TileConfig  # noqa: E402
from distil_kernels.sampling.triton.topk import triton_topk  # noqa: E402
from distil_kernels.sampling.sample import (  # noqa: E402
    SamplingOptions, _gumbel_from_words, at_temperature, gumbel_noise_range, row_keys, sorted_kept_mask)
from distil_kernels.sampling.triton.sample import gumbel_from_words, tile_noise  # noqa: E402
from kernel_launches import record_merged_rows  # noqa: E402
from sampling_checks import dense_log_softmax, fp32_tolerance, mask_ids  # noqa: E402

pytestmark = pytest.mark.interpreter


def make_problem(n, v, d, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, d, generator=g, dtype=torch.float64) * scale).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) / d**0.5).to(dtype)
    b = torch.randn(v, generator=g, dtype=torch.float64).to(dtype)
    return x, w, b



def assert_topk_close(got, log_q, lse, k, tol):
    """Log-probs and lse within `tol` of float64; ids exact wherever no near-tie makes them ambiguous."""
    want_values, want_ids = torch.sort(log_q, dim=1, descending=True, stable=True)
    assert got.ids.shape == (log_q.shape[0], k) and got.ids.dtype == torch.int64
    torch.testing.assert_close(got.lse.double(), lse, rtol=0, atol=tol)
    torch.testing.assert_close(got.logprobs.double(), want_values[:, :k], rtol=0, atol=tol)
    torch.testing.assert_close(got.logprobs.double(), log_q.gather(1, got.ids), rtol=0, atol=tol)
    padded = torch.cat([want_values, torch.full_like(want_values[:, :1], -torch.inf)], dim=1)
    gap_next = padded[:, :k] - padded[:, 1 : k + 1]
    gap_prev = torch.cat([torch.full_like(gap_next[:, :1], torch.inf), gap_next[:, :-1]], dim=1)
    clear = (gap_next > 2 * tol) & (gap_prev > 2 * tol)
    assert torch.equal(got.ids[clear], want_ids[:, :k][clear])
    assert len(set(got.ids[0].tolist())) == k


# --------------------------------------------------------------------------------------
# Top-k
# --------------------------------------------------------------------------------------

TOPK_OPTIONS = [{}, {"softcap": 3.0, "temperature": 0.7}]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("options", TOPK_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("k", [1, 5, 64])
def test_topk_odd_shapes(dtype, options, k):
    """N=37, V=507, d=23: 3 row blocks x 2 splits of 4 tiles, the last tile 59 columns wide."""
    x, w, b = make_problem(37, 507, 23, dtype, seed=k, scale=2.0)
    got = linear_topk(x, w, k, bias=b, backend="triton", **options)
    log_q, lse = dense_log_softmax(x, w, b, **options)
    tol = fp32_tolerance(x, w, b, log_q, lse, **options)
    assert_topk_close(got, log_q, lse, k, tol=tol)
    want = linear_topk(x, w, k, bias=b, backend="torch", **options)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=tol)


@pytest.mark.parametrize("options", TOPK_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("k", [5, 100])
def test_topk_ids_masked_by_the_bias(options, k):
    """The first 4 of 8 tiles (a whole split) of every row are -inf: they add nothing."""
    x, w, b = make_problem(37, 507, 23, torch.float32, seed=k, scale=2.0)
    b = mask_ids(b)
    got = linear_topk(x, w, k, bias=b, backend="triton", **options)
    log_q, lse = dense_log_softmax(x, w, b, **options)
    assert_topk_close(got, log_q, lse, k, tol=fp32_tolerance(x, w, b, log_q, lse, **options))


@pytest.mark.parametrize("k", [100, 256])
def test_topk_large_k(k):
    """K = 128 and 256 keep 256-wide tiles: V=700 spans 3 of them, over 2 splits."""
    x, w, b = make_problem(21, 700, 16, torch.float32, seed=k)
    got = linear_topk(x, w, k, bias=b, backend="triton", temperature=1.3)
    log_q, lse = dense_log_softmax(x, w, b, temperature=1.3)
    assert_topk_close(got, log_q, lse, k, tol=fp32_tolerance(x, w, b, log_q, lse, temperature=1.3))


def test_topk_above_256_takes_the_chunked_sweep():
    x, w, b = make_problem(5, 400, 8, torch.float32, seed=3)
    got = linear_topk(x, w, 300, bias=b, backend="triton")
    want = linear_topk(x, w, 300, bias=b, backend="chunked")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k", [5, 64, 256])
@pytest.mark.parametrize("softcap", [None, 40.0])
def test_topk_exact_ties_go_to_the_lower_id(k, softcap):
    """Integer logits from 7 distinct weight rows repeated over V=300: every value ties many times."""
    g = torch.Generator().manual_seed(k)
    x = torch.randint(-3, 4, (19, 8), generator=g).float()
    w = torch.randint(-2, 3, (7, 8), generator=g).float()[torch.randint(0, 7, (300,), generator=g)]
    b = torch.randint(-1, 2, (300,), generator=g).float()
    got = linear_topk(x, w, k, bias=b, softcap=softcap, temperature=0.5, backend="triton")
    want = linear_topk(x, w, k, bias=b, softcap=softcap, temperature=0.5, backend="torch")
    assert torch.equal(got.ids, want.ids)
    # The tile's tanh (1 - 2 / (exp(2y) + 1)) is a few ulp of 1 off near 0, c = 40 times that.
    tol = 1e-5 if softcap is None else 5e-5
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=tol)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=tol)


def test_topk_edge_inputs():
    x, w, b = make_problem(9, 130, 24, torch.float32, seed=5)
    # A non-unit inner stride (made contiguous by the launcher) and a 3-D input.
    wide = torch.zeros(9, 48)
    wide[:, ::2] = x
    got = linear_topk(wide[:, ::2].reshape(3, 3, 24), w, 7, bias=b, backend="triton")
    want = linear_topk(x, w, 7, bias=b, backend="torch")
    assert torch.equal(got.ids, want.ids)
    empty = linear_topk(x[:0], w, 4, backend="triton")
    assert empty.ids.shape == (0, 4) and empty.lse.shape == (0,)
    one = linear_topk(x[:1], w[:3], 3, backend="triton")
    assert torch.equal(one.ids, linear_topk(x[:1], w[:3], 3, backend="torch").ids)
    with pytest.raises(TypeError, match="float64"):
        linear_topk(x.double(), w.double(), 3, backend="triton")


def test_topk_threshold_pass_settles_rows_without_the_fallback(monkeypatch):
    """A vocabulary of 40 tiles: the 1-in-16 subset's bound leaves every row's list within capacity."""
    redone = record_merged_rows(monkeypatch)
    x, w, b = make_problem(24, 2560, 16, torch.float32, seed=11, scale=3.0)
    got = linear_topk(x, w, 8, bias=b, backend="triton")
    log_q, lse = dense_log_softmax(x, w, b)
    assert_topk_close(got, log_q, lse, 8, tol=fp32_tolerance(x, w, b, log_q, lse))
    assert redone == []


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_topk_rows_past_the_capacity_take_the_merge_kernel(monkeypatch, dtype):
    """Lists of 40 slots per (row, split) for about 40 entries each: some rows overflow and are redone, exactly."""
    redone = record_merged_rows(monkeypatch)
    x, w, b = make_problem(40, 1500, 16, dtype, seed=12, scale=2.0)
    options = LossOptions(softcap=4.0, temperature=0.8)
    got = triton_topk(x, w, b.float(), 5, options, raw_lse=True, capacity=40)
    want = linear_topk(x, w, 5, bias=b, softcap=4.0, temperature=0.8, backend="torch")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)
    raw = linear_topk(x, w, 1, bias=b, softcap=4.0, backend="torch")
    torch.testing.assert_close(got.lse_raw, raw.lse, rtol=0, atol=2e-5)
    assert len(redone) == 1 and 0 < redone[0] < 40


def test_topk_rows_of_several_groups_are_redone_in_one_fallback(monkeypatch):
    """Groups of a few rows (a small candidate budget): the overflowing rows of every group
    are found after the last group and redone by one merge-kernel call, exactly."""
    redone = record_merged_rows(monkeypatch)
    monkeypatch.setattr(topk_module, "CANDIDATE_BUDGET_BYTES", 20 * 1024)
    groups = []
    threshold_topk = topk_module.threshold_topk

    def record(x, *args):
        groups.append(x.shape[0])
        return threshold_topk(x, *args)

    monkeypatch.setattr(topk_module, "threshold_topk", record)
    x, w, b = make_problem(40, 1500, 16, torch.float32, seed=12, scale=2.0)
    options = LossOptions(softcap=4.0, temperature=0.8)
    got = triton_topk(x, w, b.float(), 5, options, capacity=16)
    want = linear_topk(x, w, 5, bias=b, softcap=4.0, temperature=0.8, backend="torch")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)
    assert len(groups) >= 3 and sum(groups) == 40
    assert len(redone) == 1 and max(groups) < redone[0] < 40  # rows of several groups


def test_topk_bounds_above_the_kth_value_are_caught(monkeypatch):
    """A bound the kernel's logits do not reach (+inf, NaN) leaves fewer than k candidates: redone exactly."""
    redone = record_merged_rows(monkeypatch)
    bounds = topk_module.subset_bounds

    def too_high(*args):
        bound = bounds(*args)
        bound[::3] = torch.inf
        bound[1::3] = torch.nan
        return bound

    monkeypatch.setattr(topk_module, "subset_bounds", too_high)
    x, w, b = make_problem(30, 700, 16, torch.float32, seed=13)
    got = linear_topk(x, w, 6, bias=b, backend="triton")
    want = linear_topk(x, w, 6, bias=b, backend="torch")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)
    assert redone == [20]


def test_topk_a_subset_holding_the_rows_largest_sends_them_to_the_merge_kernel(monkeypatch):
    """The bound is the subset's j-th largest with j < k (here 12 for k = 32), which lets
    through k or more entries unless the subset holds j of a row's largest: with every
    16th row of W scaled up, it holds all of them, each row's count falls short of k,
    and every row is redone exactly."""
    redone = record_merged_rows(monkeypatch)
    x, w, b = make_problem(20, 1500, 16, torch.float32, seed=15)
    step = topk_module.subset_step(1500, 32)
    assert step == 16 and topk_module.subset_rank(32, step) == 12
    w[::step] *= 6.0
    got = triton_topk(x, w, b, 32, LossOptions())
    want = linear_topk(x, w, 32, bias=b, backend="torch")
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)
    assert redone == [20]


def test_topk_rows_of_nan_are_redone_and_the_others_settle(monkeypatch):
    """A NaN hidden state makes its row's logits NaN, none of which passes the bound: those
    rows alone go to the merge kernel, and their lse is NaN. (A NaN among finite logits,
    which only the NaN lse flags, is `test_topk_nan_logits_rank_first`'s case.)"""
    redone = record_merged_rows(monkeypatch)
    x, w, b = make_problem(17, 900, 16, torch.float32, seed=16)
    x[[2, 9], 3] = torch.nan
    got = triton_topk(x, w, b, 4, LossOptions())
    want = linear_topk(x, w, 4, bias=b, backend="torch")
    assert torch.equal(got.ids, want.ids)
    assert redone == [2]
    assert got.lse[[2, 9]].isnan().all() and not got.lse[[0, 1, 3]].isnan().any()


def test_topk_merge_kernel_sorts_every_tile_under_triton_3_3(monkeypatch):
    """Triton 3.3's compiler crashes on the merge kernel's skip of unbeaten tiles: there it
    sorts every tile, with the same exact result (every row of a one-slot list redone)."""
    redone = record_merged_rows(monkeypatch)
    monkeypatch.setattr(topk_module, "triton_version", lambda: (3, 3))
    assert not topk_module.skip_unbeaten_tiles()
    x, w, b = make_problem(13, 700, 16, torch.float32, seed=16, scale=2.0)
    got = triton_topk(x, w, b.float(), 6, LossOptions(softcap=4.0, temperature=0.8), capacity=1)
    want = linear_topk(x, w, 6, bias=b, softcap=4.0, temperature=0.8, backend="torch")
    assert redone == [13]
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-5)


def test_topk_nan_logits_rank_first():
    """A NaN row of W makes that id NaN in every row: first, as in a descending torch.sort.

    The threshold pass hands rows holding NaN to the merge kernel, which keys NaN above
    every number; so does a list too short for any row (capacity 8).
    """
    x, w, b = make_problem(17, 900, 16, torch.float32, seed=14)
    w[123] = torch.nan
    for capacity in (None, 8):  # the threshold pass, then every row through the merge kernel
        got = triton_topk(x, w, b, 4, LossOptions(), capacity=capacity)
        want = linear_topk(x, w, 4, bias=b, backend="torch")
        assert torch.equal(got.ids, want.ids)
        assert (got.ids[:, 0] == 123).all()


# --------------------------------------------------------------------------------------
# The noise
# --------------------------------------------------------------------------------------


@triton.jit
def _noise_kernel(seed_ptr, pos_ptr, words_ptr, gumbel_ptr, noise_ptr, first_group, sample,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    words = tl.load(words_ptr + cols).to(tl.uint32)
    tl.store(gumbel_ptr + cols, gumbel_from_words(words))
    seed = tl.load(seed_ptr + rows)
    pos_lo = tl.load(pos_ptr + 2 * rows).to(tl.uint32)
    pos_hi = tl.load(pos_ptr + 2 * rows + 1).to(tl.uint32)
    noise = tile_noise(seed, pos_lo, pos_hi, first_group, sample, BLOCK_M, BLOCK_N)
    tl.store(noise_ptr + rows[:, None] * BLOCK_N + cols[None, :], noise)


@triton.jit
def _gumbel_kernel(words_ptr, gumbel_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(gumbel_ptr + offs, gumbel_from_words(tl.load(words_ptr + offs).to(tl.uint32)))


def test_gumbel_transform_keeps_fp32_precision_at_both_ends():
    """g = -log(-log(u)) in fp32 against float64 at every word near 0, 2**31 and 2**32 and
    2**18 random words: within a few fp32 ulps everywhere, including u within 2**-33 of 1,
    where a rare token wins (E ~ 1e-10: an fp32 u would round to 1 and give g = inf)."""
    edges = [torch.arange(0, 4096), torch.arange(2**31 - 2048, 2**31 + 2048), torch.arange(2**32 - 4096, 2**32)]
    words = torch.cat([*edges, torch.randint(0, 2**32, (2**18,), generator=torch.Generator().manual_seed(1))])
    gumbel = torch.empty(len(words))
    _gumbel_kernel[(len(words) // 4096,)](words, gumbel, BLOCK=4096)
    u = (words.double() * 2 + 1) / 2**33
    truth = -torch.log(-torch.log(u))
    assert truth.max() > 22.8  # the rarest variates are in the test
    # Two fp32 logs and the roundings of u, v and y: a few ulps of E (numpy's fp32 log, which
    # the interpreter runs, is itself within 4 ulps) and of g.
    torch.testing.assert_close(gumbel.double(), truth, rtol=2**-21, atol=2**-21)


def test_noise_is_the_torch_stream():
    """Gumbel transform at the edge words, and a tile's noise at large ids, seeds and positions."""
    edges = torch.tensor([0, 1, 2, 2**31 - 2, 2**31 - 1, 2**31, 2**31 + 1, 2**32 - 2, 2**32 - 1])
    words = torch.cat([edges, torch.randint(0, 2**32, (64 - len(edges),), generator=torch.Generator().manual_seed(0))])
    seeds = torch.tensor([0, 1, -1, 2**40 + 3, -(2**62), 7, 2**32 - 1, 12345])
    positions = torch.tensor([0, 5, 2**32 + 1, 2**45, 3, 2**33 - 1, 17, 0])
    keys = row_keys(seeds, positions, 8, torch.device("cpu"))
    seed_words = keys[0] | (keys[1] << 32)
    gumbel = torch.empty(64)
    noise = torch.empty(8, 64)
    first_group, sample = 2**28 + 5, 3
    _noise_kernel[(1,)](seed_words, torch.stack(keys[2:], dim=1).contiguous(), words, gumbel, noise, first_group,
                        sample, BLOCK_M=8, BLOCK_N=64)
    # Math libraries differ by an ulp in the fp32 log: a few 1e-7 absolute where g = -log(E) crosses 0.
    torch.testing.assert_close(gumbel, _gumbel_from_words(words), rtol=1e-6, atol=4e-7)
    v0 = 4 * first_group
    torch.testing.assert_close(noise, gumbel_noise_range(v0, v0 + 64, keys, sample), rtol=1e-6, atol=4e-7)


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------

def sorted_candidates(generator: torch.Generator, rows: int = 7, cols: int = 70, vocab: int = 5000):
    """(ids, z, lse_z) as a top-k pass leaves them: `cols` candidates a row by (z desc, id
    asc), ids scattered over `vocab`; the rows' candidates hold 100% down to ~5% of the
    mass (the rest of the row beyond them); runs of equal z, some across 32-wide chunks."""
    ids = torch.stack([torch.randperm(vocab, generator=generator)[:cols] for _ in range(rows)])
    z = torch.randn(rows, cols, generator=generator) * torch.linspace(3.0, 0.3, rows)[:, None]
    z[1, 20:50] = 1.0  # 30 equal logits from the first chunk into the second
    z[2, :5] = z[2].max() + 0.5  # equal maxima
    order = torch.sort(ids, dim=1).indices  # by id, then stably by z: (z desc, id asc)
    ids, z = ids.gather(1, order), z.gather(1, order)
    order = torch.sort(z, dim=1, descending=True, stable=True).indices
    ids, z = ids.gather(1, order), z.gather(1, order)
    beyond = torch.linspace(0.0, 3.0, rows)  # log of (row mass / candidates' mass)
    return ids, z, torch.logsumexp(z, dim=1) + beyond


CANDIDATE_OPTIONS = [dict(top_p=0.9), dict(top_p=0.5, num_samples=3), dict(top_k=20), dict(top_k=70),
                     dict(top_k=30, top_p=0.8, temperature=1.3), dict(min_p=0.2), dict(top_p=0.95, min_p=0.05),
                     dict(top_k=60, top_p=0.3, min_p=0.5, num_samples=4)]


@pytest.mark.parametrize("options", CANDIDATE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_candidate_sample_is_the_torch_ops_sample(options):
    """One launch for the kept prefix, the rows it settles, the kept lse and the draws:
    `torch_candidate_sample`'s Sample and unsettled rows, on 7 rows of 70 candidates (3
    chunks of 32) with per-row seeds and positions."""
    from distil_kernels.sampling.sample import torch_candidate_sample
    from distil_kernels.sampling.triton.truncation import triton_candidate_sample

    gen = torch.Generator().manual_seed(5)
    ids, z, lse_z = sorted_candidates(gen)
    lse_raw = lse_z * 0.8 + 1.0
    seeds = torch.randint(-(2**62), 2**62, (7,), generator=gen)
    positions = torch.arange(7) + 2**32 - 3
    sampling = SamplingOptions(**options)
    vocab = 5000
    # Rows 2 and 4 flagged inexact (a top-k pass that could not settle them): unsettled whatever their prefix.
    exact = torch.tensor([True, True, False, True, False, True, True]) if sampling.top_k is None else None
    got, got_unsettled = triton_candidate_sample(ids, z, lse_z, lse_raw, sampling, seeds, positions, None, vocab,
                                                 exact)
    want, want_unsettled = torch_candidate_sample(ids, z, lse_z, lse_raw, sampling, seeds, positions, None, vocab,
                                                  exact)
    assert torch.equal(got_unsettled, want_unsettled)
    if exact is not None:
        assert {2, 4} <= set(got_unsettled.tolist())
    settled = torch.ones(7, dtype=torch.bool)
    settled[want_unsettled] = False
    assert settled.any()
    # Unsettled rows are the dense fallback's to overwrite.
    assert torch.equal(got.ids[settled], want.ids[settled])
    for p, q in zip(got[1:3], want[1:3]):
        torch.testing.assert_close(p[settled], q[settled], rtol=0, atol=2e-6)
    assert got.lse is lse_raw


def test_candidate_sample_ties_and_nan_rows():
    """Equal scores (z = 1e30 swamps any noise) go to the lowest id, wherever its chunk;
    a row whose lse is NaN is refused, as by the torch ops."""
    from distil_kernels.sampling.sample import torch_candidate_sample
    from distil_kernels.sampling.triton.truncation import triton_candidate_sample

    gen = torch.Generator().manual_seed(6)
    ids, z, lse_z = sorted_candidates(gen)
    z[:, :40] = 1e30
    lse_z = torch.full_like(lse_z, 1e30)
    sampling = SamplingOptions(num_samples=3, top_k=50)
    got, _ = triton_candidate_sample(ids, z, lse_z, lse_z, sampling, 13, None, None, 5000)
    assert torch.equal(got.ids, ids[:, :40].min(dim=1).values[:, None].expand(7, 3))
    lse_z[3] = float("nan")
    for sample in (triton_candidate_sample, torch_candidate_sample):
        with pytest.raises(ValueError, match=r"must not contain NaN; 1 row\(s\) do, the first row 3"):
            sample(ids, z, lse_z, lse_z, sampling, 13, None, None, 5000)


SAMPLE_OPTIONS = [
    dict(), dict(temperature=0.7), dict(temperature=0, num_samples=3), dict(top_k=5), dict(top_p=0.9),
    dict(min_p=0.1), dict(num_samples=5, top_k=40, top_p=0.95, temperature=1.3), dict(num_samples=6),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("options", SAMPLE_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_sample_draws_the_torch_ids(dtype, options):
    """B=21, V=300, d=16: 2 row blocks x 3 splits (2 tiles each, the last 44 columns wide)."""
    x, w, b = make_problem(21, 300, 16, dtype, seed=1, scale=3.0)
    want = linear_sample(x, w, bias=b, softcap=5.0, seed=7, backend="torch", **options)
    got = linear_sample(x, w, bias=b, softcap=5.0, seed=7, backend="triton", **options)
    assert torch.equal(got.ids, want.ids)
    # fp32 logits summed in another order; |lse| < 10, where an fp32 ulp is 9.5e-7.
    for p, q in zip(got[1:], want[1:]):
        assert p.dtype == torch.float32 and p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=0, atol=4e-6)


@pytest.mark.parametrize("options", [dict(), dict(top_p=0.9), dict(num_samples=3, temperature=1.3)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_sample_ids_masked_by_the_bias(options):
    """The first split of every row sees only -inf: no masked id drawn, the torch ids and lse."""
    x, w, b = make_problem(21, 300, 16, torch.float32, seed=2, scale=3.0)
    b = mask_ids(b)
    want = linear_sample(x, w, bias=b, seed=7, backend="torch", **options)
    got = linear_sample(x, w, bias=b, seed=7, backend="triton", **options)
    assert torch.equal(got.ids, want.ids) and b[got.ids].isfinite().all()
    for p, q in zip(got[1:], want[1:]):
        torch.testing.assert_close(p, q, rtol=0, atol=4e-6)


@pytest.mark.parametrize("split_n", [1, 4])
@pytest.mark.parametrize("options", [dict(num_samples=3, temperature=0.8), dict(temperature=0)],
                         ids=["sample", "greedy"])
def test_sample_tiles_per_pass_over_x(monkeypatch, split_n, options):
    """One 32-wide tile per pass over x, or four (V=300: 10 tiles, the last pass holds 2 and skips 2)."""
    from distil_kernels.sampling.triton import configs

    monkeypatch.setattr(configs, "INTERPRETER_SAMPLE_CONFIG",
                        TileConfig(16, 32, 32, num_warps=1, num_stages=1, split_n=split_n))
    x, w, b = make_problem(21, 300, 16, torch.float32, seed=4, scale=3.0)
    want = linear_sample(x, w, bias=b, seed=9, backend="torch", **options)
    got = linear_sample(x, w, bias=b, seed=9, backend="triton", **options)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.raw_logprobs, want.raw_logprobs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(), dict(top_p=0.8)], ids=["plain", "top_p"])
def test_sample_per_row_seeds_and_positions(options):
    x, w, b = make_problem(19, 200, 8, torch.float32, seed=2, scale=2.0)
    gen = torch.Generator().manual_seed(3)
    seeds = torch.randint(-(2**62), 2**62, (19,), generator=gen)
    positions = torch.randint(0, 2**40, (19,), generator=gen)
    for seed, pos in ((seeds, None), (seeds, positions), (11, positions)):
        want = linear_sample(x, w, bias=b, seed=seed, positions=pos, num_samples=2, backend="torch", **options)
        got = linear_sample(x, w, bias=b, seed=seed, positions=pos, num_samples=2, backend="triton", **options)
        assert torch.equal(got.ids, want.ids)


def test_greedy_ties_go_to_the_lower_id():
    g = torch.Generator().manual_seed(4)
    x = torch.randint(-3, 4, (20, 8), generator=g).float()
    w = torch.randint(-1, 2, (5, 8), generator=g).float()[torch.randint(0, 5, (250,), generator=g)]
    got = linear_sample(x, w, temperature=0, backend="triton")
    want = (x @ w.T).argmax(dim=1)  # first maximum
    assert torch.equal(got.ids[:, 0], want)
    assert (got.logprobs == 0).all()


CHI2_CRITICAL = {2: 13.816, 5: 20.515}  # p = 1e-3, by degrees of freedom
PROBS = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05], dtype=torch.float64)


@pytest.mark.parametrize("options, expected", [
    (dict(), PROBS),
    (dict(top_p=0.7), torch.tensor([0.35, 0.25, 0.15, 0, 0, 0], dtype=torch.float64) / 0.75),
], ids=["plain", "top_p"])
def test_sample_chi_square(options, expected):
    """2048 draws (64 rows x 32 samples) from a head whose logits are log(PROBS)."""
    w = torch.zeros(6, 8)
    w[:, 0] = PROBS.log().float()
    x = torch.zeros(64, 8)
    x[:, 0] = 1.0
    ids = linear_sample(x, w, seed=5, num_samples=32, backend="triton", **options).ids.flatten()
    counts = torch.bincount(ids, minlength=6).double()
    assert (counts[expected == 0] == 0).all()
    live = expected > 0
    e = expected[live] * ids.numel()
    assert float(((counts[live] - e) ** 2 / e).sum()) < CHI2_CRITICAL[int(live.sum()) - 1]


def truncation_rows(generator: torch.Generator) -> torch.Tensor:
    """[10, 301] logits (V = 9 tiles of 32 and 13 ids): rows flat to peaked, runs of equal
    logits across the nucleus boundary, ids masked to -inf, and -0 beside +0."""
    raw = torch.randn(10, 301, generator=generator) * torch.tensor([0.01, 0.5, 1, 2, 3, 5, 1, 1, 1, 1])[:, None]
    raw[0, :50] = 0.02  # equal logits at the top of a flat row
    raw[1, 10:20] = float("-inf")
    raw[6] = -1.0
    raw[6, 37:137] = 2.0  # 100 equal logits hold 95% of the mass: the boundary cuts the run
    raw[7, ::2] = 0.5  # 151 equal logits, every other id, across tiles
    raw[8, 5] = raw[8, 150] = raw[8].max() + 1  # two equal maxima
    # 20 zeros, every other one -0, hold 56% of the mass below 38%: top_p=0.9 keeps 19 of
    # them in id order, -0 and +0 alike.
    raw[9] = -5.0
    raw[9, :5] = 1.0
    raw[9, 100:120] = 0.0
    raw[9, 100:120:2] = -0.0
    return raw


TRUNCATIONS = [dict(top_p=0.9), dict(top_p=0.5, temperature=0.7), dict(top_p=0.3, temperature=0.9),
               dict(top_p=0.999), dict(min_p=0.1), dict(top_p=0.95, min_p=0.2, temperature=1.3),
               dict(top_p=0.2, min_p=0.9), dict(temperature=1.2), dict()]


@pytest.mark.parametrize("options", TRUNCATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "none")
def test_truncation_keeps_the_sorted_prefix(options):
    """The kernel's kept set is the stably sorted rows' prefix (`sorted_kept_mask`), equal
    logits across the boundary cut in id order; its log-sum-exps are torch's to an ulp."""
    from distil_kernels.sampling.triton.truncation import triton_truncation

    raw = truncation_rows(torch.Generator().manual_seed(21))
    sampling = SamplingOptions(**options)
    got = triton_truncation(raw, sampling)
    z = at_temperature(raw, sampling.temperature)
    lse = torch.logsumexp(z, dim=1)
    want = sorted_kept_mask(z, lse, sampling)
    kept = got.kept(z)
    assert torch.equal(kept, want), f"rows {(kept != want).any(1).nonzero()[:, 0].tolist()} keep other ids"
    torch.testing.assert_close(got.lse_raw, torch.logsumexp(raw, dim=1), rtol=0, atol=2e-6)
    torch.testing.assert_close(got.kept_lse, torch.logsumexp(torch.where(want, z, -math.inf), dim=1), rtol=0,
                               atol=2e-6)
    if sampling.top_p is not None and sampling.top_p < 0.6:
        # The cut inside the runs of equal logits (rows 6 and 7) is what a key bound alone misses.
        assert 0 < int(kept[6].sum()) < 100 and 0 < int(kept[7].sum()) < 151


@pytest.mark.parametrize("num_samples", [1, 6], ids=["3-splits", "2-sample-programs"])
@pytest.mark.parametrize("options", [dict(top_p=0.9, temperature=0.8), dict(top_p=0.1), dict(min_p=0.05),
                                     dict(temperature=1.0)], ids=["top_p", "top_p-in-ties", "min_p", "none"])
def test_truncated_sample_draws_the_torch_ids(options, num_samples):
    """The kernels' Sample is `_dense_truncated_sample`'s in torch ops: 10 rows (4-row draw
    blocks), V=301, per-row seeds and positions past 2**32."""
    from distil_kernels.sampling.sample import _dense_truncated_sample, torch_draws
    from distil_kernels.sampling.triton.truncation import triton_truncated_sample

    g = torch.Generator().manual_seed(12)
    raw = truncation_rows(g)
    seeds = torch.randint(-(2**62), 2**62, (10,), generator=g)
    positions = torch.arange(10) + 2**33 - 3
    sampling = SamplingOptions(num_samples=num_samples, **options)
    got = triton_truncated_sample(raw, sampling, seeds, positions)
    want = _dense_truncated_sample(raw, sampling, seeds, positions, torch_draws)
    assert torch.equal(got.ids, want.ids)
    for p, q in zip(got[1:], want[1:]):
        assert p.dtype == torch.float32 and p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6)


def test_flat_head_fallback_draws_the_torch_ids(monkeypatch):
    """A flat head: top_p=0.95 keeps more of V=300 than the 256 candidates in every row, so
    every row takes the dense fallback and its kernels; the torch backend's ids."""
    from distil_kernels.sampling.triton import truncation

    calls = []
    dense = truncation.triton_truncated_sample
    monkeypatch.setattr(truncation, "triton_truncated_sample", lambda *a, **kw: calls.append(1) or dense(*a, **kw))
    x, w, b = make_problem(9, 300, 16, torch.float32, seed=3, scale=0.01)
    kwargs = dict(bias=b * 0.01, seed=11, top_p=0.95, temperature=1.2, num_samples=2)
    got = linear_sample(x, w, backend="triton", **kwargs)
    want = linear_sample(x, w, backend="torch", **kwargs)
    assert calls, "the dense fallback was not taken"
    assert torch.equal(got.ids, want.ids)
    for p, q in zip(got[1:], want[1:]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", [dict(top_k=5), dict(top_k=40, top_p=0.9, temperature=1.3, num_samples=3),
                                     dict(top_k=3, min_p=0.2), dict(top_k=301, top_p=0.5, num_samples=2)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_top_k_sample_from_logits_is_the_reference(options):
    """`sample_from_logits` with top_k on a GPU: the top_k by int64 keys and the candidate
    kernel draw `reference_sample`'s ids, equal logits at the top_k boundary kept in id
    order (10 rows of V=301, runs of ties across it)."""
    from distil_kernels.sampling.sample import reference_sample
    from distil_kernels.sampling.triton.truncation import triton_top_k_sample

    g = torch.Generator().manual_seed(17)
    raw = truncation_rows(g)
    raw[3, 100:110] = raw[3].topk(4).values[-1]  # ties at the 4th-largest logit, through top_k=5
    seeds = torch.randint(-(2**62), 2**62, (10,), generator=g)
    sampling = SamplingOptions(**options)
    got = triton_top_k_sample(raw, sampling, seeds, None)
    want = reference_sample(raw, sampling, seeds, None)
    assert torch.equal(got.ids, want.ids)
    for p, q in zip(got[1:], want[1:]):
        assert p.dtype == torch.float32 and p.shape == q.shape
        torch.testing.assert_close(p, q, rtol=0, atol=2e-6)


def test_top_p_rows_the_top_k_cannot_settle_take_the_dense_fallback(monkeypatch):
    """Lists of one slot a (row, split): the threshold top-k settles no row. Sampling with
    top_p sends them to the exact dense fallback, not to the top-k's merge kernel, with no
    wait on the device for them; the torch backend's ids."""
    from distil_kernels.sampling.triton import truncation

    redone = record_merged_rows(monkeypatch)
    monkeypatch.setattr(topk_module, "split_capacity", lambda *args: 1)
    dense_rows = []
    dense = truncation.triton_truncated_sample
    monkeypatch.setattr(truncation, "triton_truncated_sample",
                        lambda raw, *a, **kw: dense_rows.append(raw.shape[0]) or dense(raw, *a, **kw))
    x, w, b = make_problem(9, 300, 16, torch.float32, seed=7, scale=3.0)
    kwargs = dict(bias=b, seed=4, top_p=0.8, temperature=0.9, num_samples=2)
    got = linear_sample(x, w, backend="triton", **kwargs)
    want = linear_sample(x, w, backend="torch", **kwargs)
    assert redone == [] and sum(dense_rows) == 9
    assert torch.equal(got.ids, want.ids)
    for p, q in zip(got[1:], want[1:]):
        torch.testing.assert_close(p, q, rtol=0, atol=4e-6)


def test_flat_head_fallback_with_per_row_seeds():
    """Per-row seeds without positions key each row by its seed alone (position 0), in
    the dense fallback too: the torch ids, not the noise of the rows' batch indices."""
    x, w, b = make_problem(5, 300, 8, torch.float32, seed=5, scale=0.01)
    seeds = torch.randint(-(2**62), 2**62, (5,), generator=torch.Generator().manual_seed(6))
    kwargs = dict(bias=b * 0.01, seed=seeds, top_p=0.95, num_samples=2)
    got = linear_sample(x, w, backend="triton", **kwargs)
    want = linear_sample(x, w, backend="torch", **kwargs)
    assert torch.equal(got.ids, want.ids)


def test_sample_rejects_float64():
    x, w, _ = make_problem(3, 20, 4, torch.float64, seed=0)
    with pytest.raises(TypeError, match="float64"):
        linear_sample(x, w, backend="triton")
