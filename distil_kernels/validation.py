"""Checks at the public boundary, with messages that say what was expected and given.

Shape, dtype and device checks are free. Value checks (id ranges, probabilities,
duplicate ids) read the data back to the host, which is a synchronisation on CUDA:
public functions take `validate=False` to skip them, in which case out-of-range ids
are treated as padding by every backend so that no kernel indexes with them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .loss.options import MASS_SLACK
from .loss.targets import SparseTarget

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def check_flags(**flags: object) -> None:
    """Switches that must be bools: `validate="no"` would otherwise be truthy and validate."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def check_linear(input: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """input [..., d] float, weight [V, d] of the same dtype and device, bias [V] or None."""
    check_tensor("input", input)
    check_tensor("weight", weight)
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"input must be float16, bfloat16, float32 or float64, got {input.dtype}")
    if input.dim() < 1:
        raise ValueError("input must have shape [..., d], got a scalar")
    if weight.dim() != 2:
        raise ValueError(f"weight must have shape [V, d], got {tuple(weight.shape)}")
    if weight.shape[1] != input.shape[-1]:
        raise ValueError(
            f"weight must have shape [V, d] with d = input.shape[-1] = {input.shape[-1]}, "
            f"got {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError("weight must have at least one row (V >= 1), got V = 0")
    if weight.shape[1] < 1:
        raise ValueError(f"input must have a hidden dimension d >= 1, got shape {tuple(input.shape)}")
    if weight.dtype != input.dtype:
        raise TypeError(f"weight must have input's dtype {input.dtype}, got {weight.dtype}")
    if weight.device != input.device:
        raise ValueError(f"weight must be on input's device {input.device}, got {weight.device}")
    if bias is not None:
        check_tensor("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype not in FLOAT_DTYPES:
            raise TypeError(f"bias must be a floating tensor, got {bias.dtype}")
        if bias.device != input.device:
            raise ValueError(f"bias must be on input's device {input.device}, got {bias.device}")


def _first_bad(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def is_integer_dtype(dtype: torch.dtype) -> bool:
    """An integer dtype, bool excluded (True/False would pass as ids or indices 0/1)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_ids(name: str, ids: Tensor, vocab_size: int, ignore_index: int | None, values: bool) -> None:
    """Integer ids in [0, V) (or equal to `ignore_index`); IndexError names the first bad one."""
    if not is_integer_dtype(ids.dtype):
        raise TypeError(f"{name} must have an integer dtype, got {ids.dtype}")
    if not values or ids.numel() == 0 or ids.is_meta:  # a meta tensor has no values to check
        return
    bad = (ids < 0) | (ids >= vocab_size)
    if ignore_index is not None:
        bad &= ids != ignore_index
    if bool(bad.any()):
        where = _first_bad(bad)
        allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or ignore_index={ignore_index}")
        raise IndexError(
            f"{name} must hold ids in {allowed}; got {int(ids[where])} at index {where} "
            f"({int(bad.sum())} out-of-range ids in all)"
        )


def check_target(target: Tensor | SparseTarget, input: Tensor, vocab_size: int, ignore_index: int,
                 tail: str, values: bool) -> None:
    """A hard target [...] or a SparseTarget [..., k] whose leading dims are input's."""
    batch_shape = input.shape[:-1]
    if isinstance(target, SparseTarget):
        if target.batch_shape != batch_shape:
            raise ValueError(
                f"target (SparseTarget) must have shape [..., k] with leading dims input.shape[:-1] = "
                f"{tuple(batch_shape)}, got ids of shape {tuple(target.ids.shape)}"
            )
        if target.ids.device != input.device:
            raise ValueError(f"target must be on input's device {input.device}, got {target.ids.device}")
        check_ids("target.ids", target.ids, vocab_size, ignore_index, values)
        if values:
            check_probs(target, ignore_index, tail)
        return
    check_tensor("target", target)
    if target.shape != batch_shape:
        raise ValueError(
            f"target must be class ids of shape input.shape[:-1] = {tuple(batch_shape)} or a "
            f"SparseTarget, got a tensor of shape {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ValueError(f"target must be on input's device {input.device}, got {target.device}")
    check_ids("target", target, vocab_size, ignore_index, values)


def check_probs(target: SparseTarget, ignore_index: int, tail: str, name: str = "target") -> None:
    """Finite weights; for bucket/renormalize probabilities; unique ids for bucket.

    `name`: the argument that holds `target` (distil_loss's is `expert`), for the messages.
    """
    if target.probs.is_meta:  # no values to check
        return
    probs = target.probs.reshape(-1, target.k)
    ids = target.ids.reshape(-1, target.k)
    live = ids != ignore_index
    # A padding slot's prob is ignored (DESIGN.md), whatever it holds.
    non_finite = ~torch.isfinite(target.probs) & (target.ids != ignore_index)
    if bool(non_finite.any()):
        raise ValueError(f"{name}.probs must be finite; first NaN/inf at index {_first_bad(non_finite)}")
    if tail == "ignore":
        return
    negative = (probs < 0) & live
    if bool(negative.any()):
        raise ValueError(
            f"{name}.probs must be >= 0 with tail={tail!r} (signed weights need tail='ignore'); "
            f"got {float(probs[_first_bad(negative)])} at row {_first_bad(negative)[0]}"
        )
    mass = torch.where(live, probs, 0).sum(dim=1, dtype=torch.float64)
    if tail == "bucket":
        over = mass > 1.0 + MASS_SLACK
        if bool(over.any()):
            row = _first_bad(over)[0]
            raise ValueError(
                f"{name}.probs must sum to at most 1 per row with tail='bucket' (the rest is the "
                f"expert's mass outside its top-k); row {row} sums to {float(mass[row]):.6f}. "
                f"Use tail='renormalize' for unnormalised weights."
            )
        if target.k > 1:
            # Padding becomes distinct negatives, so only real ids can collide after sorting.
            padded = torch.where(live, ids, -1 - torch.arange(target.k, device=ids.device))
            sorted_ids = torch.sort(padded, dim=1).values
            dup = (sorted_ids[:, 1:] == sorted_ids[:, :-1]) & (sorted_ids[:, 1:] >= 0)
            if bool(dup.any()):
                row, col = _first_bad(dup)
                raise ValueError(
                    f"{name}.ids must be unique within a row with tail='bucket' (the bucket is the "
                    f"mass outside the set of ids); row {row} repeats id {int(sorted_ids[row, col])}"
                )
    else:
        rows_live = live.any(dim=1)
        empty = rows_live & (mass <= 0)
        if bool(empty.any()):
            row = _first_bad(empty)[0]
            raise ValueError(
                f"{name}.probs must have positive mass on every non-ignored row with "
                f"tail='renormalize'; row {row} sums to {float(mass[row])}"
            )
