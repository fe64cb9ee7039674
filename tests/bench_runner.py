"""Runs a benchmark script as a user would and reads the tables it prints (for the bench smoke tests).

The benchmarks take minutes to an hour and run only under `make bench` (the MFU one only on an accelerator),
so without smoke runs a refactor could break them unnoticed. Each script runs in a fresh process, on one CPU
device, with `--no-write`; BENCHMARKS.md must stay untouched. The smoke tests are split over two files so the
two test workers (`make test`) each take one share.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
SCRIPT_TIMEOUT_S = 900


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_bench(script: str, *args: str) -> str:
    """stdout of `bench/<script> --no-write ARGS`, after checking it succeeded and left BENCHMARKS.md alone."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as `make bench` runs
    before = _digest(BENCHMARKS)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--no-write", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"bench/{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert _digest(BENCHMARKS) == before, f"bench/{script} --no-write changed BENCHMARKS.md"
    return proc.stdout


def table(text: str, *columns: str) -> list[dict[str, str]]:
    """The rows of the first markdown table whose header has all of `columns`, as header -> cell."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if all(f"| {c} |" in line for c in columns)), None)
    assert start is not None, f"no table with columns {columns} in:\n{text[-3000:]}"
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")))))
    assert rows, f"the table with columns {columns} has no rows"
    return rows


def assert_every_goal_has_a_verdict(text: str) -> None:
    """Rows with a goal say MET or NOT MET (rows shown for context carry '—' in both columns)."""
    rows = table(text, "Goal", "Verdict")
    goals = [row for row in rows if row["Goal"] != "—"]
    assert goals, rows
    for row in rows:
        assert row["Verdict"] in (("MET", "NOT MET") if row in goals else ("—",)), row
