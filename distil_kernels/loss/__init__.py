"""The loss core: `linear_cross_entropy` and `distil_loss` on every backend."""

from .distil_loss import DistilStats, distil_loss
from .linear_cross_entropy import LinearCrossEntropy, linear_cross_entropy
from .options import LossOptions
from .reference import LossStats
from .targets import SparseTarget

__all__ = [
    "DistilStats", "LinearCrossEntropy", "LossOptions", "LossStats", "SparseTarget",
    "distil_loss", "linear_cross_entropy",
]
