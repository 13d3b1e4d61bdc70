"""The sampling core: top-k and sampling straight from hidden states, without [N, V] logits."""

from .sample import Sample, linear_sample, sample_from_logits
from .topk import TopK, linear_topk

__all__ = ["Sample", "TopK", "linear_sample", "linear_topk", "sample_from_logits"]
