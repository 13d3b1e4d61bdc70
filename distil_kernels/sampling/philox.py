"""Philox4x32-10 in PyTorch integer ops: the counter-based stream the samplers share.

A counter-based generator maps (key, counter) to random bits with no state, so a
draw keyed by (seed, row, vocabulary index) is the same whatever the batch
composition, row order or tiling, and a Triton kernel calling `tl.philox` with the
same key and counter produces the same bits (the round function and key schedule
below are Triton's and Random123's). Values are uint32 held in int64 tensors: a
32x32-bit product fits 64 bits, and where it wraps the signed int64 the low 64 bits
are still exact, so masking recovers both halves.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    product = b * a
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor | int, k1: Tensor | int,
               rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uint32 words (as int64) from a 128-bit counter and a 64-bit key (uint32 words)."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64, device=c0.device) & _MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=c0.device) & _MASK32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def seed_key(seed: Tensor | int) -> tuple[Tensor, Tensor]:
    """The (k0, k1) words of a 64-bit seed, low word first, as `tl.philox` splits it."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    return seed & _MASK32, (seed >> 32) & _MASK32
