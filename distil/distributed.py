"""Data parallelism for the trainer: `torchrun --nproc-per-node N -m distil train ...`.

Under torchrun (WORLD_SIZE > 1 in the environment) every rank builds the same student
(DDP broadcasts rank 0's weights at wrap time), takes a contiguous share of each step's
prompts (so its rollouts, verifier calls and expert queries are its own: the row seeds
are offset by the share's first row, and the rollouts are those a single process would
draw for the same rows), and computes the objective on its share, scaled by the share's
fraction of the step's tokens so that DDP's average of the gradients is the gradient of
the whole step. Metrics are averaged (rollouts summed) over ranks; rank 0 alone evaluates,
writes metrics, checkpoints, the summary and the curves, and shows progress. gloo on
the CPU, NCCL on CUDA (one GPU per rank: cuda:LOCAL_RANK).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "DistContext":
        """The torchrun context (initialising the default group), or a single process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
            dist.init_process_group(backend)
        return cls(rank, world, local_rank)

    def device(self, device_type: str) -> torch.device:
        return torch.device("cuda", self.local_rank) if device_type == "cuda" else torch.device("cpu")

    def share(self, count: int) -> tuple[int, int]:
        """[start, stop) of this rank's contiguous share of `count` items (the first ranks take one more)."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (self.rank < extra)

    def average(self, values: dict[str, float], device: torch.device) -> dict[str, float]:
        """Every value averaged over ranks (NaN stays NaN)."""
        if not self.enabled or not values:
            return values
        names = sorted(values)
        t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return {n: float(v) / self.world for n, v in zip(names, t.tolist())}

    def total(self, value: int, device: torch.device) -> int:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t)
        return int(t.item())

    def all_ranks(self, flag: bool, device: torch.device) -> bool:
        """True when `flag` holds on every rank: ranks must agree before a backward DDP syncs."""
        if not self.enabled:
            return flag
        t = torch.tensor([int(flag)], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            # Every rank past its last collective before any tears its connections down:
            # without it a rank aborted in gloo's teardown ("terminate called without an
            # active exception") in 6 of 60 two-rank CPU runs; with it, 0 of 40.
            dist.barrier()
            # Rank 0 hosts the rendezvous store (outside torchrun's agent): once its
            # process exits, a rank still tearing its group down loses the store under
            # it, and rank 1 aborted so once in a full test run. So rank 0 leaves last.
            store = dist.distributed_c10d._get_default_store()
            dist.destroy_process_group()
            if self.rank > 0:
                store.set(f"closed/{self.rank}", "1")
            else:
                store.wait([f"closed/{r}" for r in range(1, self.world)])


class StatesModule(nn.Module):
    """The decoder pass of a training step as a module, so DDP sees the forward of every
    step (its gradient hooks then cover the head too, which the loss uses outside it)."""

    def __init__(self, lm) -> None:
        super().__init__()
        self.model = lm.model
        self._lm = [lm]  # not a submodule: `model` already holds every parameter

    def forward(self, prompt_ids, prompt_mask, actions, mask):
        from .rollout import visited_states

        return visited_states(self._lm[0], prompt_ids, prompt_mask, actions, mask)


def wrap_states(lm, context: DistContext) -> nn.Module:
    """The states module, DDP-wrapped when there is more than one rank."""
    module = StatesModule(lm)
    if not context.enabled:
        return module
    device_ids = [context.local_rank] if lm.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=device_ids, broadcast_buffers=False)
