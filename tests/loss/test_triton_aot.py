"""Every Triton loss kernel and config compiles ahead of time for sm_90 and sm_80.

No GPU is needed: `triton.compile` lowers to PTX and a cubin for a named target. A
compile error fails the test; so does a config whose shared memory exceeds what the
architecture gives one block. The shared memory of each is reported at the end.
"""

from __future__ import annotations

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("the interpreter replaces the compiler; run without TRITON_INTERPRET", allow_module_level=True)
pytest.importorskip("triton")

from distil_kernels.loss.triton.aot import SHARED_MEMORY_LIMIT, all_specs, compile_spec  # noqa: E402

pytestmark = pytest.mark.aot

SPECS = all_specs()


@pytest.mark.parametrize("arch", [90, 80], ids=lambda a: f"sm_{a}")
@pytest.mark.parametrize("spec", SPECS, ids=[s.name for s in SPECS])
def test_compiles(spec, arch, record_property):
    compiled = compile_spec(spec, arch)
    shared = compiled.metadata.shared
    record_property("shared_memory", f"{spec.name} sm_{arch}: {shared / 1024:.0f} KiB")
    assert "cubin" in compiled.asm and compiled.asm["ptx"]
    assert shared <= SHARED_MEMORY_LIMIT[arch], f"{spec.name} needs {shared} B of shared memory on sm_{arch}"
    if arch == 90 and spec.name.startswith(("lse_forward", "backward")) and "fp32" not in spec.name:
        # bf16 tiles must reach Hopper's warp-group MMA, not fall back to mma.sync.
        assert "wgmma" in compiled.asm["ptx"]
