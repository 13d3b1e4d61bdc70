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


LSE_NAN_CHECK = r"""
#include <cmath>
#include <cstdio>

#include "epilogue_math.h"
#include "sampling_epilogue.cu"

// The log-sum-exp folds and merges keep a NaN however a row's columns fall to threads:
// a state that has seen only NaN and -inf (max -inf, sum NaN) merged with any other, on
// either side; two states of -inf alone still merge to a sum of 0.
namespace distil {
namespace {
int sampling_failures() {
    int failures = 0;
    for (float other_max : {-INFINITY, 1.f}) {
        float m = -INFINITY, s = 0.f;
        fold(m, s, NAN);
        float left_max = m, left_sum = s;
        merge(left_max, left_sum, other_max, other_max == -INFINITY ? 0.f : 1.f);
        failures += !std::isnan(left_sum);
        float right_max = other_max, right_sum = other_max == -INFINITY ? 0.f : 1.f;
        merge(right_max, right_sum, m, s);
        failures += !std::isnan(right_sum);
    }
    float m = -INFINITY, s = 0.f;
    fold(m, s, -INFINITY);
    merge(m, s, -INFINITY, 0.f);
    failures += s != 0.f || m != -INFINITY;
    return failures;
}
}  // namespace
}  // namespace distil

int main() {
    int failures = distil::sampling_failures();
    const distil::LseState empty{-INFINITY, 0.f, 0.f};
    distil::LseState seen_nan = empty, seen_masked = empty;
    distil::fold(seen_nan, NAN);
    distil::fold(seen_masked, -INFINITY);
    for (const distil::LseState& other : {empty, seen_masked, seen_nan}) {
        failures += !std::isnan(distil::merge(seen_nan, other).sum);
        failures += !std::isnan(distil::merge(other, seen_nan).sum);
    }
    failures += distil::merge(empty, seen_masked).sum != 0.f;
    std::printf("%d failures\n", failures);
    return failures != 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_lse_merges_keep_a_nan(tmp_path):
    """The loss and sampling epilogues' log-sum-exp fold and merge (csrc/epilogue_math.h,
    csrc/sampling_epilogue.cu) as host code: a thread that saw only NaN and -inf has max
    -inf and sum NaN, and a merge with another such state (a row of NaNs: every pair in the
    block's reduction) dropped the NaN, so the row's lse came out -inf, not NaN."""
    run_host_check(tmp_path, "lse_nan_check", LSE_NAN_CHECK)


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

    from distil_kernels.cuda_ext import csrc_source_hash

    out = tmp_path_factory.mktemp("ext") / "_C.so"
    lib = library_paths()[0]
    # C++20 as torch's own extension builds compile (torch 2.13 and 2.14 seen); 2.14's
    # headers refuse anything older ("C++20 or later compatible compiler is required").
    command = [
        "nvcc", "-shared", "-Xcompiler", "-fPIC", "-O1", "-std=c++20", "-arch=sm_80", "-DTORCH_EXTENSION_NAME=_C",
        f"-DDISTIL_KERNELS_SOURCE_HASH=h{csrc_source_hash(CSRC)}",
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

    for name in ("chunk_stats", "logits_grad", "row_epilogue", "row_topk", "row_topk_one_pass", "gumbel_argmax"):
        assert callable(getattr(probe_extension, name)), name
    with pytest.raises(RuntimeError, match="logits must be a CUDA tensor, got cpu"):
        probe_extension.row_topk(torch.zeros(3, 5), 0, 2, 1.0, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long),
                                 torch.zeros(3, 4), 0)


def test_a_build_from_other_sources_is_refused(probe_extension, monkeypatch):
    """The binding records the digest of the sources it was built from; the package takes
    the build only while csrc/ still holds those sources."""
    import types

    import distil_kernels.cuda_ext as cuda_ext

    monkeypatch.setattr(cuda_ext, "_EXTENSION_AVAILABLE", True)
    monkeypatch.setattr(cuda_ext, "_loaded", None)
    stale = types.ModuleType("_C")
    stale.source_hash = "0123456789abcdef"
    modules = {"current": probe_extension, "stale": stale, "unstamped": types.ModuleType("_C")}
    for name in ("stale", "unstamped"):
        monkeypatch.setattr(cuda_ext.importlib, "import_module", lambda _, m=modules[name]: m)
        with pytest.raises(RuntimeError, match="built from other csrc/ sources.*rebuild it with pip install -e"):
            cuda_ext.extension()
    monkeypatch.setattr(cuda_ext.importlib, "import_module", lambda _: probe_extension)
    assert probe_extension.source_hash == cuda_ext.csrc_source_hash(CSRC)
    assert cuda_ext.extension() is probe_extension


def test_python_wrappers_match_the_binding(probe_extension, monkeypatch):
    """The backends' wrappers call every kernel with the binding's arity and argument
    order: each call gets as far as the binding's device check."""
    import torch

    import distil_kernels.cuda_ext as cuda_ext
    from distil_kernels.loss import cuda as loss_cuda
    from distil_kernels.sampling import cuda as sampling_cuda

    monkeypatch.setattr(cuda_ext, "extension", lambda: probe_extension)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    # Read once at import; torch 2.7 and older lack the fp32-output mm the cuda backend needs.
    monkeypatch.setattr(loss_cuda, "CUDA_FP32_OUTPUT_MM", True)
    loss_ops, sampling_ops = loss_cuda.extension_ops(), sampling_cuda.extension_sampling_ops()
    z, ids = torch.zeros(3, 5), torch.zeros(3, 2, dtype=torch.long)
    vec, pair = torch.zeros(3), torch.zeros(3, 2)
    keys = tuple(torch.zeros(3, dtype=torch.long) for _ in range(4))
    calls = [
        lambda: loss_ops.chunk_stats(z, None, None, 1.0, False, ids, 0, pair, torch.zeros(3, 3)),
        lambda: loss_ops.logits_grad(z, None, None, 1.0, vec, vec, None, ids, pair, pair.clone(), 0, z),
        lambda: loss_ops.row_epilogue(z, None, None, 1.0, ids, pair, pair.bool(), vec, vec, 1, 0.0, 0.0, 1e-6, vec,
                                      pair, None, z),
        lambda: sampling_ops.row_topk(z, 2, 1.0, pair, ids, torch.zeros(3, 4)),
        lambda: sampling_ops.gumbel_argmax(z, 0.7, False, keys, ids, pair, pair, torch.zeros(3, 4)),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="logits must be a CUDA tensor, got cpu"):
            call()


ROW_TERMS_PROGRAM = r"""
#include <cstdio>
#include <vector>

#include "row_terms.h"

// Reads "rows slots num_target smoothing z_loss inv_vocab clamp", then per row
// "rest upstream lse" and one "weight valid slot_logit" line a slot. Prints per row
// "row_coef uniform" and then each slot's coefficient, summing as the kernel's lanes
// would if there were one.
int main() {
    int rows, slots;
    distil::RowTermsOptions o{};
    if (std::scanf("%d %d %d %f %f %f %f", &rows, &slots, &o.num_target, &o.smoothing, &o.z_loss, &o.inv_vocab,
                   &o.bucket_clamp) != 7) return 1;
    for (int r = 0; r < rows; ++r) {
        float rest, upstream, lse;
        if (std::scanf("%f %f %f", &rest, &upstream, &lse) != 3) return 1;
        std::vector<float> weight(slots), q(slots, 0.f);
        distil::SlotSums sums{0.f, 0.f, 0.f, false};
        for (int j = 0; j < slots; ++j) {
            int valid;
            float logit;
            if (std::scanf("%f %d %f", &weight[j], &valid, &logit) != 3) return 1;
            if (j >= o.num_target) {
                sums.extra += weight[j];
                continue;
            }
            q[j] = distil::slot_q(valid != 0, logit, lse);
            sums.weight += weight[j];
            sums.q += q[j];
            sums.valid = sums.valid || valid != 0;
        }
        const distil::RowScalars s = distil::row_scalars(o, sums, rest, upstream, lse);
        std::printf("%.9g %.9g", s.row_coef, s.uniform);
        for (int j = 0; j < slots; ++j) std::printf(" %.9g", distil::slot_coefficient(o, s, j, weight[j], q[j]));
        std::printf("\n");
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
@pytest.mark.parametrize("smoothing,z_loss", [(0.0, 0.0), (0.1, 1e-3)])
def test_device_row_terms_match_the_python_algebra(tmp_path, tail, smoothing, z_loss):
    """csrc/row_terms.h as host code (the one-pass epilogue's coefficients) against
    targets.row_terms times each row's upstream factor: sparse rows, padded slots, ignored
    rows, plain credit slots, bucket rows whose ids hold all the mass (the clamp)."""
    import torch

    from distil_kernels.loss.options import BUCKET_CLAMP, LossOptions
    from distil_kernels.loss.targets import Slots, row_terms, target_weights

    gen = torch.Generator().manual_seed(11)
    rows, num_target, plain, vocab = 64, 6, 2, 1000
    slots_k = num_target + plain
    valid = torch.rand(rows, slots_k, generator=gen) < 0.8
    valid[:4, :num_target] = False  # ignored rows (their plain slots still count)
    probs = torch.rand(rows, num_target, generator=gen)
    probs = probs / probs.sum(dim=1, keepdim=True) * torch.rand(rows, 1, generator=gen)
    weights = torch.cat([probs, torch.randn(rows, plain, generator=gen)], dim=1)
    weights = torch.where(valid, weights, 0.0)
    slot_logits = torch.randn(rows, slots_k, generator=gen) * 3
    lse = slot_logits.logsumexp(dim=1) + torch.rand(rows, generator=gen) * 4
    lse[4:8] = torch.where(valid[4:8, :num_target], slot_logits[4:8, :num_target], -torch.inf).logsumexp(dim=1)
    upstream = torch.rand(rows, generator=gen)
    upstream[8] = 0.0
    slots = Slots(torch.zeros(rows, slots_k, dtype=torch.long), weights, valid, num_target)
    options = LossOptions(tail=tail, label_smoothing=smoothing, z_loss=z_loss)
    targets = target_weights(slots, options)
    rest = targets.rest if targets.rest is not None else torch.zeros(rows)

    lines = [f"{rows} {slots_k} {num_target} {smoothing!r} {z_loss!r} {1.0 / vocab!r} {BUCKET_CLAMP!r}"]
    for r in range(rows):
        lines.append(f"{rest[r].item()!r} {upstream[r].item()!r} {lse[r].item()!r}")
        lines += [f"{targets.weights[r, j].item()!r} {int(valid[r, j])} {slot_logits[r, j].item()!r}"
                  for j in range(slots_k)]
    output = host_program_output(tmp_path, "row_terms_check", ROW_TERMS_PROGRAM, "\n".join(lines) + "\n")
    got = torch.tensor([[float(t) for t in line.split()] for line in output.strip().splitlines()])

    terms = row_terms(lse, slot_logits, None if not smoothing else slot_logits.sum(dim=1), slots, options, vocab)
    uniform = torch.zeros(rows) if terms.uniform is None else terms.uniform
    expected = torch.cat([(terms.row_coef * upstream)[:, None], (uniform * upstream)[:, None],
                          terms.slot_coef * upstream[:, None]], dim=1)
    q_sum = torch.where(valid[:, :num_target], (slot_logits[:, :num_target] - lse[:, None]).exp(), 0.0).sum(dim=1)
    assert (1.0 - q_sum[4:8] < BUCKET_CLAMP).all() and (1.0 - q_sum[8:] > 0.01).all()  # both sides of the clamp
    # fp32 sums of at most 8 terms in another order, and (1 - eps) * g applied as one factor.
    torch.testing.assert_close(got, expected, rtol=2e-6, atol=2e-7)


def test_one_pass_epilogue_plans_a_cluster_a_row(probe_extension):
    """row_epilogue's cluster for a row: the fewest blocks (1, 2, 4, 8) whose slices fit
    ~100 KB of shared memory each (two rows' blocks an SM), else 8 blocks of up to ~200 KB
    (one an SM), else none (the two passes): a host function, run here."""
    plan = probe_extension.row_epilogue_cluster
    assert plan(1000, 1) == 1
    assert plan(32_007, 32) == 2
    assert plan(128_256, 32) == 8  # Llama-3: 64 KB a block
    assert plan(152_064, 32) == 8  # Qwen2.5: 76 KB a block
    assert plan(256_000, 32) == 8  # Gemma-2: 125 KB a block, one an SM
    assert plan(420_000, 1) == 0  # over 200 KB a block
    assert plan(1000, 1025) == 0  # the slot arrays are bounded
    assert plan(0, 1) == 0


TOPK_PROGRAM = r"""
#include <algorithm>
#include <cstdio>
#include <vector>

#include "topk_keys.h"

// Reads "rows cols k threads capacity", then each row's floats as uint32 bit patterns.
// Runs row_topk's selection as the kernel's threads would, one after another: the
// histogram of the keys' bins, each thread's share of bins_total in thread order (the
// block's exclusive scan), kth_key_bin on each share, the gather of every key in the
// chosen bin or above and a sort by `precedes`. Prints the first k columns of each row,
// or "radix" where the candidates pass `capacity` (the kernel's radix select).
int main() {
    int rows, cols, k, threads, capacity;
    if (std::scanf("%d %d %d %d %d", &rows, &cols, &k, &threads, &capacity) != 5) return 1;
    const int per_thread = distil::kBins / threads;
    std::vector<float> row(cols);
    for (int r = 0; r < rows; ++r) {
        for (int c = 0; c < cols; ++c) {
            unsigned bits;
            if (std::scanf("%u", &bits) != 1) return 1;
            std::memcpy(&row[c], &bits, sizeof bits);
        }
        std::vector<unsigned> bins(distil::kBins, 0u);
        for (int c = 0; c < cols; ++c) ++bins[distil::key_bin(distil::order_key(row[c]))];
        int above = 0, found = 0, bin = -1, candidates = -1;
        for (int t = 0; t < threads; ++t) {
            const int top = distil::kBins - per_thread * t - 1;
            int b, n;
            if (distil::kth_key_bin(bins.data(), top, per_thread, above, k, b, n)) {
                ++found;
                bin = b;
                candidates = n;
            }
            above += distil::bins_total(bins.data(), top, per_thread);
        }
        if (found != 1) return 2;
        if (candidates > capacity) {
            std::printf("radix\n");
            continue;
        }
        std::vector<std::pair<uint32_t, int>> cand;
        for (int c = 0; c < cols; ++c) {
            const uint32_t key = distil::order_key(row[c]);
            if (distil::key_bin(key) >= bin) cand.emplace_back(key, c);
        }
        if (static_cast<int>(cand.size()) != candidates) return 3;
        std::sort(cand.begin(), cand.end(), [](const auto& a, const auto& b) {
            return distil::precedes(a.first, a.second, b.first, b.second);
        });
        for (int j = 0; j < k; ++j) std::printf("%d ", cand[j].second);
        std::printf("\n");
    }
    return 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("k", [1, 64, 1000, 1024])
def test_topk_bins_bound_the_top_k(tmp_path, k):
    """row_topk's keys and bin search (csrc/topk_keys.h) as host code, its threads run one
    after another: the candidates of the k-th key's bin and above, sorted, give the
    reference op's ids (ties to the lower id, -0 as +0, NaN above +inf, -inf masked ids);
    rows whose bin holds more than 4096 keys go to the radix select."""
    import torch

    from distil_kernels.sampling.cuda import REFERENCE_SAMPLING_OPS

    gen = torch.Generator().manual_seed(8)
    rows, cols = 12, 5003
    logits = torch.randn(rows, cols, generator=gen) * 3.0
    logits[:, 11] = logits[:, 4000]
    logits[:3, :100] = 0.25  # runs of equal values around the k-th
    logits[3] = 0.0
    logits[3, ::2] = -0.0  # one bin for the whole row: the radix select
    logits[4, ::3] = -torch.inf
    logits[5, :2500] = -torch.inf
    logits[6] = 1.0 + torch.rand(cols, generator=gen) * 0.1  # distinct values, one bin: the radix select
    logits[7, 17] = torch.nan
    logits[8] *= 1e-3  # near zero: bins on both signs
    values = torch.empty(rows, k)
    ids = torch.empty(rows, k, dtype=torch.long)
    REFERENCE_SAMPLING_OPS.row_topk(logits, k, 1.0, values, ids, torch.empty(rows, 4))
    bits = logits.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    stdin = f"{rows} {cols} {k} 256 4096\n" + "\n".join(" ".join(map(str, r)) for r in bits.tolist()) + "\n"
    lines = host_program_output(tmp_path, "topk_check", TOPK_PROGRAM, stdin).strip().splitlines()
    assert len(lines) == rows
    radix = [r for r, line in enumerate(lines) if line == "radix"]
    assert radix == [3, 6]
    for r, line in enumerate(lines):
        if r not in radix:
            assert [int(t) for t in line.split()] == ids[r].tolist(), r


def test_one_pass_topk_plans_a_cluster_a_row(probe_extension):
    """row_topk_one_pass's cluster for a row of keys: the fewest blocks (1, 2, 4, 8) whose
    slices fit ~80 KB (two blocks an SM beside their bins and candidates), else 8 of up to
    ~190 KB (one an SM), else none (row_topk)."""
    plan = probe_extension.row_topk_one_pass_cluster
    assert plan(5003) == 1
    assert plan(32_007) == 2
    assert plan(152_064) == 8  # Qwen2.5: 76 KB of keys a block
    assert plan(256_000) == 8  # Gemma-2: 125 KB a block, one an SM
    assert plan(400_000) == 0
    assert plan(0) == 0


def test_one_pass_topk_refused_falls_back_to_row_topk(probe_extension, monkeypatch):
    """With DISTIL_KERNELS_CUDA_TOPK=one-pass on an sm_90 device, a launch the one-pass
    kernel refuses (here the binding's device check) warns and hands the rows to
    row_topk, whose own refusal then surfaces."""
    import torch

    import distil_kernels.cuda_ext as cuda_ext
    from distil_kernels.loss import cuda as loss_cuda
    from distil_kernels.sampling import cuda as sampling_cuda

    monkeypatch.setattr(cuda_ext, "extension", lambda: probe_extension)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: type("S", (), {"cuda_stream": 0})())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(loss_cuda, "CUDA_FP32_OUTPUT_MM", True)
    monkeypatch.setenv(sampling_cuda.TOPK_ENV, "one-pass")
    ops = sampling_cuda.extension_sampling_ops()
    z = torch.zeros(3, 5)
    with pytest.warns(UserWarning, match="one-pass top-k kernel failed .*logits must be a CUDA tensor"):
        with pytest.raises(RuntimeError, match="logits must be a CUDA tensor, got cpu"):
            ops.row_topk(z, 2, 1.0, torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 4))
    monkeypatch.setenv(sampling_cuda.TOPK_ENV, "fused")
    with pytest.raises(ValueError, match="DISTIL_KERNELS_CUDA_TOPK must be 'one-pass' or 'two-pass', got 'fused'"):
        sampling_cuda.one_pass_topk_requested()
