"""Test helpers that watch kernel launches: a Triton kernel stand-in that records how each
launch was made, and a recorder of the rows the threshold top-k redoes (shared by the loss
and sampling tests)."""

from __future__ import annotations


class RecordingKernel:
    """Wraps `kernel`: each launch appends its `argument` (by default USE_TMA: whether it
    took TMA descriptors) to `launched`, then runs the kernel."""

    def __init__(self, kernel, launched: list, argument: str = "USE_TMA"):
        self.kernel, self.launched, self.argument = kernel, launched, argument

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(kwargs[self.argument])
            return self.kernel[grid](*args, **kwargs)
        return launch


def record_merged_rows(monkeypatch) -> list[int]:
    """The rows the threshold top-k sends to its merge kernel, one entry per call: that
    kernel's exact answer would hide a threshold pass that lost emitted entries."""
    from distil_kernels.sampling.triton import topk as topk_module

    redone = []
    merged = topk_module.merged_topk

    def record(x, *args, **kwargs):
        redone.append(x.shape[0])
        return merged(x, *args, **kwargs)

    monkeypatch.setattr(topk_module, "merged_topk", record)
    return redone
