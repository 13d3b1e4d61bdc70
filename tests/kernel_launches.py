"""A Triton kernel stand-in that records how each launch was made (shared by the loss and sampling tests)."""

from __future__ import annotations


class RecordingKernel:
    """Wraps `kernel`: each launch appends its USE_TMA argument (whether it took TMA
    descriptors) to `launched`, then runs the kernel."""

    def __init__(self, kernel, launched: list):
        self.kernel, self.launched = kernel, launched

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launched.append(kwargs["USE_TMA"])
            return self.kernel[grid](*args, **kwargs)
        return launch
