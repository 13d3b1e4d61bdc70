"""Benchmark harness of distil-kernels: `python -m bench SUITE`.

One module per suite (`loss.py`; `sample`, `topk` and `trainer` come with their
issues), each with its providers in `<suite>_providers.py`. Shared pieces:
`measure.py` times a workload and reads its peak memory in a fresh process, and
`report.py` describes the machine and writes tables and CSV rows. `bench/out/` (not
tracked) collects the CSV files; `pytest bench --benchmark-only` runs the same suites
under pytest-benchmark.
"""
