"""sample_from_logits and linear_sample: exact distributions, the shared stream, backends."""

from __future__ import annotations

import math

import pytest
import torch

from distil_kernels import linear_sample, sample_from_logits
from distil_kernels.sampling.sample import at_temperature, philox_rows, row_keys
from sampling_checks import CHI2_CRITICAL, chi_square, mask_ids, truncated

PROBS = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05], dtype=torch.float64)
# 250000 draws, a row's samples independent (their own Philox counters): enough that a
# temperature 5% off fails every chi-square test below with probability >= 0.99 (at
# 30000 draws, top_k=4 with top_p=0.8 and T=1.3 caught it one time in ten).
ROWS, SAMPLES = 2500, 100

OPTIONS = [dict(), dict(temperature=0.6), dict(temperature=1.7), dict(top_k=3), dict(top_p=0.7),
           dict(min_p=0.3), dict(top_k=4, top_p=0.8, temperature=1.3), dict(top_p=0.95, min_p=0.2)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_sample_from_logits_chi_square(options):
    logits = PROBS.log().float()[None, :].expand(ROWS, -1).contiguous()
    sample = sample_from_logits(logits, seed=11, num_samples=SAMPLES, **options)
    expected = truncated(PROBS, **options)
    stat, dof = chi_square(sample.ids, expected)
    assert dof >= 1
    assert stat < CHI2_CRITICAL[dof], f"chi2 {stat:.1f} with {dof} dof"
    # fp32 logits of |z| < 5 (at T = 0.6) and their lse: 1e-6 is two ulps.
    torch.testing.assert_close(sample.logprobs.double(), expected[sample.ids].log(), rtol=0, atol=1e-6)
    torch.testing.assert_close(sample.raw_logprobs.double(), PROBS[sample.ids].log(), rtol=0, atol=1e-6)


def _head_for(probs: torch.Tensor, dim: int = 8):
    """A head whose logits for the hidden state e_0 are log(probs): weight[:, 0] = log p."""
    weight = torch.zeros(len(probs), dim, dtype=torch.float64)
    weight[:, 0] = probs.log()
    x = torch.zeros(ROWS, dim, dtype=torch.float64)
    x[:, 0] = 1.0
    return x, weight


@pytest.mark.parametrize("backend", ["torch", "chunked"])
@pytest.mark.parametrize("options", OPTIONS[:1] + OPTIONS[3:7],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_linear_sample_chi_square(backend, options):
    x, weight = _head_for(PROBS)
    sample = linear_sample(x, weight, seed=5, num_samples=SAMPLES, backend=backend, **options)
    stat, dof = chi_square(sample.ids, truncated(PROBS, **options))
    assert dof >= 1
    assert stat < CHI2_CRITICAL[dof], f"chi2 {stat:.1f} with {dof} dof"


def test_rare_token_is_drawn_at_its_rate():
    """p = 1e-4 over 2e5 draws: 20 expected; [5, 40] holds with probability > 0.999."""
    probs = torch.tensor([1 - 1e-4, 1e-4], dtype=torch.float64)
    logits = probs.log().float()[None, :].expand(200000, -1).contiguous()
    hits = int((sample_from_logits(logits, seed=3).ids == 1).sum())
    assert 5 <= hits <= 40


@pytest.mark.parametrize("options", [dict(), dict(top_k=5), dict(top_p=0.9), dict(min_p=0.05), dict(temperature=0),
                                     dict(num_samples=3, top_p=0.95, temperature=1.3)])
@pytest.mark.parametrize("workspace", [None, 4096])
@pytest.mark.parametrize("noise_block", [None, 37 * 64], ids=["one-noise-block", "64-id-noise-blocks"])
def test_chunked_draws_the_same_ids_as_torch(options, workspace, noise_block, monkeypatch):
    if noise_block is not None:
        monkeypatch.setattr("distil_kernels.sampling.sample.NOISE_BLOCK_CPU", noise_block)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=gen, dtype=torch.float64) * 2
    w = torch.randn(300, 16, generator=gen, dtype=torch.float64)
    b = torch.randn(300, generator=gen, dtype=torch.float64)
    a = linear_sample(x, w, bias=b, softcap=5.0, seed=7, backend="torch", **options)
    c = linear_sample(x, w, bias=b, softcap=5.0, seed=7, backend="chunked", workspace_bytes=workspace, **options)
    assert torch.equal(a.ids, c.ids)
    # Both round the float64 logits to fp32 (softcapped, |lse| < 12): a few ulps apart.
    for p, q in zip(a[1:], c[1:]):
        torch.testing.assert_close(p, q, rtol=0, atol=4e-6)


@pytest.mark.parametrize("options", [dict(), dict(top_k=5), dict(top_p=0.9), dict(num_samples=2, temperature=1.3)],
                         ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
@pytest.mark.parametrize("workspace", [None, 4096])
def test_ids_masked_by_the_bias(options, workspace):
    """No masked id is drawn, and the tiles of only -inf leave the log-sum-exp finite."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 16, generator=gen) * 2
    w = torch.randn(300, 16, generator=gen)
    b = mask_ids(torch.randn(300, generator=gen))
    a = linear_sample(x, w, bias=b, seed=7, backend="torch", **options)
    c = linear_sample(x, w, bias=b, seed=7, backend="chunked", workspace_bytes=workspace, **options)
    assert torch.equal(a.ids, c.ids) and b[c.ids].isfinite().all()
    torch.testing.assert_close(c.lse.double(), torch.logsumexp(x.double() @ w.double().T + b.double(), dim=1),
                               rtol=0, atol=1e-5)
    # fp32 GEMMs summed in other orders; |lse| reaches 40, where an fp32 ulp is 3.8e-6.
    for p, q in zip(a[1:], c[1:]):
        torch.testing.assert_close(p, q, rtol=0, atol=8e-6)


def test_nucleus_larger_than_the_candidates_takes_the_exact_fallback():
    """A flat row over V=2000: top_p=0.99 keeps ~1980 ids, far past the 256 candidates."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 8, generator=gen, dtype=torch.float64) * 0.01
    w = torch.randn(2000, 8, generator=gen, dtype=torch.float64)
    a = linear_sample(x, w, top_p=0.99, seed=2, backend="torch", num_samples=4)
    c = linear_sample(x, w, top_p=0.99, seed=2, backend="chunked", num_samples=4)
    assert torch.equal(a.ids, c.ids)
    torch.testing.assert_close(a.logprobs, c.logprobs, rtol=0, atol=0)


def test_fallback_rows_with_per_row_seeds_are_named_by_their_seed():
    """Per-row seeds without positions: a row's noise is keyed by its seed alone (position
    0), in the exact fallback too, so each row draws what it draws in a batch of one."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 8, generator=gen, dtype=torch.float64) * 0.01  # flat rows: every row falls back
    w = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    seeds = torch.randint(-(2**62), 2**62, (5,), generator=gen)
    want = linear_sample(x, w, top_p=0.95, seed=seeds, num_samples=3, backend="torch")
    alone = torch.cat([linear_sample(x[i : i + 1], w, top_p=0.95, seed=seeds[i : i + 1], num_samples=3,
                                     backend="torch").ids for i in range(5)])
    assert torch.equal(want.ids, alone)
    got = linear_sample(x, w, top_p=0.95, seed=seeds, num_samples=3, backend="chunked")
    assert torch.equal(got.ids, want.ids)


@pytest.mark.parametrize("temperature", [1.0, 50.0, 200.0])
def test_truncated_raw_logprobs_keep_fp32_precision_at_any_temperature(temperature):
    """The candidate path's raw logprobs come from the candidates' own logits (z T - lse at
    1). Rebuilt as (logprob + lse at T) T, an ulp of the tempered lse grew T-fold: at T=200
    the chunked error was 10x the torch backend's (5e-5 against 5e-6)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=gen)
    w = torch.randn(500, 32, generator=gen)
    truth = torch.log_softmax(x.double() @ w.double().T, dim=1)
    errors = {}
    for backend in ("torch", "chunked"):
        got = linear_sample(x, w, temperature=temperature, top_k=50, seed=1, num_samples=4, backend=backend)
        errors[backend] = (got.raw_logprobs.double() - truth.gather(1, got.ids)).abs().max()
    assert errors["chunked"] <= 2 * errors["torch"], errors


def _searched_mask(z: torch.Tensor, lse: torch.Tensor, options, monkeypatch) -> torch.Tensor:
    """kept_mask's result, which must come from the bucket search, not from a sort."""
    from distil_kernels.sampling import sample

    def no_sort(*_):
        raise AssertionError("kept_mask sorted rows it should have searched")

    with monkeypatch.context() as patch:
        patch.setattr(sample, "sorted_kept_mask", no_sort)
        return sample.kept_mask(z, lse, options)


def _rows_for_the_nucleus_search(seed: int, wider_than: int = 0) -> torch.Tensor:
    """fp32 rows: flat and peaked, runs of equal values, -inf entries and signed zeros;
    wider than `wider_than` (kept_mask searches rows wider than its bucket table)."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.tensor([0.05, 0.5, 1.0, 2.0, 4.0, 8.0] * 2)[:, None]
    z = torch.randn(12, max(3000, wider_than + 1000), generator=gen) * scales
    z[6:8] = (z[6:8] * 4).round() / 4  # ties everywhere
    z[8, 100:2000] = -torch.inf
    z[9, ::2] = 0.0
    z[9, 1::2] = -0.0
    z[10, :] = 0.0  # one value: the nucleus is the lowest ids
    z[11, 7] = 30.0  # one id holds nearly all the mass
    return z


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.5, 0.9, 0.95, 0.999])
@pytest.mark.parametrize("min_p", [None, 0.05])
@pytest.mark.parametrize("bucket_bits", [14, 4], ids=["14-bit-buckets", "4-bit-buckets"])
def test_nucleus_mask_keeps_what_the_sorted_prefix_keeps(top_p, min_p, bucket_bits, monkeypatch):
    """kept_mask (bucketed mass, no sort) against kept_prefix over the stable sort."""
    from distil_kernels.sampling.sample import SamplingOptions, sorted_kept_mask

    monkeypatch.setattr("distil_kernels.sampling.sample.NUCLEUS_BUCKET_BITS", bucket_bits)
    z = _rows_for_the_nucleus_search(int(top_p * 1000), 1 << bucket_bits)
    lse = torch.logsumexp(z, dim=1)
    options = SamplingOptions(top_p=top_p, min_p=min_p)
    want = sorted_kept_mask(z, lse, options)
    got = _searched_mask(z, lse, options, monkeypatch)
    assert torch.equal(got, want), (got.sum(1), want.sum(1))
    kept_ids = got[10].nonzero()[:, 0].tolist()
    assert kept_ids == list(range(len(kept_ids)))  # equal values: the lowest ids


@pytest.mark.parametrize("top_p", [0.3, 0.95])
def test_nucleus_search_in_blocks_of_rows(top_p, monkeypatch):
    """kept_mask takes 5 rows at a time (12 rows: a short last block), as it takes 64 of a
    large batch (one search over 2**17 rows indexed its bucket table past int32)."""
    from distil_kernels.sampling.sample import SamplingOptions, sorted_kept_mask

    monkeypatch.setattr("distil_kernels.sampling.sample.NUCLEUS_ROWS", 5)
    monkeypatch.setattr("distil_kernels.sampling.sample.NUCLEUS_BUCKET_BITS", 8)
    z = _rows_for_the_nucleus_search(17, 1 << 8)
    lse = torch.logsumexp(z, dim=1)
    options = SamplingOptions(top_p=top_p)
    assert torch.equal(_searched_mask(z, lse, options, monkeypatch), sorted_kept_mask(z, lse, options))


@pytest.mark.parametrize("options", [dict(), dict(temperature=1.6, num_samples=2), dict(top_p=0.9),
                                     dict(top_p=0.5, temperature=0.7, num_samples=3),
                                     dict(min_p=0.2), dict(top_p=0.99, min_p=0.01, temperature=1.4)])
@pytest.mark.parametrize("noise_block", [None, 12 * 256], ids=["one-noise-block", "256-id-noise-blocks"])
def test_dense_truncated_sample_equals_the_reference(options, noise_block, monkeypatch):
    from distil_kernels.sampling.sample import SamplingOptions, _dense_truncated_sample, reference_sample

    if noise_block is not None:
        monkeypatch.setattr("distil_kernels.sampling.sample.NOISE_BLOCK_CPU", noise_block)
    z = _rows_for_the_nucleus_search(3)
    positions = torch.arange(100, 112)
    sampling = SamplingOptions(**options)
    want = reference_sample(z, sampling, 5, positions)
    got = _dense_truncated_sample(z, sampling, 5, positions)
    assert torch.equal(got.ids, want.ids)
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fallback_rows_sample_the_chunked_tiles_logits(dtype):
    """Low-precision heads: the chunked fallback draws from the logits its candidates came
    from (the GEMM's output rounded to the input dtype), as sample_from_logits on them."""
    from distil_kernels.sampling.sample import _tile_logits

    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(6, 32, generator=gen) * 0.02).to(dtype)
    w = torch.randn(3000, 32, generator=gen).to(dtype)
    got = linear_sample(x, w, top_p=0.95, temperature=0.9, seed=8, num_samples=2, backend="chunked")
    want = sample_from_logits(_tile_logits(x, w, None, None, 0), top_p=0.95, temperature=0.9, seed=8,
                              num_samples=2)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=1e-6)


def test_rows_are_independent_of_the_batch_around_them():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(50, 40, generator=gen)
    positions = torch.randint(0, 2**40, (50,), generator=gen)
    full = sample_from_logits(logits, seed=9, positions=positions, top_p=0.9, num_samples=2)
    perm = torch.randperm(50, generator=gen)[:20]
    part = sample_from_logits(logits[perm], seed=9, positions=positions[perm], top_p=0.9, num_samples=2)
    assert torch.equal(part.ids, full.ids[perm])
    per_row_seeds = torch.randint(0, 2**62, (50,), generator=gen)
    full = sample_from_logits(logits, seed=per_row_seeds)
    part = sample_from_logits(logits[perm], seed=per_row_seeds[perm])
    assert torch.equal(part.ids, full.ids[perm])


def test_seed_reproducible_and_samples_independent():
    logits = torch.zeros(2000, 50)
    a = sample_from_logits(logits, seed=1, num_samples=2)
    assert torch.equal(a.ids, sample_from_logits(logits, seed=1, num_samples=2).ids)
    assert (a.ids != sample_from_logits(logits, seed=2, num_samples=2).ids).float().mean() > 0.9
    assert (a.ids[:, 0] != a.ids[:, 1]).float().mean() > 0.9


def test_greedy_ties_to_lower_id():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    sample = sample_from_logits(logits, temperature=0, num_samples=2)
    assert sample.ids.tolist() == [[1, 1], [0, 0]]
    assert not sample.logprobs.any()
    for backend in ("torch", "chunked"):
        # Hidden states equal to the logits through an identity head.
        ids = linear_sample(logits, torch.eye(4), temperature=0, backend=backend).ids
        assert ids.tolist() == [[1], [0]]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(temperature=-1.0), ValueError, "temperature must be >= 0"),
    (dict(top_k=0), ValueError, "top_k must be >= 1"),
    (dict(top_k=100), ValueError, "top_k must be <= V = 6"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=True), ValueError, r"top_p must be in \(0, 1\], got True"),
    (dict(min_p=-0.1), ValueError, r"min_p must be in \[0, 1\]"),
    (dict(min_p=False), ValueError, r"min_p must be in \[0, 1\], got False"),
    (dict(num_samples=0), ValueError, "num_samples must be an int >= 1"),
    (dict(seed=1.5), TypeError, "seed must be an int or an int64 tensor"),
    (dict(seed=1 << 63), ValueError, r"seed must fit in 64 bits"),
    (dict(seed=torch.zeros(3, dtype=torch.int64)), ValueError, r"seed must be an int or an int64 tensor \[B\] = \[4\]"),
    (dict(positions=torch.zeros(3, dtype=torch.int64)), ValueError, r"positions must be an integer tensor \[B\]"),
    (dict(positions=torch.zeros(4, dtype=torch.bool)), ValueError, r"positions must be an integer tensor \[B\]"),
])
def test_bad_input(kwargs, error, match):
    logits = torch.randn(4, 6)
    with pytest.raises(error, match=match):
        sample_from_logits(logits, **kwargs)


def test_nan_logits_and_bad_shapes(monkeypatch):
    with pytest.raises(ValueError, match="NaN"):
        sample_from_logits(torch.tensor([[0.0, math.nan]]))
    # A row of -inf holds no distribution: it drew id 0 with NaN log-probabilities.
    with pytest.raises(ValueError, match=r"1 row\(s\) are all -inf, the first row 1"):
        sample_from_logits(torch.tensor([[0.0, -math.inf], [-math.inf, -math.inf]]), top_p=0.9)
    with pytest.raises(ValueError, match=r"shape \[B, V\]"):
        sample_from_logits(torch.zeros(3))
    with pytest.raises(ValueError, match=r"input must have shape \[B, d\]"):
        linear_sample(torch.zeros(2, 3, 4), torch.zeros(5, 4))
    # Truncated sampling from the candidates: a NaN row has no best score, and returned
    # the out-of-range id V.
    x = torch.randn(3, 4)
    x[1, 0] = math.nan
    for backend in ("torch", "chunked"):
        with pytest.raises(ValueError, match=r"logits .* must not contain NaN; 1 row\(s\) do, the first row 1"):
            linear_sample(x, torch.randn(10, 4), top_p=0.9, backend=backend)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pytest.importorskip("triton", minversion="3.2")
    with pytest.raises(ValueError, match="runs on cuda tensors"):
        linear_sample(torch.zeros(2, 4), torch.zeros(5, 4), backend="triton")


def test_at_temperature_is_the_correctly_rounded_quotient():
    """The tempered logits of every torch-op path: raw / temperature rounded once, as the
    kernels' div_rn (on CUDA, a plain division by a Python number is not: tests/sampling
    /test_gpu_sampling.py checks it there)."""
    x = torch.randn(1 << 14, generator=torch.Generator().manual_seed(4)) * 30.0
    for temperature in (0.7, 0.9, 1.3, 3.0):
        divisor = torch.tensor(temperature, dtype=torch.float32).double()
        assert torch.equal(at_temperature(x, temperature), (x.double() / divisor).float())


@pytest.mark.parametrize("seed", [0, 1, -1, (1 << 63) - 1, -(1 << 63), 123_456_789_012_345, -987_654_321])
def test_int_seed_keys_are_the_seed_tensors_keys(seed):
    """An int seed's words are filled in directly (no host copy): the same words as the
    int64 tensor holding it, with and without positions."""
    positions = torch.tensor([0, 5, (1 << 40) + 3, (1 << 62) + 7])
    for pos in (None, positions):
        got = row_keys(seed, pos, 4, torch.device("cpu"))
        want = row_keys(torch.tensor(seed, dtype=torch.int64), pos, 4, torch.device("cpu"))
        for g, w in zip(got, want):
            assert g.dtype == torch.int64 and torch.equal(g, w)


@pytest.mark.parametrize("seed", [0, -1, (1 << 63) - 1, -(1 << 63), 123_456_789_012_345], ids=str)
@pytest.mark.parametrize("kind", ["int", "scalar-tensor", "per-row"])
def test_philox_rows_are_the_row_keys_words_joined(seed, kind):
    """The Triton samplers' (seed, position) per row, whose 32-bit halves are `row_keys`'
    (k0, k1) and (position low, high): also for negative values and positions past 2**32,
    with and without positions, and for per-row seeds (position 0 without positions)."""
    rows = 4
    seed_arg = {"int": seed, "scalar-tensor": torch.tensor(seed, dtype=torch.int64),
                "per-row": torch.tensor([seed, 7, -3, 1 << 40], dtype=torch.int64)}[kind]
    for pos in (None, torch.tensor([0, -5, (1 << 40) + 3, -(1 << 62) - 7])):
        seeds, positions = philox_rows(seed_arg, pos, rows, torch.device("cpu"))
        k0, k1, pos_lo, pos_hi = row_keys(seed_arg, pos, rows, torch.device("cpu"))
        assert seeds.shape == positions.shape == (rows,) and seeds.is_contiguous() and positions.is_contiguous()
        mask = 0xFFFFFFFF
        for joined, low, high in ((seeds, k0, k1), (positions, pos_lo, pos_hi)):
            assert joined.dtype == torch.int64
            assert torch.equal(joined & mask, low) and torch.equal((joined >> 32) & mask, high)
