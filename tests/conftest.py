"""Test-session hooks shared by the whole suite."""

import os

# Deterministic mode on a GPU: PyTorch refuses cuBLAS GEMMs (the gradient GEMMs of the
# triton and cuda backends, any nn.Linear) unless cuBLAS gets a fixed workspace layout,
# named before the first GEMM. Tests that turn the mode on rely on it, as a user must.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def pytest_terminal_summary(terminalreporter):
    """Print the shared memory each ahead-of-time compiled kernel config needs."""
    rows = [
        value
        for report in terminalreporter.stats.get("passed", [])
        for name, value in getattr(report, "user_properties", [])
        if name == "shared_memory"
    ]
    if rows:
        terminalreporter.section("Triton kernels: shared memory per config")
        for row in sorted(rows):
            terminalreporter.write_line(row)
