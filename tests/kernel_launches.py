"""A Triton kernel stand-in that records how each launch was made (shared by the loss and sampling tests)."""

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
