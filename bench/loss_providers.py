"""Providers of the loss benchmark and the inputs they share.

A provider is one way of computing a mean linear cross-entropy, behind one signature,
`loss(inputs) -> scalar`, registered by name in `PROVIDERS`. Hard-label providers read
`inputs.labels`; sparse ones read `inputs.sparse`, an expert's top-k distribution.
GPU issues add theirs (triton, Liger, CCE, torch.compile) with `register(Provider(...,
devices=("cuda",), requirement=...))`; the suite and the pytest-benchmark tests pick
up every registered provider.

Inputs are built like a real LM head's. `x` has unit RMS per coordinate, as after a
final RMSNorm, and `weight` rows have norm `LOGIT_STD`, so the logits are about
N(0, LOGIT_STD**2) at any d: with 4 the largest logit of a row is about 17, the
softmax's top probability about 0.2-0.26 and its entropy 4-5 nats at V = 32k-152k, the
peaked but not one-hot shape of a trained model's. Hard labels are uniform (a step's
time does not depend on them). A sparse target has k unique ids, uniform over the
vocabulary, with descending probabilities that sum to `SPARSE_MASS`; the rest of the
expert's mass is its tail (`tail="bucket"`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from distil_kernels import SparseTarget, linear_cross_entropy

from .measure import Workload

LOGIT_STD = 4.0
SPARSE_MASS = 0.9
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Rows of [rows, V] random scores drawn at a time when picking unique sparse ids.
_ID_ROWS_PER_DRAW = 256


@dataclass(frozen=True)
class LossCase:
    """One problem: N rows of d-dim hidden states against a V-row head."""

    rows: int  # N
    dim: int  # d
    vocab: int  # V
    k: int  # slots per row of a sparse target (hard labels are k = 1)
    dtype: str  # a key of DTYPES
    device: str = "cpu"
    seed: int = 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def gradient_bytes(self) -> int:
        """d_input [N, d] and d_weight [V, d] in the input dtype: what every provider returns."""
        return (self.rows + self.vocab) * self.dim * self.torch_dtype.itemsize

    @property
    def gemm_flop(self) -> int:
        """Forward logits GEMM plus the two backward GEMMs, 2*N*V*d each."""
        return 6 * self.rows * self.vocab * self.dim

    @property
    def shape_label(self) -> str:
        return f"N={self.rows} d={self.dim} V={self.vocab}"


@dataclass
class LossInputs:
    x: Tensor  # [N, d], requires grad
    weight: Tensor  # [V, d], requires grad
    labels: Tensor | None  # [N] int64, for hard-label providers
    sparse: SparseTarget | None  # ids [N, k] unique per row, probs [N, k] fp32, for sparse providers


def make_inputs(case: LossCase, target: str) -> LossInputs:
    """Seeded inputs of `case` with a `target` ("hard" or "sparse") target; same values in every dtype."""
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(case.rows, case.dim, generator=gen)
    weight = torch.randn(case.vocab, case.dim, generator=gen) * (LOGIT_STD / math.sqrt(case.dim))
    labels = sparse = None
    if target == "hard":
        labels = torch.randint(0, case.vocab, (case.rows,), generator=gen).to(case.device)
    else:
        sparse = _sparse_target(case, gen)
    return LossInputs(
        x.to(case.device, case.torch_dtype).requires_grad_(),
        weight.to(case.device, case.torch_dtype).requires_grad_(),
        labels,
        sparse,
    )


def _sparse_target(case: LossCase, gen: torch.Generator) -> SparseTarget:
    ids = torch.empty(case.rows, case.k, dtype=torch.long)
    for r0 in range(0, case.rows, _ID_ROWS_PER_DRAW):
        r1 = min(r0 + _ID_ROWS_PER_DRAW, case.rows)
        # The top-k of i.i.d. scores is a uniform k-subset: unique ids without a loop per row.
        ids[r0:r1] = torch.rand(r1 - r0, case.vocab, generator=gen).topk(case.k, dim=1).indices
    # A few dominant slots, as in an expert's top-k.
    probs = torch.softmax(2.0 * torch.randn(case.rows, case.k, generator=gen), dim=1)
    probs = probs.sort(dim=1, descending=True).values * SPARSE_MASS
    return SparseTarget(ids.to(case.device), probs.to(case.device))


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Provider:
    name: str
    target: str  # "hard" (class ids) or "sparse" (SparseTarget with k slots)
    loss: Callable[[LossInputs], Tensor]  # scalar mean loss, differentiable w.r.t. x and weight
    summary: str
    devices: tuple[str, ...] | None = None  # device types it runs on; None: any
    requirement: Callable[[], str | None] | None = None  # why it cannot run in this install, or None

    def unavailable(self, device: str) -> str | None:
        """Why this provider cannot run on `device` here, or None."""
        if self.devices is not None and torch.device(device).type not in self.devices:
            return f"{self.name} runs on {', '.join(self.devices)} only"
        return self.requirement() if self.requirement is not None else None


PROVIDERS: dict[str, Provider] = {}


def register(provider: Provider) -> Provider:
    if provider.target not in ("hard", "sparse"):
        raise ValueError(f"provider target must be 'hard' or 'sparse', got {provider.target!r}")
    if provider.name in PROVIDERS:
        raise ValueError(f"provider {provider.name!r} is already registered")
    PROVIDERS[provider.name] = provider
    return provider


def make_workload(spec: dict) -> Workload:
    """The subprocess factory: spec = {"provider": name, "case": LossCase fields}."""
    provider = PROVIDERS[spec["provider"]]
    case = LossCase(**spec["case"])
    inputs = make_inputs(case, provider.target)

    def step() -> None:
        provider.loss(inputs).backward()

    def reset() -> None:
        inputs.x.grad = None
        inputs.weight.grad = None

    return Workload(step, reset, case.gradient_bytes)


def workload_spec(provider: Provider, case: LossCase) -> dict:
    return {"provider": provider.name, "case": asdict(case)}


WORKLOAD_FACTORY = f"{__name__}:make_workload"


# --------------------------------------------------------------------------------------
# Providers
# --------------------------------------------------------------------------------------


def _native_requirement() -> str | None:
    if not (hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")):
        return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions"
    return None


def _native(inputs: LossInputs) -> Tensor:
    return F.linear_cross_entropy(inputs.x, inputs.weight, inputs.labels,
                                  options=torch.nn.LinearCrossEntropyOptions())


def _dense_soft(inputs: LossInputs) -> Tensor:
    ids, probs = inputs.sparse.ids, inputs.sparse.probs
    logits = F.linear(inputs.x, inputs.weight).float()
    rows, vocab = logits.shape
    # The expert's mass outside its top-k, spread evenly over the V - k other ids, so the
    # dense target is the whole distribution the sparse one describes (a bucket tail
    # matches that mass to the student's mass outside the ids instead: a different
    # loss, the same [N, V] work).
    tail = (1.0 - probs.sum(dim=1, keepdim=True)).clamp_min(0.0) / (vocab - ids.shape[1])
    dense = tail.to(logits.dtype).repeat(1, vocab).scatter_(1, ids, probs.to(logits.dtype))
    return F.cross_entropy(logits, dense)


# Baselines first: the suite runs providers in this order, so every row can carry its
# ratio to the baseline of its target kind.
register(Provider(
    "native", "hard", _native,
    "torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (torch's chunked path)",
    requirement=_native_requirement,
))
register(Provider(
    "eager", "hard", lambda i: F.cross_entropy(F.linear(i.x, i.weight).float(), i.labels),
    "F.cross_entropy(F.linear(x, w).float(), y): fp32 [N, V] logits",
))
register(Provider(
    "torch-ref", "hard", lambda i: linear_cross_entropy(i.x, i.weight, i.labels, backend="torch"),
    "distil_kernels backend='torch': the fp32-logits reference",
))
register(Provider(
    "chunked", "hard", lambda i: linear_cross_entropy(i.x, i.weight, i.labels, backend="chunked"),
    "distil_kernels backend='chunked': token chunks x vocabulary tiles, no [N, V] logits",
))
register(Provider(
    "dense-soft", "sparse", _dense_soft,
    "fp32 logits and a dense [N, V] soft target (top-k scattered, tail spread evenly), F.cross_entropy",
))
register(Provider(
    "torch-ref-sparse", "sparse",
    lambda i: linear_cross_entropy(i.x, i.weight, i.sparse, backend="torch"),
    "distil_kernels backend='torch' with a SparseTarget, bucket tail",
))
register(Provider(
    "chunked-sparse", "sparse",
    lambda i: linear_cross_entropy(i.x, i.weight, i.sparse, backend="chunked"),
    "distil_kernels backend='chunked' with a SparseTarget, bucket tail",
))

