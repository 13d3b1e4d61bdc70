"""Vocabulary parallelism with gloo on the CPU: 2 and 3 processes, uneven shards.

Each process holds a slice of the head's rows and calls the public ops with its
`process_group` and `vocab_start`; every rank must get the unsharded result (loss,
stats, d_input; top-k; sampled ids), and the gradient of its own rows. The unsharded
reference runs in every process on the full head.
"""

from __future__ import annotations

import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distil_kernels import SparseTarget, distil_loss, linear_cross_entropy, linear_sample, linear_topk
from distil_kernels.backends import major_minor

VOCAB, DIM, ROWS = 103, 12, 29
# Shards of 103 rows: uneven, and for three ranks not in rank order of vocab_start.
SHARDS = {2: [(0, 61), (61, 103)], 3: [(50, 103), (0, 20), (20, 50)]}

# Before torch 2.8 a gloo group's destructor joins its worker threads holding the GIL,
# while a worker may still need the GIL to free a collective's tensors: a deadlock at
# destroy_process_group (pytorch/pytorch#154976, seen here with torch 2.4).
GLOO_DESTRUCTOR_HOLDS_GIL = major_minor(torch.__version__) < (2, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _problem():
    gen = torch.Generator().manual_seed(71)
    x = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64) * 2.0
    w = torch.randn(VOCAB, DIM, generator=gen, dtype=torch.float64)
    w[64] = w[5]  # equal logits on two shards: ties go to the lower id
    b = torch.randn(VOCAB, generator=gen, dtype=torch.float64)
    b[64] = b[5]
    labels = torch.randint(0, VOCAB, (ROWS,), generator=gen)
    labels[3] = -100
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:6] for _ in range(ROWS)])
    probs = torch.rand(ROWS, 6, generator=gen, dtype=torch.float64)
    return x, w, b, labels, SparseTarget(ids, probs / probs.sum(1, keepdim=True) * 0.8)


def _check_loss(rank, start, end, group):
    x, w, b, labels, sparse = _problem()
    options = dict(label_smoothing=0.1, softcap=5.0, z_loss=1e-3, temperature=0.9)
    for target, extra in ((labels, {}), (sparse, dict(tail="bucket")), (sparse, dict(reduction="none"))):
        results = []
        for sharded in (False, True):
            xs = x.clone().requires_grad_()
            ws = (w[start:end] if sharded else w).clone().requires_grad_()
            bs = (b[start:end] if sharded else b).clone().requires_grad_()
            kwargs = dict(process_group=group, vocab_start=start) if sharded else {}
            loss, stats = linear_cross_entropy(xs, ws, target, bias=bs, backend="chunked", return_stats=True,
                                               **options, **extra, **kwargs)
            (loss * torch.linspace(0.5, 1.5, loss.numel(), dtype=loss.dtype).reshape(loss.shape)).sum().backward()
            results.append((loss.detach(), stats, xs.grad, ws.grad, bs.grad))
        (loss, stats, dx, dw, db), (loss_s, stats_s, dx_s, dw_s, db_s) = results
        torch.testing.assert_close(loss_s, loss, rtol=1e-12, atol=1e-12)
        for name in ("lse", "token_loss", "target_logprobs"):
            torch.testing.assert_close(getattr(stats_s, name), getattr(stats, name), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dx_s, dx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dw_s, dw[start:end], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(db_s, db[start:end], rtol=1e-10, atol=1e-12)


def _check_distil_loss(rank, start, end, group):
    x, w, b, _, _ = _problem()
    gen = torch.Generator().manual_seed(72)
    xb = x[:24].reshape(4, 6, DIM)
    ids = torch.stack([torch.randperm(VOCAB, generator=gen)[:5] for _ in range(24)]).reshape(4, 6, 5)
    probs = torch.rand(4, 6, 5, generator=gen, dtype=torch.float64)
    expert = SparseTarget(ids, probs / probs.sum(-1, keepdim=True) * 0.9)
    actions = torch.randint(0, VOCAB, (4, 6), generator=gen)
    mask = torch.rand(4, 6, generator=gen) > 0.2
    for backend in ("torch", "chunked"):
        results = []
        for sharded in (False, True):
            xs = xb.clone().requires_grad_()
            ws = (w[start:end] if sharded else w).clone().requires_grad_()
            kwargs = dict(process_group=group, vocab_start=start) if sharded else {}
            loss = distil_loss(xs, ws, expert, actions, mask, group=torch.tensor([0, 0, 1, 1]), discount=0.9,
                               future_credit=0.5, softcap=4.0, backend=backend, **kwargs)
            loss.backward()
            results.append((loss.detach(), xs.grad, ws.grad))
        (loss, dx, dw), (loss_s, dx_s, dw_s) = results
        torch.testing.assert_close(loss_s, loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dx_s, dx, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(dw_s, dw[start:end], rtol=1e-10, atol=1e-12)


def _check_topk_and_sample(rank, start, end, group):
    x, w, b, _, _ = _problem()
    x, w, b = x.float(), w.float(), b.float()
    shard = dict(process_group=group, vocab_start=start)
    # 45: more than the smallest shard holds; VOCAB: every row holds the equal logits 5 and
    # 64, which a shard's candidates merged as logprob + its own lse rounded apart in about
    # a third of the rows, so that 64 could come first.
    for k in (1, 7, 45, VOCAB):
        want = linear_topk(x, w, k, bias=b, softcap=6.0, temperature=0.8, backend="chunked")
        got = linear_topk(x, w[start:end], k, bias=b[start:end], softcap=6.0, temperature=0.8, backend="chunked",
                          **shard)
        assert torch.equal(got.ids, want.ids), k
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=2e-6)
        torch.testing.assert_close(got.lse, want.lse, rtol=0, atol=2e-6)
    # Rows whose two best ids are the equal logits 5 and 64, on different shards.
    tied = w[5] * torch.linspace(6.0, 12.0, 8)[:, None]
    for temperature in (1.0, 0.7):
        top = linear_topk(tied, w[start:end], 2, bias=b[start:end], temperature=temperature, backend="chunked",
                          **shard)
        assert (top.ids == torch.tensor([5, 64])).all(), top.ids
        assert torch.equal(top.logprobs[:, 0], top.logprobs[:, 1])
    for options in (dict(temperature=0.0), dict(temperature=0.0, top_k=3)):
        greedy = linear_sample(tied, w[start:end], bias=b[start:end], backend="chunked", **shard, **options)
        assert (greedy.ids == 5).all(), (options, greedy.ids)
    seeds = torch.arange(ROWS, dtype=torch.int64) * 7919 + 11
    for options in (dict(temperature=0.8, num_samples=3), dict(temperature=0.0), dict(top_p=0.5, min_p=0.02),
                    dict(top_k=10, temperature=1.3)):
        want = linear_sample(x, w, bias=b, softcap=6.0, seed=seeds, backend="chunked", **options)
        got = linear_sample(x, w[start:end], bias=b[start:end], softcap=6.0, seed=seeds, backend="chunked",
                            **shard, **options)
        assert torch.equal(got.ids, want.ids), options
        for name, a, e in zip(got._fields[1:], got[1:], want[1:]):
            torch.testing.assert_close(a, e, rtol=0, atol=2e-6, msg=lambda m, n=name, o=options: f"{o} {n}: {m}")
    # With the default 256 candidates every row of a 103-id vocabulary settles on them; with
    # 8, rows whose nucleus outgrows them take the exact dense fallback over logits gathered
    # from every shard (ShardedDenseLogits).
    from distil_kernels import parallel
    from distil_kernels.sampling import sample as sample_module

    sample_module.CANDIDATES = 8
    gathered = []
    gather = parallel.ShardedDenseLogits.__call__
    parallel.ShardedDenseLogits.__call__ = lambda self, *args: gathered.append(1) or gather(self, *args)
    options = dict(top_p=0.95, temperature=1.5, num_samples=2)
    want = linear_sample(x, w, bias=b, softcap=6.0, seed=seeds, backend="chunked", **options)
    got = linear_sample(x, w[start:end], bias=b[start:end], softcap=6.0, seed=seeds, backend="chunked", **shard,
                        **options)
    assert gathered, "no row took the dense fallback"
    assert torch.equal(got.ids, want.ids)
    for name, a, e in zip(got._fields[1:], got[1:], want[1:]):
        torch.testing.assert_close(a, e, rtol=0, atol=2e-6, msg=lambda m, n=name: f"fallback {n}: {m}")


CHECKS = {"loss": _check_loss, "distil_loss": _check_distil_loss, "topk_sample": _check_topk_and_sample}


def _worker(rank: int, world: int, port: int, check: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start, end = SHARDS[world][rank]
        CHECKS[check](rank, start, end, dist.group.WORLD)
        if GLOO_DESTRUCTOR_HOLDS_GIL:
            # A gloo worker thread frees a finished collective's tensors after the caller
            # has moved on, and a tensor Python has let go of needs the GIL to free. The
            # sleep hands it the GIL, before the destructor takes the GIL for good.
            time.sleep(0.2)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("check", list(CHECKS))
def test_every_rank_gets_the_unsharded_result(world, check):
    mp.start_processes(_worker, args=(world, _free_port(), check), nprocs=world, join=True, start_method="spawn")


def test_arguments_are_checked():
    x, w = torch.randn(3, 4), torch.randn(10, 4)
    with pytest.raises(ValueError, match="vocab_start=5 needs a process_group"):
        linear_cross_entropy(x, w, torch.tensor([1, 2, 3]), vocab_start=5)
    with pytest.raises(TypeError, match="vocab_start must be an int"):
        linear_topk(x, w, 2, vocab_start=1.5)
