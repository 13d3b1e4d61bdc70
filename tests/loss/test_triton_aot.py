"""Every Triton loss kernel and config compiles ahead of time for sm_90 and sm_80.

No GPU is needed: `triton.compile` lowers to PTX and a cubin for a named target. Each
spec compiles as a contiguous, 16-aligned launch gets it (unit inner strides constant,
pointers, d and row strides marked divisible by 16, which pipelines the loads through
shared memory): that build must fit the architecture's shared memory and must not spill
more than a few registers, and bf16 forward and backward tiles must reach Hopper's
wgmma. The generic build (every argument a plain value, what odd sizes or strides get)
must fit the shared memory too.

The generic build is compiled for sm_90 only, to keep this file and the sampling one
near 9 minutes cold on a 2-core CI machine: both builds on both architectures took
11.7 minutes on a busy one, this 6.2 minutes once and 9.2 on 2026-11-27 under Triton
3.9 (43 s of it here); sm_80's generic build is about a quarter of the compiler's work.
It adds no finding: measured once for every loss and sampling spec, its shared memory
never exceeds the sm_90 generic build's and stays at or under 100 KiB, against sm_80's
163 KiB, and sm_80's lowering is still compiled, as launched, where registers and
shared memory bind. Shared memory, registers and spills of each are reported at the end.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler; run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton", minversion="3.2")

from aot_checks import check_compiles  # noqa: E402
from distil_kernels.loss.triton.aot import all_specs  # noqa: E402

pytestmark = pytest.mark.aot

# Each spec on the architectures whose launches use it (all of them but a few per-arch tiles).
BUILDS = [(spec, arch) for spec in all_specs() for arch in spec.archs]


@pytest.mark.parametrize(("spec", "arch"), BUILDS, ids=[f"{s.name}-sm_{a}" for s, a in BUILDS])
def test_compiles(spec, arch, record_property):
    bf16_tile = spec.name.startswith(("lse_forward", "logits_grad")) and "fp32" not in spec.name
    check_compiles(spec, arch, record_property, expect_wgmma=bf16_tile)
