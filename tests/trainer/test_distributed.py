"""The trainer under data parallelism, with gloo on the CPU and 2 processes.

One test spawns two ranks that build `Trainer`s as torchrun would (the environment
variables), train a few steps, and compare their weights: DDP keeps them equal, the
prompts are split between the ranks, rank 0 alone writes the metrics. Another runs the
CLI itself under torchrun.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distil.train import TrainConfig, Trainer, read_metrics

SMALL = dict(steps=2, warmup_steps=2, warmup_batch=4, prompts_per_step=5, rollouts_per_prompt=2, eval_every=1,
             eval_prompts=4, eval_samples=1, checkpoint_every=1, student_hidden=32, student_layers=1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(out=out, **SMALL), progress=False)
    assert trainer.dist.world == 2 and trainer.dist.rank == rank
    assert trainer.dist.share(5) == ((0, 3) if rank == 0 else (3, 5))
    summary = trainer.run()
    assert (summary != {}) == (rank == 0)
    flat = torch.cat([p.detach().flatten() for p in trainer.lm.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    assert torch.equal(gathered[0], gathered[1]), "the ranks' weights diverged"
    _close(trainer)


def _close(trainer: Trainer) -> None:
    """Trainer.close, which must free DDP's wrapper (and its hold on the process group)
    before the group is torn down."""
    wrapper = weakref.ref(trainer.states)
    assert isinstance(wrapper(), torch.nn.parallel.DistributedDataParallel)
    trainer.close()
    assert wrapper() is None, "DDP's wrapper outlived the process group's teardown"
    assert not dist.is_initialized()


def test_two_ranks_keep_equal_weights_and_rank_0_writes(tmp_path):
    out = tmp_path / "run"
    mp.start_processes(_rank, args=(_free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[-1]["rollouts"] == 2 * 5 * 2  # both ranks' rollouts: 5 prompts x 2 per step
    assert all("eval_pass@1" in r for r in rows)
    assert json.loads((out / "summary.json").read_text())["rollouts"] == 20
    assert (out / "checkpoint" / "state.json").exists()


def test_torchrun_cli(tmp_path):
    out = tmp_path / "cli"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-port", str(_free_port()),
         "-m", "distil", "train", *flags, f"--out={out}", "--no-progress"],
        capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "ranks=2" in result.stdout
    assert result.stdout.count("result: addition distil pass@1") == 1  # rank 0 alone reports
    assert read_metrics(out / "metrics.jsonl")[-1]["rollouts"] == 20


def _rank_gradient(rank: int, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = Trainer(TrainConfig(out=out, **{**SMALL, "warmup_steps": 0}), progress=False)
    trainer.train_step()
    if rank == 0:
        torch.save([p.grad for p in trainer.lm.model.parameters()], Path(out) / "grads.pt")
    _close(trainer)


def test_two_ranks_take_the_gradient_of_one_process(tmp_path):
    """Rank 0 takes 3 of the step's 5 prompts, rank 1 takes 2, with other numbers of
    tokens: DDP's average of the ranks' gradients must be the whole step's, as one process
    computes it (the ranks' token means weighed by their tokens, not equally: that was up
    to 5x off in some entries)."""
    mp.start_processes(_rank_gradient, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    two_ranks = torch.load(tmp_path / "grads.pt", weights_only=True)
    one = Trainer(TrainConfig(out=str(tmp_path / "one"), **{**SMALL, "warmup_steps": 0}), progress=False)
    one.train_step()
    for got, want in zip(two_ranks, [p.grad for p in one.lm.model.parameters()]):
        # fp32 sums in another order and over other row blocks (measured: 4.7e-7 of the
        # largest entry at most).
        torch.testing.assert_close(got, want, rtol=0, atol=4e-6 * want.abs().max().item())


def test_more_ranks_than_prompts_is_a_clear_error(monkeypatch):
    monkeypatch.setattr("distil.distributed.DistContext.from_env",
                        classmethod(lambda cls, device: cls(rank=0, world=8)))
    with pytest.raises(ValueError, match="prompts_per_step .* must be at least the number of ranks"):
        Trainer(TrainConfig(prompts_per_step=4, out="unused"), progress=False)
