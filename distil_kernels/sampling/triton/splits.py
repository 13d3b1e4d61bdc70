"""How the sampling kernels split the vocabulary across programs.

A program takes one block of rows through one contiguous run of vocabulary tiles (a
split). Several splits per row block fill the GPU when there are few rows, without
atomics: each split writes its own partials and the host merges them in a fixed order
(`loss.triton.lse_forward.merge_lse`), so results do not depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton
import triton.language as tl

from .configs import target_programs


@dataclass(frozen=True)
class SplitPlan:
    num_m_blocks: int
    num_tiles: int  # work units (tiles, or passes of several tiles) of the vocabulary
    num_splits: int
    # Each split takes tiles_per_split units, the first `longer_splits` one more (`split_range`).
    tiles_per_split: int
    longer_splits: int

    @property
    def most_tiles(self) -> int:
        """Units of the longest split."""
        return self.tiles_per_split + (self.longer_splits > 0)


def plan_splits(rows: int, vocab: int, block_m: int, block_n: int, other_programs: int = 1,
                kind: str = "topk") -> SplitPlan:
    """Splits so that row blocks x splits x `other_programs` cover `kind`'s target program count.

    The units are dealt out evenly, the longer splits first (programs start in that
    order): the sampler's 1188 passes at B=64 on Qwen2.5-7B's head over 264 splits are
    132 splits of 5 then 132 of 4, so that an H100's 132 SMs each take one of either (9
    passes an SM). Splits of ceil(1188 / 264) = 5 would be 238 programs: a second wave of
    106 and 10 passes on most SMs.
    """
    num_m_blocks = max(triton.cdiv(rows, block_m), 1)
    num_tiles = triton.cdiv(vocab, block_n)
    num_splits = max(1, min(num_tiles, target_programs(kind) // (num_m_blocks * other_programs)))
    tiles_per_split, longer_splits = divmod(num_tiles, num_splits)
    return SplitPlan(num_m_blocks, num_tiles, num_splits, tiles_per_split, longer_splits)


@triton.jit
def split_range(split, tiles_per_split, longer_splits):
    """[first, last) units of split `split` (`SplitPlan`)."""
    first = split * tiles_per_split + tl.minimum(split, longer_splits)
    return first, first + tiles_per_split + (split < longer_splits).to(tl.int32)


@triton.jit
def merged_lse(part_max, part_sum):
    """`merge_lse` of one row's split partials [BLOCK_S] (absent splits: -inf and 0)."""
    top = tl.max(part_max, axis=0)
    shift = tl.where(top == float("-inf"), 0.0, top)
    return shift + tl.log(tl.sum(part_sum * tl.exp(part_max - shift), axis=0))
