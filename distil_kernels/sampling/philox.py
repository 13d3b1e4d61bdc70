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


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, k0: Tensor | int, k1: Tensor | int,
               rounds: int = ROUNDS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Four uint32 words (as int64) from a 128-bit counter and a 64-bit key (uint32 words).

    Counter words and keys broadcast against each other. The rounds run in place on
    contiguous buffers: on the CPU each int64 op is a memory pass, and a fresh tensor per
    op (or a broadcast operand) costs several times the arithmetic.
    """
    # Python ints among the words follow the tensors' device (a CPU scalar tensor would
    # not broadcast into CUDA ops with out=).
    device = next((c.device for c in (c0, c1, c2, c3, k0, k1) if isinstance(c, Tensor)), torch.device("cpu"))
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=device) for c in (c0, c1, c2, c3))
    k0 = torch.as_tensor(k0, dtype=torch.int64, device=device) & _MASK32
    k1 = torch.as_tensor(k1, dtype=torch.int64, device=device) & _MASK32
    shape = torch.broadcast_shapes(c0.shape, c1.shape, c2.shape, c3.shape, k0.shape, k1.shape)
    c0, c1, c2, c3 = ((c.expand(shape) & _MASK32).contiguous() for c in (c0, c1, c2, c3))
    product_a = torch.empty(shape, dtype=torch.int64, device=device)
    product_b = torch.empty(shape, dtype=torch.int64, device=device)
    for _ in range(rounds):
        torch.mul(c2, _ROUND_B, out=product_b)
        torch.mul(c0, _ROUND_A, out=product_a)
        # The high word of each product, xor the other counter word and the key. Only
        # c0 and c2 enter a multiplication, so they alone must be masked to 32 bits; c1
        # and c3 (the low words) may keep the product's high bits, which the xor into
        # the next c0 / c2 carries and that round's mask removes.
        torch.bitwise_right_shift(product_b, 32, out=c0).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_MASK32)
        torch.bitwise_right_shift(product_a, 32, out=c2).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_MASK32)
        c1, product_b = product_b, c1
        c3, product_a = product_a, c3
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1.bitwise_and_(_MASK32), c2, c3.bitwise_and_(_MASK32)


def seed_key(seed: Tensor | int) -> tuple[Tensor, Tensor]:
    """The (k0, k1) words of a 64-bit seed, low word first, as `tl.philox` splits it."""
    seed = torch.as_tensor(seed, dtype=torch.int64)
    return seed & _MASK32, (seed >> 32) & _MASK32
