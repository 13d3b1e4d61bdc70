"""Allocation tracking for the memory tests of the loss and sampling cores.

`AllocationTracker` is a TorchDispatchMode: it sees the output of every aten op run
while it is active, forward and backward (autograd runs the backward ops of a
`.backward()` called inside the mode under the mode too; tests/loss/test_memory.py
checks that), and counts a storage as allocated when an op returns one that none of the
op's inputs owned. A storage leaves the live total when its Python object dies, which
with storage PyObject preservation is when the storage itself is freed. Inputs are made
before the mode is entered, so peaks are increments over the inputs. Temporaries inside
one aten kernel are not op outputs and are not seen (a resident-memory probe, as the
bench's, sees those).
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

MiB = 1 << 20


@dataclass(frozen=True)
class Allocation:
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    op: str
    phase: str


class AllocationTracker(TorchDispatchMode):
    """Live bytes, their peak and every allocation of the ops run under the mode."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "forward"
        self.live_bytes = 0
        self.peak_bytes = 0
        self.allocations: list[Allocation] = []
        self.ops: dict[str, set[str]] = {}
        # data_ptr -> (token, nbytes, weak storage); the token tells a finalizer whether
        # the entry is still its own after the allocator reused the address.
        self._live: dict[int, tuple[int, int, weakref.ref]] = {}
        self._tokens = itertools.count()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops.setdefault(self.phase, set()).add(str(func.overloadpacket))
        owned = {_storage_ptr(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._record(t, owned, str(func))
        return out

    def _record(self, t: torch.Tensor, owned: set[int], op: str) -> None:
        storage = t.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in owned:
            return  # a view, an in-place or out= result: nothing new
        entry = self._live.get(ptr)
        if entry is not None:
            if entry[2]() is storage:
                return
            self._free(ptr, entry[0])  # the old storage died; its finalizer has not run yet
        token = next(self._tokens)
        self._live[ptr] = (token, nbytes, weakref.ref(storage))
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.allocations.append(Allocation(nbytes, tuple(t.shape), t.dtype, op, self.phase))
        weakref.finalize(storage, self._free, ptr, token)

    def _free(self, ptr: int, token: int) -> None:
        entry = self._live.get(ptr)
        if entry is not None and entry[0] == token:
            del self._live[ptr]
            self.live_bytes -= entry[1]

    def largest(self, exclude_shapes: set[tuple[int, ...]] = frozenset()) -> Allocation | None:
        """The largest allocation whose shape is not one of `exclude_shapes` (gradients)."""
        kept = [a for a in self.allocations if a.shape not in exclude_shapes]
        return max(kept, key=lambda a: a.nbytes, default=None)


def _storage_ptr(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage
        return None


def track(run_forward, backward_from=lambda loss: loss.sum()) -> AllocationTracker:
    """Forward and backward of `run_forward()` under a fresh tracker."""
    tracker = AllocationTracker()
    with tracker:
        loss = run_forward()
        tracker.phase = "backward"
        backward_from(loss).backward()
        del loss
    return tracker
