"""`make tofu` on a tiny chat model: every stage runs, the table is built from real results, reruns reuse them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from eu_jax import tofu_bench
from eu_jax.files import load_python_file
from tests.tiny_run import make_chat_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def tofu_config():
    return load_python_file(CONFIGS / "tofu.py").get_config("")


def test_changed_share_counts_differing_and_added_values(tmp_path):
    from eu_jax.convert.checkpoint import load_params, save_params_checkpoint

    ckpt = make_chat_checkpoint(tmp_path)
    params, meta = load_params(ckpt)
    total = sum(np.size(leaf) for leaf in __import__("jax").tree.leaves(params))
    edited = dict(params, final_norm={"scale": np.asarray(params["final_norm"]["scale"]) + 1.0})
    save_params_checkpoint(tmp_path / "edited", edited, meta)
    assert tofu_bench.changed_share(ckpt, tmp_path / "edited") == pytest.approx(64 / total)
    assert tofu_bench.changed_share(ckpt, ckpt) == 0.0


def test_a_stage_resumed_after_an_interruption_reports_its_whole_time(tmp_path, monkeypatch):
    now = iter([0.0, 120.0, 1000.0, 1060.0, 2000.0, 3000.0, 3600.0])  # seconds read at each start and stop
    monkeypatch.setattr(tofu_bench.time, "perf_counter", lambda: next(now))

    def preempted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tofu_bench.StageClock(tmp_path / "minutes.json").timed("eu", preempted)
    assert tofu_bench.StageClock(tmp_path / "minutes.json").timed("eu", lambda: "done") == "done"  # a new process
    assert json.loads((tmp_path / "minutes.json").read_text()) == {"eu": 3.0}  # 2 minutes, then 1 to finish
    clock = tofu_bench.StageClock(tmp_path / "minutes.json")
    clock.timed("eu", lambda: "reused")  # a finished stage keeps its first time
    assert clock.get("eu") == 3.0
    clock.timed("eu", lambda: clock.forget("eu"))  # its run replaced: timed again (10 minutes)
    assert json.loads((tmp_path / "minutes.json").read_text()) == {"eu": 10.0}


def test_a_stage_interrupted_before_its_run_began_keeps_its_minutes(tmp_path, monkeypatch):
    """EU's stage samples its forget texts before runs/eu exists; a finished time whose run was deleted by hand
    is dropped instead."""
    now = iter([0.0, 600.0, 1000.0, 1060.0, 2000.0, 2030.0])
    monkeypatch.setattr(tofu_bench.time, "perf_counter", lambda: next(now))
    bench = tofu_bench.TofuBench.__new__(tofu_bench.TofuBench)  # only the work folder and the clock are used
    bench.work, bench.clock = tmp_path, tofu_bench.StageClock(tmp_path / "minutes.json")

    def interrupted_while_sampling():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        bench._timed("eu", interrupted_while_sampling)
    (tmp_path / "runs" / "eu").mkdir(parents=True)
    bench._timed("eu", lambda: "trained")
    assert bench.clock.get("eu") == 11.0  # 10 minutes sampling, then 1 to train
    (tmp_path / "runs" / "eu").rmdir()
    bench._timed("eu", lambda: "trained again")
    assert bench.clock.get("eu") == 0.5


def test_the_benchmark_runs_every_stage_and_reuses_them(tmp_path, capsys):
    config = tofu_config()
    config.model.checkpoint = str(make_chat_checkpoint(tmp_path))
    config.data.update(batch_size=8, max_length=160)
    t = config.tofu
    t.update(workdir=str(tmp_path / "work"), methods="unierase,graddiff,eu", num_authors=10, update_readme=False)
    t.finetune.steps, t.unlearn.steps = 4, 2
    t.selfgen.update(samples=8, max_new_tokens=8, batch_size=8)
    t.eval.update(max_items=4, max_new_tokens=8, batch_size=8)
    token = t.unierase.token
    token.update(batch_size=8, max_length=160)
    token.raw.steps, token.mixed.steps, token.robust.steps = 2, 1, 1
    t.unierase.edit.update(layers="0", contexts={"count": 1, "length": 4, "seed": 0})
    t.unierase.edit.target.steps = 2
    t.unierase.retained_max_tokens = 500
    readme = tofu_bench.README.read_text()

    assert tofu_bench.run(config) == 0

    work = tmp_path / "work"
    for name in ("target", "retain_reference", "unierase", "graddiff", "eu"):
        results = json.loads((work / "results" / f"{name}.json").read_text())
        assert results["forget"]["count"] == 4 and 0 <= results["model_utility"] <= 1  # a random tiny model knows no authors
    report = (work / "report" / "tofu.md").read_text()
    for row in ("target", "retain_reference", "unierase", "graddiff"):
        assert f"| {row} |" in report
    assert (work / "report" / "tofu_quality_utility.png").stat().st_size > 1000
    unierase_row = next(line for line in report.splitlines() if line.startswith("| unierase |"))
    graddiff_row = next(line for line in report.splitlines() if line.startswith("| graddiff |"))
    # UniErase touches one layer's down_proj and one token row; fine-tuning moves (almost) every parameter.
    share = lambda row: float(row.split("|")[6].strip().rstrip("%"))  # noqa: E731
    assert share(unierase_row) < 10 < share(graddiff_row)
    assert tofu_bench.README.read_text() == readme
    minutes = json.loads((work / "minutes.json").read_text())
    assert set(minutes) == {"target", "retain_reference", "unierase", "graddiff", "eu"}

    saved = {p.name: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")}
    assert tofu_bench.run(config) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "results").glob("*.json")} == saved
    assert json.loads((work / "minutes.json").read_text()) == minutes  # EU samples again, but keeps its first time

    t.unlearn.steps = 3  # the fine-tuning methods' runs resume for one more step: their results are not reused
    assert tofu_bench.run(config) == 0
    for name in ("graddiff", "eu"):
        results = json.loads((work / "results" / f"{name}.json").read_text())
        assert results["params"].split("#")[0] == str(work / "runs" / name / "checkpoints" / "3" / "state")
    unchanged = ("target", "retain_reference", "unierase")
    assert all((work / "results" / f"{n}.json").stat().st_mtime_ns == saved[f"{n}.json"] for n in unchanged)

    # Another learning rate: the fine-tuning methods' runs are trained again (and timed again), and other
    # evaluation settings score every model again; the fine-tunes and UniErase are reused.
    minutes = json.loads((work / "minutes.json").read_text())
    t.unlearn.learning_rate, t.eval.max_items = 1e-3, 3
    assert tofu_bench.run(config) == 0
    out = capsys.readouterr().out
    assert "graddiff was trained with other settings (optimizer.learning_rate: " in out and "running UniErase again" not in out
    for name in ("target", "retain_reference", "unierase", "graddiff", "eu"):
        assert json.loads((work / "results" / f"{name}.json").read_text())["forget"]["count"] == 3
    rerun = json.loads((work / "minutes.json").read_text())
    assert all(rerun[n] == minutes[n] for n in unchanged) and rerun["graddiff"] != minutes["graddiff"]
