"""Every Triton sampling kernel and config compiles ahead of time for sm_90 and sm_80.

No GPU is needed: `triton.compile` lowers to PTX and a cubin for a named target. Each
spec compiles as a contiguous, 16-aligned launch gets it (unit strides constant,
operands marked divisible by 16, which pipelines the loads through shared memory) and,
for sm_90, as a launch with odd sizes or strides gets it (every argument a plain
value). Both must fit the architecture's shared memory, and the usual launch must not
spill more than a few registers: these kernels hold int64 key tiles or Philox noise
next to the logits tile, and their tiles were sized to fit 255 registers per thread.
The generic build is left out on sm_80 for CI time, as in tests/loss/test_triton_aot.py,
which says why that loses no check. Shared memory, registers and spills of each are
reported at the end.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler; run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton")

from distil_kernels.loss.triton.aot import (  # noqa: E402
    SHARED_MEMORY_LIMIT,
    compile_as_launched,
    compile_spec,
    resource_usage,
)
from distil_kernels.sampling.triton.aot import all_specs  # noqa: E402

pytestmark = pytest.mark.aot

SPECS = all_specs()


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles(spec, arch, record_property):
    launched = compile_as_launched(spec, arch)
    builds = [launched]
    generic_note = ""
    if arch == 90:
        generic = compile_spec(spec, arch)
        builds.append(generic)
        generic_note = f" ({generic.metadata.shared / 1024:.0f} KiB generic)"
    registers, spilled = resource_usage(launched)
    record_property("shared_memory", f"{spec.name} sm_{arch}: {launched.metadata.shared / 1024:.0f} KiB as launched"
                                     f"{generic_note}, {registers} registers, {spilled} B spilled")
    for compiled in builds:
        assert "cubin" in compiled.asm and compiled.asm["ptx"]
        shared = compiled.metadata.shared
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{spec.name} needs {shared} B of shared memory on sm_{arch}"
    # ptxas trades a few spilled registers for occupancy (it caps some of these at 128);
    # a tile too big for the register file spills hundreds of bytes.
    assert spilled <= 32, f"{spec.name} spills {spilled} B per thread on sm_{arch} ({registers} registers)"
    if arch == 90 and "fp32" not in spec.name and spec.constexprs["BLOCK_M"] >= 64:
        # 64-row bf16 tiles must reach Hopper's warp-group MMA, not fall back to mma.sync.
        assert "wgmma" in launched.asm["ptx"]
