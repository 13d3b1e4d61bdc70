"""Test-session hooks shared by the whole suite."""


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
