"""The sampling core's `cuda` backend on the CPU, with its kernels' reference ops.

`distil_kernels.sampling.cuda` drives csrc/'s `row_topk` and `gumbel_argmax` over chunks
of logits; `REFERENCE_SAMPLING_OPS` states what those kernels compute. With the
reference ops in place of the extension (and the device check of `backend="cuda"`
lifted), `linear_topk` and `linear_sample` run their cuda paths here: chunking,
temperature, softcap, lse terms, truncation through the top-k candidates. The kernels
themselves are compared with the reference ops on a GPU (tests/sampling/test_gpu_sampling.py).
"""

from __future__ import annotations

import pytest
import torch

from distil_kernels import linear_sample, linear_topk
from distil_kernels.sampling import cuda as cuda_sampling
from distil_kernels.sampling.cuda import REFERENCE_SAMPLING_OPS
from sampling_checks import mask_ids


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """backend="cuda" on CPU tensors, with the reference ops standing in for the kernels."""
    import distil_kernels.backends as backends
    import distil_kernels.sampling.topk as topk_module

    def resolve(backend, device, dtype=None):
        return "cuda" if backend == "cuda" else original(backend, device, dtype)

    original = backends.resolve_backend
    monkeypatch.setattr(backends, "resolve_backend", resolve)
    monkeypatch.setattr(topk_module, "resolve_backend", resolve)
    monkeypatch.setattr(cuda_sampling, "extension_sampling_ops", lambda: REFERENCE_SAMPLING_OPS)


def problem(rows=40, dim=16, vocab=301, seed=51, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=gen) * 2.0
    w = torch.randn(vocab, dim, generator=gen)
    w[7] = w[250]  # two ids with equal logits in every row: ties go to the lower id
    b = torch.randn(vocab, generator=gen) * 0.5
    return x.to(dtype), w.to(dtype), b.to(dtype)


@pytest.mark.parametrize("options", [dict(), dict(temperature=0.7, softcap=4.0)], ids=["plain", "T-softcap"])
@pytest.mark.parametrize("k", [1, 7, 64])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_topk_matches_the_torch_backend(cuda_on_cpu, k, options, with_bias):
    """Without bias or softcap the chunks go from the GEMM to the selection kernel."""
    x, w, b = problem()
    b = b if with_bias else None
    # A 60 KiB workspace: 50 rows of 301 fp32 logits: several chunks of rows.
    got = linear_topk(x, w, k, bias=b, backend="cuda", workspace_bytes=60 * 1024, **options)
    want = linear_topk(x, w, k, bias=b, backend="torch", **options)
    assert torch.equal(got.ids, want.ids)
    torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-6)
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=2e-6)


@pytest.mark.parametrize("options", [
    dict(),
    dict(temperature=0.7, num_samples=3),
    dict(temperature=0.0),
    dict(top_k=20, temperature=0.8),
    dict(top_p=0.6, min_p=0.05),
], ids=["plain", "T-samples", "greedy", "top_k", "top_p-min_p"])
def test_sample_draws_the_torch_ids(cuda_on_cpu, options):
    x, w, b = problem(seed=52)
    seeds = torch.arange(40, dtype=torch.int64) * 977 - 5000
    kwargs = dict(bias=b, softcap=6.0, seed=seeds, positions=torch.arange(40) + 2**33, **options)
    got = linear_sample(x, w, backend="cuda", workspace_bytes=40 * 1024, **kwargs)
    want = linear_sample(x, w, backend="torch", **kwargs)
    assert torch.equal(got.ids, want.ids)
    for name, a, e in zip(got._fields[1:], got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_flat_head_fallback_draws_the_torch_ids(cuda_on_cpu, monkeypatch):
    """A flat head: top_p=0.95 keeps ~280 of 301 ids, more than the 256 candidates, so
    every row takes the dense fallback, whose draws come from `gumbel_argmax` over the
    masked logits; the torch backend's ids all the same."""
    calls = []
    draws = cuda_sampling.cuda_dense_draws
    monkeypatch.setattr(cuda_sampling, "cuda_dense_draws", lambda *a, **kw: calls.append(1) or draws(*a, **kw))
    x, w, b = problem(seed=54)
    kwargs = dict(bias=b * 0.01, seed=3, top_p=0.95, temperature=1.2, num_samples=3)
    got = linear_sample(x * 0.01, w, backend="cuda", **kwargs)
    want = linear_sample(x * 0.01, w, backend="torch", **kwargs)
    assert calls, "the dense fallback was not taken"
    assert torch.equal(got.ids, want.ids)
    for name, a, e in zip(got._fields[1:], got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=2e-6, msg=lambda m, name=name: f"{name}: {m}")


def test_ids_masked_by_the_bias(cuda_on_cpu):
    x, w, b = problem(seed=53)
    b = mask_ids(b)
    for k in (1, 9):
        got, want = (linear_topk(x, w, k, bias=b, backend=name, workspace_bytes=40 * 1024)
                     for name in ("cuda", "torch"))
        assert torch.equal(got.ids, want.ids)
        torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=2e-6)
    got, want = (linear_sample(x, w, bias=b, seed=3, num_samples=2, backend=name, workspace_bytes=40 * 1024)
                 for name in ("cuda", "torch"))
    assert torch.equal(got.ids, want.ids) and b[got.ids].isfinite().all()
    torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=2e-6)


def test_topk_above_the_kernel_limit_takes_the_chunked_sweep(cuda_on_cpu):
    x, w, b = problem(rows=3, vocab=1500)
    got = linear_topk(x, w, 1100, bias=b, backend="cuda")
    want = linear_topk(x, w, 1100, bias=b, backend="torch")
    assert torch.equal(got.ids, want.ids)
