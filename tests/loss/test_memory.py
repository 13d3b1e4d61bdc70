"""The chunked backend never allocates O(N*V): every allocation is watched
(`AllocationTracker`, tests/memory_tracking.py).

The same tracker run on the `torch` backend, which materialises the logits, must see
at least N*V*4 bytes: that is what proves it would catch an O(N*V) allocation.
"""

from __future__ import annotations

import pytest
import torch

from bench.loss_providers import WORKLOAD_FACTORY
from bench.measure import cpu_memory_unsupported, measure_in_subprocess
from distil_kernels import SparseTarget, distil_loss, linear_cross_entropy
from distil_kernels.loss.chunked import _CPU_MIN_WORKSPACE, plan_chunks
from distil_kernels.loss.options import LossOptions
from memory_tracking import MiB, AllocationTracker, track

N, D, V = 4096, 64, 8192
LOGITS_BYTES = N * V * 4  # one fp32 [N, V] tensor: 128 MiB
WORKSPACE_BYTES = 1 << 20


# --------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------


def head(seed: int = 0, batch_shape: tuple[int, ...] = (N,)):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*batch_shape, D, generator=gen).requires_grad_()
    w = (torch.randn(V, D, generator=gen) / D**0.5).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_()
    return x, w, b, gen


def expert_target(gen, batch_shape: tuple[int, ...], k: int) -> SparseTarget:
    """k unique ids per row with probs summing to at most 1; a tenth of rows ignored."""
    rows = int(torch.Size(batch_shape).numel())
    scores = torch.rand(rows, V, generator=gen)  # made outside the tracker: an input
    ids = scores.topk(k, dim=1).indices
    del scores
    probs = torch.softmax(torch.randn(rows, k, generator=gen), dim=1) * 0.9
    ids[torch.rand(rows, generator=gen) < 0.1] = -100
    return SparseTarget(ids.reshape(*batch_shape, k), probs.reshape(*batch_shape, k))


def gradient_shapes(*leaves: torch.Tensor) -> set[tuple[int, ...]]:
    return {tuple(t.shape) for t in leaves}


def gradient_bytes(*leaves: torch.Tensor) -> int:
    return sum(t.numel() * 4 for t in leaves)  # fp32 buffers, one per leaf


def clear_grads(*leaves: torch.Tensor) -> None:
    for t in leaves:
        t.grad = None


def assert_bounded(tracker: AllocationTracker, leaves: tuple[torch.Tensor, ...], slots: int) -> None:
    """The chunked contract: one workspace-bounded tile and O(N * slots) besides the gradients."""
    largest = tracker.largest(exclude_shapes=gradient_shapes(*leaves))
    # Besides the workspace, the only [N, slots] tables are the target's (int64 ids).
    bound = max(WORKSPACE_BYTES, N * slots * 8)
    assert largest is not None and largest.nbytes <= bound, (largest, bound)
    extra = tracker.peak_bytes - gradient_bytes(*leaves)
    assert extra < LOGITS_BYTES // 8, f"peak {tracker.peak_bytes / MiB:.1f} MiB is O(N*V)"
    # Tighter: a couple of workspaces plus a few dozen bytes per (row, slot).
    assert extra <= 2 * WORKSPACE_BYTES + N * (slots + 1) * 64, f"extra {extra / MiB:.2f} MiB"


def assert_materialises_logits(tracker: AllocationTracker) -> None:
    """The torch backend holds [N, V] fp32 logits: the tracker must see them."""
    assert tracker.peak_bytes >= LOGITS_BYTES, tracker.peak_bytes / MiB
    assert tracker.largest().nbytes >= LOGITS_BYTES


# --------------------------------------------------------------------------------------
# The tracker itself
# --------------------------------------------------------------------------------------


def test_tracker_sees_backward_ops_and_frees_storages():
    a = torch.randn(256, 32).requires_grad_()
    bt = torch.randn(512, 32).requires_grad_()
    tracker = AllocationTracker()
    with tracker:
        product = a @ bt.T  # [256, 512] fp32: 512 KiB
        view = product[1:]
        tracker.phase = "backward"
        product.square().sum().backward()
        assert tracker.live_bytes >= 256 * 512 * 4
        del product
        assert tracker.live_bytes >= 256 * 512 * 4  # the view keeps the storage alive
        del view
    forward = [x for x in tracker.allocations if x.phase == "forward"]
    assert any(x.shape == (256, 512) and x.nbytes == 256 * 512 * 4 for x in forward)
    # Autograd ran the backward GEMMs under the mode, and their outputs were counted.
    assert "aten.mm" in tracker.ops["backward"]
    backward = [x for x in tracker.allocations if x.phase == "backward"]
    assert any(x.shape == (256, 32) for x in backward) and any(x.shape == (512, 32) for x in backward)
    assert tracker.peak_bytes >= 2 * 256 * 512 * 4  # product and d(product) at once
    # Only the two gradients are still alive once everything else is dropped.
    assert tracker.live_bytes == (256 + 512) * 32 * 4


def test_tracker_sees_the_chunked_backward():
    """The recomputing backward of reduction="none" runs its GEMMs under the mode."""
    x, w, b, gen = head(batch_shape=(64,))
    y = torch.randint(0, V, (64,), generator=gen)
    tracker = track(lambda: linear_cross_entropy(x, w, y, bias=b, reduction="none", backend="chunked",
                                                 workspace_bytes=WORKSPACE_BYTES))
    assert {"aten.mm", "aten.addmm_"} <= tracker.ops.get("backward", set())
    assert any(a.phase == "backward" and a.shape == (V, D) for a in tracker.allocations)


# --------------------------------------------------------------------------------------
# linear_cross_entropy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("k", [None, 32], ids=["hard", "sparse32"])
def test_linear_cross_entropy_never_allocates_tokens_x_vocab(k, reduction):
    x, w, b, gen = head()
    if k is None:
        target = torch.randint(0, V, (N,), generator=gen)
        target[torch.rand(N, generator=gen) < 0.1] = -100
    else:
        target = expert_target(gen, (N,), k)
    slots = 1 if k is None else k

    def run(backend):
        return lambda: linear_cross_entropy(x, w, target, bias=b, reduction=reduction, backend=backend,
                                            workspace_bytes=WORKSPACE_BYTES)

    chunked = track(run("chunked"))
    assert chunked.ops.get("backward"), "no backward op was seen"
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert_bounded(chunked, (x, w, b), slots)

    clear_grads(x, w, b)
    assert_materialises_logits(track(run("torch")))


# --------------------------------------------------------------------------------------
# distil_loss
# --------------------------------------------------------------------------------------


def test_distil_loss_never_allocates_tokens_x_vocab():
    batch, steps, k = 8, 512, 8
    x, w, b, gen = head(batch_shape=(batch, steps))
    expert = expert_target(gen, (batch, steps), k)
    actions = torch.randint(0, V, (batch, steps), generator=gen)
    prompt = torch.randint(16, 128, (batch, 1), generator=gen)
    mask = torch.arange(steps)[None, :] >= prompt  # response tokens after a prompt
    group = torch.arange(batch) // 2

    def run(backend):
        return lambda: distil_loss(x, w, expert, actions, mask, group=group, bias=b, backend=backend,
                                   workspace_bytes=WORKSPACE_BYTES)

    chunked = track(run("chunked"))
    assert x.grad is not None and w.grad is not None and b.grad is not None
    assert_bounded(chunked, (x, w, b), k + 1)  # the expert's slots and the action

    clear_grads(x, w, b)
    assert_materialises_logits(track(run("torch")))


# --------------------------------------------------------------------------------------
# The default workspace
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 17, 4096, 1 << 20])
def test_default_cpu_workspace_stays_below_64_mib(num_rows, dtype, softcap):
    """A 152k vocabulary (Qwen) with workspace_bytes=None: the tile buffers fit in 64 MiB."""
    vocab_size = 151936
    plan = plan_chunks(num_rows=num_rows, vocab_size=vocab_size, dtype=dtype, device=torch.device("cpu"),
                       options=LossOptions(softcap=softcap))
    assert 1 <= plan.rows <= num_rows and 1 <= plan.tile <= vocab_size
    # The workspace holds an fp32 tile, its low-precision twin for fp16/bf16 inputs and
    # tanh(u / c) with a softcap, each rows x tile elements.
    per_element = 4 + (dtype.itemsize if dtype != torch.float32 else 0) + (4 if softcap else 0)
    assert plan.rows * plan.tile * per_element <= 64 * MiB
    if num_rows >= 16:
        # Whole vocabulary rows, enough of them to keep CPU GEMMs efficient.
        assert plan.tile == vocab_size and plan.rows >= 16


# --------------------------------------------------------------------------------------
# Resident memory of a bf16 step (what the dispatch tracker cannot see)
# --------------------------------------------------------------------------------------


@pytest.mark.skipif(cpu_memory_unsupported() is not None, reason=str(cpu_memory_unsupported()))
@pytest.mark.parametrize("provider", ["chunked", "chunked-sparse"])
def test_bf16_step_holds_one_fp32_weight_accumulator(provider):
    """A bf16 step's resident peak beyond its gradients is d_weight's fp32 accumulator and
    the workspace, measured as `python -m bench loss` does (VmHWM of a fresh process).

    The tracker above sees the outputs of aten ops, not the temporaries inside one: a
    `torch.mul` of the fp32 accumulator into a bf16 `out` made a second fp32 [V, d]
    inside TensorIterator on the CPU (125 MiB here, for 62.5)."""
    rows, dim, vocab = 256, 512, 32000
    accumulator_mib = vocab * dim * 4 / MiB
    case = {"rows": rows, "dim": dim, "vocab": vocab, "k": 1 if provider == "chunked" else 32, "dtype": "bf16"}
    memory = measure_in_subprocess(WORKLOAD_FACTORY, {"provider": provider, "case": case}, repeats=0)
    # The probe sees the accumulator (so it would see a second one) ...
    assert memory.overhead_mib >= 0.9 * accumulator_mib, memory
    # ... and nothing beyond it but a CPU workspace's worth.
    assert memory.overhead_mib <= accumulator_mib + _CPU_MIN_WORKSPACE / MiB, memory
