"""How the sampling kernels split the vocabulary across programs.

A program takes one block of rows through one contiguous run of vocabulary tiles (a
split). Several splits per row block fill the GPU when there are few rows, without
atomics: each split writes its own partials and the host merges them in a fixed order
(`loss.triton.lse_forward.merge_lse`), so results do not depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import triton

from .configs import target_programs


@dataclass(frozen=True)
class SplitPlan:
    num_m_blocks: int
    num_tiles: int
    tiles_per_split: int
    num_splits: int


def plan_splits(rows: int, vocab: int, block_m: int, block_n: int, other_programs: int = 1,
                kind: str = "topk") -> SplitPlan:
    """Splits so that row blocks x splits x `other_programs` cover `kind`'s target program count."""
    num_m_blocks = max(triton.cdiv(rows, block_m), 1)
    num_tiles = triton.cdiv(vocab, block_n)
    wanted = max(1, min(num_tiles, target_programs(kind) // (num_m_blocks * other_programs)))
    tiles_per_split = triton.cdiv(num_tiles, wanted)
    num_splits = triton.cdiv(num_tiles, tiles_per_split)  # no empty split
    return SplitPlan(num_m_blocks, num_tiles, tiles_per_split, num_splits)
