"""pytest setup of the benchmark suite (`pytest bench`; `make test` collects only tests/).

Options:
  --bench-quick   the shapes of `python -m bench loss --quick` instead of the full ones
  --bench-slow    also run the cases marked `slow` (minutes each; see test_loss_cpu.py)

Each benchmark's memory overhead, measured in a fresh process, goes into its
`extra_info` (and so into saved runs) and is listed at the end of the session.
"""

from __future__ import annotations

import pytest

MEMORY_KEY = pytest.StashKey[list]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("bench", "distil-kernels benchmarks")
    group.addoption("--bench-quick", action="store_true", default=False,
                    help="benchmark the quick shapes of `python -m bench loss --quick`")
    group.addoption("--bench-slow", action="store_true", default=False,
                    help="also run benchmarks marked slow (each takes minutes)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: a benchmark case that takes minutes; run with --bench-slow")
    config.stash[MEMORY_KEY] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--bench-slow"):
        return
    skip = pytest.mark.skip(reason="takes minutes; run with --bench-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def memory_record(request: pytest.FixtureRequest):
    """record(test_id, peak_mib, overhead_mib, others_cpu_pct): listed in the terminal summary."""
    records = request.config.stash[MEMORY_KEY]
    return lambda *entry: records.append(entry)


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    records = config.stash.get(MEMORY_KEY, [])
    if not records:
        return
    terminalreporter.write_sep("-", "memory beyond inputs and gradients (fresh process per case); "
                                    "others%: CPU other processes took while timing")
    width = max(len(record[0]) for record in records)
    terminalreporter.write_line(f"{'benchmark'.ljust(width)}  overhead_mib  peak_mib  others%")
    for name, peak_mib, overhead_mib, others_pct in records:
        terminalreporter.write_line(f"{name.ljust(width)}  {overhead_mib:12.1f}  {peak_mib:8.1f}  {others_pct:7.0f}")
