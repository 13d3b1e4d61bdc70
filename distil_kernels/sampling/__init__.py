"""The sampling core: top-k and sampling straight from hidden states, without [N, V] logits."""

from .topk import TopK, linear_topk

__all__ = ["TopK", "linear_topk"]
