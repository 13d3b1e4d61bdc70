"""Every CUDA source in csrc/ compiles with nvcc for sm_90a and sm_80, with no register spills.

The kernels are torch-agnostic `.cu` files (the torch binding lives apart), so this runs
wherever nvcc is installed, GPU or not. `-Xptxas -v` reports each kernel's registers and
spill traffic; any spilled byte fails the test.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.nvcc

CSRC = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = sorted(CSRC.glob("**/*.cu"))
ARCHS = ("sm_90a", "sm_80")
SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
ENTRY = re.compile(r"Compiling entry function '([^']+)'")


def ptxas_report(output: str) -> list[tuple[str, int, int]]:
    """(kernel, spill stores, spill loads) per compiled entry function."""
    report, kernel = [], None
    for line in output.splitlines():
        entry = ENTRY.search(line)
        if entry:
            kernel = entry.group(1)
        spill = SPILL.search(line)
        if spill and kernel is not None:
            report.append((kernel, int(spill.group(1)), int(spill.group(2))))
            kernel = None
    return report


def test_csrc_has_sources():
    assert SOURCES, f"no .cu files under {CSRC}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(CSRC)))
def test_compiles_without_spills(source, arch, tmp_path):
    result = subprocess.run(
        ["nvcc", "-c", "-O3", "-std=c++17", f"-arch={arch}", "-Xptxas", "-v", f"-I{CSRC}", str(source),
         "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = ptxas_report(result.stderr)
    assert report, f"ptxas reported no kernels:\n{result.stderr[-2000:]}"
    spilled = [(kernel, stores, loads) for kernel, stores, loads in report if stores or loads]
    assert not spilled, f"{arch}: register spills {spilled}"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_torch_binding_type_checks():
    """csrc/torch_binding.cpp against this torch's headers (a CPU build has them too; the
    binding takes its CUDA stream from Python, so no c10/cuda header is needed), through
    nvcc's host compiler with the CUDA runtime headers."""
    import sysconfig

    torch_ext = pytest.importorskip("torch.utils.cpp_extension")
    includes = [f"-I{p}" for p in torch_ext.include_paths()] + [f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}"]
    result = subprocess.run(
        ["nvcc", "-std=c++17", "-Xcompiler", "-fsyntax-only", "-c", str(CSRC / "torch_binding.cpp"),
         "-DTORCH_EXTENSION_NAME=_C", *includes],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "error" in line)[-4000:]
