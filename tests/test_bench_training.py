"""The training benchmarks run end to end on tiny shapes, and what their tables claim holds.

Both sides of the train step must compute the same loss, chunked log-probs must need fewer temporaries, and
every goal must carry a verdict (the scripts run as users start them: `tests/bench_runner.py`).
"""

from __future__ import annotations

import math
import re

import pytest

from tests.bench_runner import assert_every_goal_has_a_verdict, run_bench, table


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
