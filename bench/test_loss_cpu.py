"""The CPU loss suite under pytest-benchmark: one benchmark per provider x dtype x shape.

    .venv/bin/python -m pytest bench --benchmark-only                        # the suite
    .venv/bin/python -m pytest bench --benchmark-only --benchmark-autosave   # kept in .benchmarks/
    .venv/bin/python -m pytest bench --benchmark-only --benchmark-compare \\
        --benchmark-compare-fail=median:15%                                  # against the last saved run

Cases and providers are those of `python -m bench loss` (bench/loss.py). Time is the
benchmark fixture's, in this process: `ROUNDS` forward + backward steps after
`WARMUP_ROUNDS`, gradients dropped after each. Memory is measured as the CLI does, in
a fresh process per case (bench/measure.py), and stored in `benchmark.extra_info`
(`overhead_mib`, `peak_mib`), so saved runs and comparisons carry it.

Two plain tests check the harness itself (skipped by --benchmark-only): every provider
computes the loss it claims, and the memory probe sees a known allocation.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from distil_kernels import SparseTarget, linear_cross_entropy

from . import loss
from .loss_providers import DTYPES, PROVIDERS, WORKLOAD_FACTORY, LossCase, make_inputs, make_workload, workload_spec
from .measure import MIB, OthersCpu, Workload, cpu_memory_unsupported, measure_in_subprocess

pytestmark = pytest.mark.skipif(cpu_memory_unsupported() is not None, reason=str(cpu_memory_unsupported()))

ROUNDS = 2
WARMUP_ROUNDS = 1
# torch's native chunking sizes a chunk as next_pow2(ceil(N / ceil(V / d))) rows, halved
# for fp32: at N=256 d=896 V=151936 that is 1-2 rows, so a step is 128-256 matrix-vector
# passes over a 545 MB head: 25 s (fp32) and 90-140 s (bf16) per step on 2 cores, and a
# case here runs 5 steps.
SLOW_CASES = {("native", (256, 896, 151936))}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "loss_case" not in metafunc.fixturenames:
        return
    shapes = loss.QUICK_SHAPES if metafunc.config.getoption("--bench-quick") else loss.FULL_SHAPES
    params = []
    for provider, case in loss.suite_cases("cpu", shapes, list(DTYPES), loss.ordered_providers()):
        shape = (case.rows, case.dim, case.vocab)
        marks = [pytest.mark.slow] if (provider.name, shape) in SLOW_CASES else []
        case_id = f"{provider.name}-{case.dtype}-N{case.rows}-d{case.dim}-V{case.vocab}"
        params.append(pytest.param(provider, case, id=case_id, marks=marks))
    metafunc.parametrize(("provider", "loss_case"), params)


def test_loss(benchmark, memory_record, request, provider, loss_case: LossCase) -> None:
    unavailable = provider.unavailable(loss_case.device)
    if unavailable is not None:
        pytest.skip(unavailable)
    spec = workload_spec(provider, loss_case)
    benchmark.group = f"{provider.target} {loss_case.dtype} {loss_case.shape_label}"
    benchmark.extra_info.update(provider=provider.name, target=provider.target, dtype=loss_case.dtype,
                                N=loss_case.rows, d=loss_case.dim, V=loss_case.vocab, k=loss_case.k)
    workload = make_workload(spec)
    if benchmark.disabled:  # --benchmark-disable: pedantic runs the step once, nothing is measured
        benchmark.pedantic(workload.step, teardown=workload.reset)
        return
    memory = measure_in_subprocess(WORKLOAD_FACTORY, spec, repeats=0)
    with OthersCpu() as others:
        benchmark.pedantic(workload.step, teardown=workload.reset, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS)
    # Times taken while other processes shared the cores are slow; saved runs say so.
    benchmark.extra_info.update(peak_mib=round(memory.peak_mib, 2), overhead_mib=round(memory.overhead_mib, 2),
                                others_cpu_pct=round(others.pct, 1))
    memory_record(request.node.callspec.id, memory.peak_mib, memory.overhead_mib, others.pct)


# --------------------------------------------------------------------------------------
# The harness itself
# --------------------------------------------------------------------------------------


def _inputs_and_float64_leaves(case: LossCase, target: str):
    """`case`'s inputs and float64 leaf copies of their x and weight."""
    inputs = make_inputs(case, target)
    x = inputs.x.detach().double().requires_grad_()
    w = inputs.weight.detach().double().requires_grad_()
    return inputs, x, w


@pytest.mark.parametrize("name", [p.name for p in loss.ordered_providers()])
def test_provider_computes_its_loss(name: str) -> None:
    """fp32 loss and gradients of each provider match the float64 definition it stands for."""
    provider = PROVIDERS[name]
    unavailable = provider.unavailable("cpu")
    if unavailable is not None:
        pytest.skip(unavailable)
    case = LossCase(64, 48, 700, 1 if provider.target == "hard" else 16, "fp32", seed=3)
    inputs, x64, w64 = _inputs_and_float64_leaves(case, provider.target)
    if name == "dense-soft":
        # Its target spreads the tail mass evenly over the V - k ids outside the top-k.
        ids, probs = inputs.sparse.ids, inputs.sparse.probs.double()
        log_q = torch.log_softmax(x64 @ w64.T, dim=1)
        log_q_ids = log_q.gather(1, ids)
        tail = (1.0 - probs.sum(dim=1)) / (case.vocab - case.k)
        want = (-(probs * log_q_ids).sum(dim=1) - tail * (log_q.sum(dim=1) - log_q_ids.sum(dim=1))).mean()
    else:
        target = inputs.labels if provider.target == "hard" else SparseTarget(inputs.sparse.ids,
                                                                              inputs.sparse.probs.double())
        want = linear_cross_entropy(x64, w64, target, backend="torch")
    want.backward()
    # A warning here would mean the provider fell back to another path than the one named.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = provider.loss(inputs)
        got.backward()
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(inputs.x.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(inputs.weight.grad.double(), w64.grad, rtol=1e-4, atol=1e-6)


BALLAST_MIB = 48
GRADIENT_MIB = 16


def ballast_workload(spec: dict) -> Workload:
    """A step that keeps GRADIENT_MIB (its "gradients") and briefly holds BALLAST_MIB more."""
    kept = []

    def step() -> None:
        kept.append(torch.ones(int(GRADIENT_MIB * MIB) // 4))
        scratch = torch.ones(int(BALLAST_MIB * MIB) // 4)
        kept[-1].add_(scratch[: kept[-1].numel()])

    return Workload(step, kept.clear, int(GRADIENT_MIB * MIB))


def test_memory_probe_sees_a_known_allocation() -> None:
    m = measure_in_subprocess(f"{__name__}:ballast_workload", {}, repeats=2)
    assert m.repeats == 2 and all(t > 0 for t in m.times_ms)
    assert math.isclose(m.peak_mib, BALLAST_MIB + GRADIENT_MIB, abs_tol=2.0), m
    assert math.isclose(m.overhead_mib, BALLAST_MIB, abs_tol=2.0), m
