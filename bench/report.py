"""Output shared by the benchmark suites: where a number was measured, tables, CSV rows.

A benchmark number means little without the machine, library versions and commit it
came from, so every CSV row carries them (`machine_info`), and rows are appended, never
rewritten, so a file is the history of a machine's runs.
"""

from __future__ import annotations

import csv
import os
import platform
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = Path(__file__).resolve().parent / "out"


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it (the platform's word elsewhere)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """Short HEAD of the repository, "+dirty" when tracked files differ from it; "" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                                 capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+dirty" if changed else "")


def machine_info() -> dict[str, str | int]:
    """host, cpu (model and logical cores), torch version and git commit."""
    return {
        "host": socket.gethostname(),
        "cpu": f"{cpu_name()} ({os.cpu_count()} cores)",
        "torch": torch.__version__,
        "commit": git_commit(),
    }


def progress(message: str) -> None:
    """A progress line on stderr, so stdout keeps only the results."""
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Column:
    key: str  # row field
    title: str
    format: Callable[[object], str] = str  # applied to non-None values; None prints "-"
    left: bool = False  # text columns align left, numbers right


def fixed(digits: int) -> Callable[[object], str]:
    return lambda value: f"{value:.{digits}f}"


def ratio(value: object) -> str:
    return f"{value:.2f}x"


def format_table(rows: list[dict], columns: list[Column], *, group_by: Callable[[dict], object] | None = None) -> str:
    """A plain-text table; a blank line between consecutive rows of different `group_by` keys."""
    cells = [[("-" if row.get(c.key) is None else c.format(row[c.key])) for c in columns] for row in rows]
    widths = [max([len(c.title)] + [len(line[i]) for line in cells]) for i, c in enumerate(columns)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if c.left else v.rjust(w) for v, w, c in zip(values, widths, columns)).rstrip()

    out = [line([c.title for c in columns]), line(["-" * w for w in widths])]
    previous = None
    for i, (row, values) in enumerate(zip(rows, cells)):
        key = group_by(row) if group_by is not None else None
        if i and key != previous:
            out.append("")
        previous = key
        out.append(line(values))
    return "\n".join(out)


def append_csv(path: Path, rows: list[dict], fieldnames: list[str]) -> None:
    """Append `rows` to the CSV at `path`, writing the header when the file is new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    if not new:
        with open(path, newline="") as existing:
            header = next(csv.reader(existing), [])
        if header != fieldnames:
            raise ValueError(
                f"{path} has columns {header}, this version writes {fieldnames}; move the old file aside"
            )
    with open(path, "a", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fieldnames)
        if new:
            writer.writeheader()
        writer.writerows(rows)
