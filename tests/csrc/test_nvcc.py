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


ROW_WALK_CHECK = r"""
#include <cstdio>
#include <vector>

#include "row_walk.h"

// Every (start alignment, width, thread count): each column visited exactly once, every
// float4 in bounds and 16-byte aligned, also where ok is false (its load still happens).
int main() {
    alignas(16) static float buffer[4096 + 8];
    int failures = 0;
    for (int offset = 0; offset < 4; ++offset) {
        for (int cols : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 255, 1023, 1024, 1025, 2047, 2051, 4093}) {
            for (int threads : {1, 3, 256}) {
                const float* row = buffer + offset;
                const distil::RowSpan span = distil::row_span(row, cols);
                std::vector<int> seen(cols, 0);
                bool bad = span.head < 0 || span.head > 3 || span.tail < 0 || span.tail > 3;
                for (int tid = 0; tid < threads; ++tid) {
                    distil::walk_row(
                        span, tid, threads,
                        [&](int c) {
                            if (c < 0 || c >= cols) bad = true;
                            else ++seen[c];
                        },
                        [&](const int (&first)[distil::kUnroll], const bool (&ok)[distil::kUnroll]) {
                            for (int i = 0; i < distil::kUnroll; ++i) {
                                const bool inside = first[i] >= 0 && first[i] + 4 <= cols;
                                if (!inside || reinterpret_cast<uintptr_t>(row + first[i]) % 16 != 0) {
                                    bad = true;
                                } else if (ok[i]) {
                                    for (int j = 0; j < 4; ++j) ++seen[first[i] + j];
                                }
                            }
                        });
                }
                for (int c = 0; c < cols; ++c) bad = bad || seen[c] != 1;
                if (bad) {
                    std::printf("FAIL offset=%d cols=%d threads=%d\n", offset, cols, threads);
                    ++failures;
                }
            }
        }
    }
    std::printf("%d failures\n", failures);
    return failures != 0;
}
"""


def host_program_output(tmp_path, name: str, program: str, stdin: str = "") -> str:
    """Build `program` (C++ including csrc/ headers) with nvcc as host code, run it on
    `stdin`, and return what it printed."""
    source = tmp_path / f"{name}.cu"
    source.write_text(program)
    binary = tmp_path / name
    build = subprocess.run(["nvcc", "-std=c++17", "-O1", f"-I{CSRC}", str(source), "-o", str(binary)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-4000:]
    result = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout[-2000:]
    return result.stdout


def run_host_check(tmp_path, name: str, program: str) -> None:
    """Run `program` as host code (`host_program_output`) and expect its last line to say "0 failures"."""
    output = host_program_output(tmp_path, name, program)
    assert output.strip().endswith("0 failures"), output[-2000:]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_row_walk_visits_every_column_once_aligned(tmp_path):
    """The epilogues' row partition (csrc/row_walk.h), run on the CPU as host code."""
    run_host_check(tmp_path, "row_walk_check", ROW_WALK_CHECK)


ROW_WALK_IN_PLACE_CHECK = r"""
#include <cstdio>
#include <vector>

#include "row_walk.h"

// walk_row_in_place, one thread after another with its barriers counted: every thread
// reaches the same number of them, every column is loaded once and stored once, float4s
// in bounds and 16-byte aligned, and no store (an output element of 2 or 4 bytes at byte
// size * c of the row) lands on a column that some thread loads after the last barrier
// before that store.
int main() {
    alignas(16) static float buffer[4096 + 8];
    int failures = 0;
    for (int out_size : {2, 4}) {
        for (int offset = 0; offset < 4; ++offset) {
            for (int cols : {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15, 16, 17, 255, 1023, 1024, 1025, 2047, 2051, 4093}) {
                for (int threads : {6, 7, 33, 256}) {
                    const float* row = buffer + offset;
                    const distil::RowSpan span = distil::row_span(row, cols);
                    std::vector<int> loaded_at(cols, -1), loads(cols, 0), stores(cols, 0);
                    std::vector<std::pair<int, int>> store_events;  // (column, barriers passed)
                    bool bad = false;
                    int barriers_of_first = -1;
                    for (int tid = 0; tid < threads; ++tid) {
                        int barriers = 0;
                        auto load = [&](int c) {
                            if (c < 0 || c >= cols) { bad = true; return; }
                            loaded_at[c] = barriers;
                            ++loads[c];
                        };
                        auto store = [&](int c) {
                            if (c < 0 || c >= cols) { bad = true; return; }
                            ++stores[c];
                            store_events.emplace_back(c, barriers);
                        };
                        distil::walk_row_in_place<2>(
                            span, tid, threads, [&](int c) { load(c); return 0.f; }, [&](int c, float) { store(c); },
                            [&](int c) {
                                if (c < 0 || c + 4 > cols || reinterpret_cast<uintptr_t>(row + c) % 16 != 0) bad = true;
                                else for (int j = 0; j < 4; ++j) load(c + j);
                                return float4{};
                            },
                            [&](int c, float4) { for (int j = 0; j < 4; ++j) store(c + j); }, [&] { ++barriers; });
                        if (barriers_of_first < 0) barriers_of_first = barriers;
                        bad = bad || barriers != barriers_of_first;
                    }
                    for (int c = 0; c < cols; ++c) bad = bad || loads[c] != 1 || stores[c] != 1;
                    for (const auto& [c, barriers] : store_events) {
                        for (int k = out_size * c / 4; k <= (out_size * c + out_size - 1) / 4; ++k) {
                            bad = bad || loaded_at[k] >= barriers;
                        }
                    }
                    if (bad) {
                        std::printf("FAIL size=%d offset=%d cols=%d threads=%d\n", out_size, offset, cols, threads);
                        ++failures;
                    }
                }
            }
        }
    }
    std::printf("%d failures\n", failures);
    return failures != 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_in_place_row_walk_stores_only_over_loaded_columns(tmp_path):
    """logits_grad's in-place walk (csrc/row_walk.h), run on the CPU as host code."""
    run_host_check(tmp_path, "row_walk_in_place_check", ROW_WALK_IN_PLACE_CHECK)


NOISE_PROGRAM = r"""
#include <cstdio>
#include <cstring>

#include "gumbel.h"

// Reads "c0 c1 c2 c3 k0 k1" lines (Philox counters and keys) until a line "words", then
// one word a line; prints each counter's four words, then each word's g as its fp32 bits.
int main() {
    char line[256];
    bool words = false;
    while (std::fgets(line, sizeof line, stdin)) {
        if (std::strncmp(line, "words", 5) == 0) {
            words = true;
            continue;
        }
        if (!words) {
            unsigned c[4], k0, k1;
            std::sscanf(line, "%u %u %u %u %u %u", &c[0], &c[1], &c[2], &c[3], &k0, &k1);
            distil::philox4x32(c, k0, k1);
            std::printf("%u %u %u %u\n", c[0], c[1], c[2], c[3]);
        } else {
            unsigned word;
            std::sscanf(line, "%u", &word);
            const float g = distil::gumbel(word);
            unsigned bits;
            std::memcpy(&bits, &g, sizeof bits);
            std::printf("%u\n", bits);
        }
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_noise_is_the_other_backends_stream(tmp_path):
    """csrc/gumbel.h as host code: Philox words equal to sampling/philox.py's, and g within a
    few fp32 ulps of the float64 transform at every word near 0, 2**31 and 2**32 (u within
    2**-33 of 1, where an fp32 u would round to 1 and g be inf) and at random words."""
    import torch

    from distil_kernels.sampling.philox import philox4x32

    gen = torch.Generator().manual_seed(5)
    counters = torch.randint(0, 2**32, (64, 6), generator=gen)
    counters[0] = 0
    counters[1] = 2**32 - 1
    edges = [torch.arange(0, 1024), torch.arange(2**31 - 512, 2**31 + 512), torch.arange(2**32 - 1024, 2**32)]
    words = torch.cat([*edges, torch.randint(0, 2**32, (2**14,), generator=gen)])
    stdin = "".join(" ".join(map(str, row)) + "\n" for row in counters.tolist())
    stdin += "words\n" + "".join(f"{w}\n" for w in words.tolist())
    lines = host_program_output(tmp_path, "noise_check", NOISE_PROGRAM, stdin).split("\n")
    got_words = torch.tensor([[int(t) for t in line.split()] for line in lines[: len(counters)]])
    c = counters.T
    assert torch.equal(got_words, torch.stack(philox4x32(c[0], c[1], c[2], c[3], c[4], c[5]), dim=1))
    bits = torch.tensor([int(t) for t in lines[len(counters):] if t], dtype=torch.int64)
    gumbel = bits.to(torch.int32).view(torch.float32).double()
    truth = -torch.log(-torch.log((words.double() * 2 + 1) / 2**33))
    assert truth.max() > 22.8
    # The host's logf is within an ulp, as the device's. Measured: at most 9.9e-7 from the
    # truth where g ~ 20 (half an ulp there), 8.9e-8 times 1 + |g| anywhere.
    torch.testing.assert_close(gumbel, truth, rtol=2**-22, atol=2**-22)


@pytest.fixture(scope="module")
def probe_extension(tmp_path_factory):
    """csrc/ built into a module against this torch, CPU build or not: the kernels by nvcc,
    the binding against torch's headers, linked with libtorch and the CUDA runtime. A CPU
    torch has no CUDA device to run the kernels on, but the module imports, parses its
    arguments and checks them, which is what the binding adds."""
    import importlib.util
    import sysconfig

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    import torch
    from torch.utils.cpp_extension import include_paths, library_paths

    out = tmp_path_factory.mktemp("ext") / "_C.so"
    lib = library_paths()[0]
    # C++20 as torch's own extension builds compile (torch 2.13 and 2.14 seen); 2.14's
    # headers refuse anything older ("C++20 or later compatible compiler is required").
    command = [
        "nvcc", "-shared", "-Xcompiler", "-fPIC", "-O1", "-std=c++20", "-arch=sm_80", "-DTORCH_EXTENSION_NAME=_C",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", f"-I{CSRC}",
        *[str(p) for p in SOURCES], str(CSRC / "torch_binding.cpp"),
        f"-L{lib}", "-ltorch", "-ltorch_cpu", "-lc10", "-ltorch_python", "-lcudart",
        "-Xlinker", "-rpath", "-Xlinker", lib, "-o", str(out),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, "\n".join(line for line in result.stderr.splitlines() if "error" in line)[-4000:]
    spec = importlib.util.spec_from_file_location("_C", out)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_binding_builds_imports_and_checks_its_arguments(probe_extension):
    import torch

    for name in ("chunk_stats", "logits_grad", "row_topk", "gumbel_argmax"):
        assert callable(getattr(probe_extension, name)), name
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor, got cpu"):
        probe_extension.row_topk(torch.zeros(3, 5), 0, 2, 1.0, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long),
                                 torch.zeros(3, 4), 0)


def test_python_wrappers_match_the_binding(probe_extension, monkeypatch):
    """The backends' wrappers call every kernel with the binding's arity and argument
    order: each call gets as far as the binding's device check."""
    import torch

    import distil_kernels.cuda_ext as cuda_ext
    from distil_kernels.loss import cuda as loss_cuda
    from distil_kernels.sampling import cuda as sampling_cuda

    monkeypatch.setattr(cuda_ext, "extension", lambda: probe_extension)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(torch.ops.aten.mm, "overloads", lambda: ["default", "dtype_out"])
    loss_ops, sampling_ops = loss_cuda.extension_ops(), sampling_cuda.extension_sampling_ops()
    z, ids = torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long)
    vec, pair = torch.zeros(3), torch.zeros(3, 2)
    keys = tuple(torch.zeros(3, dtype=torch.long) for _ in range(4))
    calls = [
        lambda: loss_ops.chunk_stats(z, None, None, 1.0, False, ids, 0, pair, torch.zeros(3, 3)),
        lambda: loss_ops.logits_grad(z, None, None, 1.0, vec, vec, None, ids, pair, pair.clone(), 0, z),
        lambda: sampling_ops.row_topk(z, 2, 1.0, pair, ids, torch.zeros(3, 4)),
        lambda: sampling_ops.gumbel_argmax(z, 0.7, False, keys, ids, pair, pair, torch.zeros(3, 4)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="logits must be a CUDA tensor, got cpu"):
            call()
