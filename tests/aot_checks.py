"""The checks every ahead-of-time compiled Triton kernel config must pass, shared by the
loss and sampling AOT tests.

A spec compiles as a typical launch gets it (unit strides constant, operands marked
16-byte divisible: loads pipelined through shared memory) for sm_90 and sm_80, and
generically (every argument a plain value) for sm_90 only: the launched build is the
one whose shared memory and registers bind, and the generic one never needed more on
sm_80 than on sm_90.
"""

from __future__ import annotations

from distil_kernels.loss.triton.aot import (SHARED_MEMORY_LIMIT, compile_as_launched, compile_spec, resource_usage,
                                           serialized_wgmmas)

# A few spilled bytes are ptxas trading registers for scheduling; a tile too big for the
# register file spills hundreds (the old 128x256 forward: 408 B; fp32 128x128 backward: 12 KB).
MAX_SPILL_BYTES = 32


def check_compiles(spec, arch: int, record_property, *, expect_wgmma: bool) -> None:
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
        # Asked for explicitly (ENABLE_FP_FUSION): Triton 3.10 stops contracting by default.
        assert compiled.metadata.enable_fp_fusion, f"{spec.name} compiled without FMA contraction"
        shared = compiled.metadata.shared
        assert shared <= SHARED_MEMORY_LIMIT[arch], f"{spec.name} needs {shared} B of shared memory on sm_{arch}"
    assert spilled <= MAX_SPILL_BYTES, f"{spec.name} spills {spilled} B per thread on sm_{arch} ({registers} registers)"
    if arch == 90 and expect_wgmma:
        # bf16 tiles must reach Hopper's warp-group MMA, not fall back to mma.sync.
        assert "wgmma" in launched.asm["ptx"]
        # ...and keep several in flight. Tiles whose wgmmas take x from registers are
        # serialized by ptxas where the loop leaves them in flight past other writes
        # (sampling/triton/configs.py says where): candidates the tune step times as they are.
        if not spec.constexprs.get("X_REGISTERS"):
            assert not serialized_wgmmas(launched), f"ptxas waits out every wgmma of {spec.name} before the next"
