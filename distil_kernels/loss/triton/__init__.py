"""The `triton` backend of the loss core: fused vocabulary-tiled kernels.

One file per kernel (`lse_forward`, `indexed_dot`, `backward`), their shared device
functions in `tiles`, all launch configurations in `configs`, and the autograd
Function in `function`. Importing this package needs `triton`; the rest of
distil_kernels does not.
"""

from .function import TritonStats, triton_gradients, triton_linear_cross_entropy, triton_stats

__all__ = ["TritonStats", "triton_gradients", "triton_linear_cross_entropy", "triton_stats"]
