"""The `triton` backend of the sampling core: vocabulary-tiled top-k and Gumbel-max kernels.

One file per op (`topk`, `sample`, and `truncation`: top_p / min_p sampling over
logits that exist), the split planning and partial merges they
share in `splits`, their passes of several tiles over one x slice in `wide_tiles`, all
launch configurations in `configs`, ahead-of-time compile specs in `aot`. The logits
tile's transform is the loss core's (`loss/triton/tiles.py`). Importing
this package needs `triton`; the rest of distil_kernels does not.
"""

from .sample import triton_sample
from .topk import triton_topk

__all__ = ["triton_sample", "triton_topk"]
