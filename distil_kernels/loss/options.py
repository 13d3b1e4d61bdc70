"""Options of the loss core, carried as one frozen dataclass.

Every backend receives the same `LossOptions`, so adding an option never grows a
positional argument list, and the autograd Functions keep `backward` short.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

REDUCTIONS = ("mean", "sum", "none")
TAILS = ("bucket", "renormalize", "ignore")

# A bucket tail is `-(1 - m) log(1 - sum_j q_j)`; the clamp keeps it finite when the
# ids hold (numerically) all of the student's mass. DESIGN.md fixes the value.
BUCKET_CLAMP = 1e-6
# Expert mass may exceed one by rounding (top-k probabilities summed in fp32).
MASS_SLACK = 1e-4
# "auto" filter threshold for bf16: below 2**-12 a softmax value is under half a bf16
# ulp of any O(1) gradient entry it would be added to.
AUTO_FILTER_EPS = 2.0**-12


@dataclass(frozen=True)
class LossOptions:
    """Non-tensor options of `linear_cross_entropy` (see DESIGN.md, "Loss core")."""

    ignore_index: int = -100
    reduction: str = "mean"
    label_smoothing: float = 0.0
    temperature: float = 1.0
    softcap: float | None = None
    z_loss: float = 0.0
    tail: str = "bucket"
    filter_eps: float | None = None
    workspace_bytes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ignore_index, bool) or not isinstance(self.ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {type(self.ignore_index).__name__}")
        if not -(2**63) <= self.ignore_index < 2**63:
            # Compared with int64 ids: a value beyond int64 overflows the comparison.
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        if self.tail not in TAILS:
            raise ValueError(f"tail must be one of {TAILS}, got {self.tail!r}")
        _check_real("label_smoothing", self.label_smoothing)
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1], got {self.label_smoothing}")
        _check_real("temperature", self.temperature)
        if not self.temperature > 0.0:
            raise ValueError(
                f"temperature must be > 0 for a loss (0 is greedy decoding, not a distribution), "
                f"got {self.temperature}"
            )
        if self.softcap is not None:
            _check_real("softcap", self.softcap)
            if not self.softcap > 0.0:
                raise ValueError(f"softcap must be None or > 0, got {self.softcap}")
        _check_real("z_loss", self.z_loss)
        if not self.z_loss >= 0.0:
            raise ValueError(f"z_loss must be >= 0, got {self.z_loss}")
        if self.filter_eps is not None and self.filter_eps != "auto":
            _check_real("filter_eps", self.filter_eps)
            if not 0.0 < self.filter_eps < 1.0:
                raise ValueError(f"filter_eps must be None, 'auto' or in (0, 1), got {self.filter_eps}")
        if self.workspace_bytes is not None:
            if isinstance(self.workspace_bytes, bool) or not isinstance(self.workspace_bytes, int):
                raise TypeError(
                    f"workspace_bytes must be an int or None, got {type(self.workspace_bytes).__name__}"
                )
            if self.workspace_bytes < 4096:
                raise ValueError(f"workspace_bytes must be at least 4096, got {self.workspace_bytes}")

    def resolved_filter_eps(self, dtype: torch.dtype) -> float | None:
        """The numeric filter threshold for inputs of `dtype` (None: exact backward)."""
        if self.filter_eps == "auto":
            return AUTO_FILTER_EPS if dtype == torch.bfloat16 else None
        return self.filter_eps


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    # A comparison, not math.isfinite: torch.compile(dynamic=True) passes floats as
    # symbolic values, which a comparison guards on and math.isfinite cannot trace.
    if not abs(value) < math.inf:
        raise ValueError(f"{name} must be finite, got {value}")
