"""examples/ run as a user runs them: a short run learns, and a missing library is a clean skip."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "accelerate_topk_distillation.py"


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_accelerate_example_learns_from_top_k_targets():
    result = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "20"], capture_output=True, text=True,
                            timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+) over 20 steps", result.stdout).groups())
    assert last < first


def test_accelerate_example_without_accelerate_is_a_clean_skip():
    code = ("import runpy, sys; sys.modules['accelerate'] = None; sys.argv = ['example']; "
            f"runpy.run_path({str(EXAMPLE)!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped: this example needs Accelerate" in result.stdout
