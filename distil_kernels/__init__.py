"""distil-kernels: the loss and sampling core of DistIL without [tokens x vocab] logits."""

from .loss import (
    DistilStats,
    LinearCrossEntropy,
    LossOptions,
    LossStats,
    SparseTarget,
    distil_loss,
    linear_cross_entropy,
)

__version__ = "0.1.0"

__all__ = [
    "DistilStats", "LinearCrossEntropy", "LossOptions", "LossStats", "SparseTarget",
    "distil_loss", "linear_cross_entropy",
]
