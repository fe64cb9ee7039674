"""Every benchmark script runs end to end on tiny shapes, and what its tables claim holds.

The benchmarks take minutes to an hour and run only under `make bench` (the MFU one only on an accelerator),
so without these runs a refactor could break them unnoticed. Each script runs as a user would start it (a
fresh process, one CPU device, `--no-write`), and its printed section is parsed: both sides of the train
step must compute the same loss, greedy decoding must give transformers' tokens, chunked log-probs must
need fewer temporaries, every goal must carry a verdict, and BENCHMARKS.md must stay untouched.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_train_step_sides_compute_the_same_loss():
    out = run_bench("train_step.py", "--layers", "2", "--seq", "32", "--rows", "1", "--steps", "1", "--no-compile")
    rows = table(out, "Side")
    for objective in ("EU", "NPO"):
        ours = next(r for r in rows if r["Side"] == "eu_jax" and r["Objective"] == objective)
        eager = next(r for r in rows if r["Side"].startswith("PyTorch eager") and r["Objective"] == objective)
        assert float(ours["Loss of step 1"]) == pytest.approx(float(eager["Loss of step 1"]), abs=1e-3), objective
        assert float(ours["Seconds per step"]) > 0 and float(ours["XLA temporaries GB"]) > 0
    rates = re.search(r"own shapes .*: XLA ([0-9.]+) GFLOP/s, PyTorch ([0-9.]+) GFLOP/s", out)
    assert rates and min(float(rates[1]), float(rates[2])) > 0, "no matmul rates in the section"
    assert_every_goal_has_a_verdict(out)


def test_train_mfu_smoke_on_cpu():
    out = run_bench(
        "train_mfu.py", "--allow-cpu", "--layers", "2", "--hidden", "64", "--seq", "32", "--rows", "1",
        "--steps", "1", "--no-compile",
    )
    rows = {r["Side"]: r for r in table(out, "Side")}
    ours, eager = rows["eu_jax"], rows["PyTorch eager"]
    assert not {"eu_jax, splash attention", "eu_jax, cuDNN attention"} & set(rows)  # timed on their own devices only
    # bf16 compute on both sides from different random weights: both start near ln(vocab), not equal.
    for row in (ours, eager):
        assert abs(float(row["Loss of step 1"]) - math.log(128256)) < 0.5, row
        assert row["MFU"] == "unknown peak" and float(row["Seconds per step"]) > 0  # CPUs have no peak in the table


def test_train_scaling_chunked_log_probs_need_fewer_temporaries():
    out = run_bench("train_scaling.py", "--layers", "1", "--max-seq", "128", "--max-rows", "2", "--runs", "1")
    rows = table(out, "Sweep")
    assert {r["Sweep"] for r in rows} == {"sequence", "batch", "log-probs"}
    chunked, whole = (next(r for r in rows if r["Sweep"] == "log-probs" and key in r["Variant"])
                      for key in ("chunks of 128", "one chunk per half"))
    assert float(chunked["Temporaries GB"]) < float(whole["Temporaries GB"])
    assert {r["Variant"].split(",")[0] for r in rows if r["Sweep"] == "sequence"} == {"remat none", "remat dots", "remat full"}
    assert all(float(r["Seconds"]) > 0 for r in rows)


def test_generate_matches_transformers_tokens():
    out = run_bench("generate.py", "--batches", "2", "--new-tokens", "4", "--runs", "1")
    ours = next(r for r in table(out, "Batch", "Side") if r["Side"] == "eu_jax")
    assert ours["Same tokens"] == "2/2"
    (floor,) = table(out, "Batch", "Weight products alone, XLA ms")
    assert float(floor["Weight products alone, XLA ms"]) > 0 and float(floor["Weight products alone, PyTorch ms"]) > 0
    sampled = table(out, "Batch", "Sampling")
    assert len({r["Sampling"] for r in sampled}) == 2 and {r["Side"] for r in sampled} == {"eu_jax", "transformers"}
    assert all(float(r["Seconds"]) > 0 and r["Batch"] == "2" for r in sampled)


def test_convert_reports_every_step():
    out = run_bench("convert.py", "--layers", "1", "--baseline-runs", "1")
    steps = {r["Step"]: r for r in table(out, "Step")}
    assert set(steps) == {"read", "import", "load", "copy bf16", "export bf16", "copy fp32", "export fp32"}
    assert all(float(r["Seconds"]) > 0 for r in steps.values())
    assert_every_goal_has_a_verdict(out)
