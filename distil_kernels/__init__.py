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
from .integrations import patch_model
from .sampling import Sample, TopK, linear_sample, linear_topk, sample_from_logits

__version__ = "0.1.0"

__all__ = [
    "DistilStats", "LinearCrossEntropy", "LossOptions", "LossStats", "Sample", "SparseTarget", "TopK",
    "distil_loss", "linear_cross_entropy", "linear_sample", "linear_topk", "patch_model", "sample_from_logits",
]
