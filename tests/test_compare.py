"""`make compare` on a tiny chat model: every stage runs, results and report are written, README untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eu_jax import compare
from eu_jax.files import load_python_file
from tests.tiny_run import make_chat_checkpoint

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def demo_config():
    return load_python_file(CONFIGS / "demo.py").get_config("")


def test_compare_runs_each_method_and_its_relearning_attack(tmp_path):
    config = demo_config()
    config.model.checkpoint = str(make_chat_checkpoint(tmp_path))
    config.mesh.update(data=2, fsdp=-1)
    config.train.steps, config.data.batch_size, config.data.max_length = 3, 8, 64
    w = config.workflow
    w.update(workdir=str(tmp_path / "work"), methods="eu,npo", update_readme=False)
    w.domain.update(train_size=16, heldout_size=4)
    w.selfgen.update(train=8, eval=4, relearn=8, max_new_tokens=12, max_prompt_tokens=8, batch_size=8, min_chars=1)
    w.relearn.update(steps=2, eval_every=1)
    w.eval.probes.categories = "coding"
    w.eval.harmful.enabled = False  # jailbreak templates are longer than the tiny model's positions
    readme = compare.README.read_text()

    assert compare.run(config) == 0

    work = tmp_path / "work"
    summary = json.loads((work / "results" / "compare.json").read_text())
    assert list(summary["rows"]) == ["base", "eu", "npo"] and list(summary["relearned"]) == ["eu", "npo"]
    for method in ("eu", "npo"):
        result = json.loads((work / "results" / f"{method}.json").read_text())
        assert result["retain"]["count"] == 4 and result["probes"]["count"] > 0
        assert (work / "runs" / method / "checkpoints" / "3").is_dir()
        curve = summary["curves"][method]
        assert [p["step"] for p in curve] == [0, 1, 2]  # unlearned, a light evaluation, the attacked model
        assert curve[0]["kl_uniform"] == summary["rows"][method]["kl_uniform"]
        assert curve[-1]["kl_uniform"] == summary["relearned"][method]["kl_uniform"]
    report = (work / "report" / "compare.md").read_text()
    assert "| eu |" in report and "| npo + relearning |" in report and "compare_relearning.png" in report
    assert compare.README.read_text() == readme

    # A second run reuses every finished training run and every saved evaluation.
    saved = {p.name: p.stat().st_mtime_ns for p in (work / "results").glob("*.json") if p.name != "compare.json"}
    assert compare.run(config) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (work / "results").glob("*.json") if p.name != "compare.json"} == saved
    assert json.loads((work / "results" / "compare.json").read_text()) == summary

    # Another weight for EU only (NPO's preset sets its own): EU's run and its attack are trained again and
    # scored again; the base model's scores (and its judge's calibration) and NPO's are reused.
    config.objective.g = 2.0
    assert compare.run(config) == 0
    rerun = {p.name: p.stat().st_mtime_ns for p in (work / "results").glob("*.json") if p.name != "compare.json"}
    eu_files = {name for name in saved if name.startswith("eu")}
    assert len(eu_files) == 2 and all(rerun[name] != saved[name] for name in eu_files)
    assert all(rerun[name] == saved[name] for name in saved.keys() - eu_files)


def test_a_misspelt_method_stops_compare_and_tofu_before_any_work(tmp_path):
    from eu_jax import tofu_bench

    config = demo_config()
    config.workflow.update(workdir=str(tmp_path / "work"), methods="eu, npo ,nop")
    with pytest.raises(ValueError, match=r"^config\.workflow\.methods: no method 'nop' \(the presets in .*configs/methods "
                                         r"give eu, ga, graddiff, idk_dpo, kl_npo, npo, retain_only, rmu, simnpo, undial\)$"):
        compare.run(config)
    tofu = load_python_file(CONFIGS / "tofu.py").get_config("")
    tofu.tofu.update(workdir=str(tmp_path / "tofu"), methods="unierase,graddif")
    with pytest.raises(ValueError, match=r"^config\.tofu\.methods: no method 'graddif' .* give eu, ga, graddiff, .*, unierase\)$"):
        tofu_bench.run(tofu)
    assert not (tmp_path / "work").exists() and not (tmp_path / "tofu").exists()


def test_bad_training_settings_stop_the_workflows_before_their_data(tmp_path):
    """demo, compare and the TOFU benchmark validate every training they will run (and the relearning attack)
    before they sample forget texts, evaluate or train anything."""
    from eu_jax import demo, tofu_bench
    from eu_jax.train.config import ConfigError

    checkpoint = str(make_chat_checkpoint(tmp_path))
    config = demo_config()
    config.model.checkpoint = checkpoint
    config.workflow.workdir = str(tmp_path / "work")
    config.optimizer.learning_rate = -1.0
    with pytest.raises(ConfigError, match=r"^eu's training: config\.optimizer\.learning_rate: must be positive"):
        demo.run(config)
    config.optimizer.learning_rate = 1e-5
    config.workflow.update(methods="eu,npo")
    config.workflow.relearn.steps = 0
    with pytest.raises(ValueError, match=r"^config\.workflow\.relearn\.steps=0 must be at least 1"):
        compare.run(config)
    config.workflow.relearn.steps = 2
    config.workflow.selfgen.batch_size = 0
    with pytest.raises(ValueError, match=r"^config\.workflow\.selfgen\.batch_size=0 must be at least 1"):
        compare.run(config)
    assert not (tmp_path / "work").exists()
    tofu = load_python_file(CONFIGS / "tofu.py").get_config("")
    tofu.model.checkpoint = checkpoint
    tofu.tofu.update(workdir=str(tmp_path / "tofu"), methods="unierase,graddiff")
    tofu.tofu.unierase.edit.l2 = 0.0
    with pytest.raises(ValueError, match=r"^config\.tofu\.unierase\.edit\.l2=0\.0 must be > 0"):
        tofu_bench.run(tofu)
    tofu.tofu.unierase.edit.l2 = 1.0
    tofu.tofu.finetune.learning_rate = -1.0  # was read as "the preset's rate"
    with pytest.raises(ValueError, match=r"^config\.tofu\.finetune\.learning_rate=-1\.0 must be a positive finite number"):
        tofu_bench.run(tofu)
    tofu.tofu.finetune.learning_rate = 1e-4
    tofu.tofu.update(methods="eu")
    tofu.tofu.selfgen.samples = 0
    with pytest.raises(ValueError, match=r"^config\.tofu\.selfgen\.samples=0 must be at least 1"):
        tofu_bench.run(tofu)
    tofu.tofu.selfgen.samples = 8
    tofu.optimizer.b1 = 1.0  # a setting every training shares: named as the user sets it
    with pytest.raises(ConfigError, match=r"^target's training: config\.optimizer\.b1: must be within \[0, 1\)"):
        tofu_bench.run(tofu)
    assert not (tmp_path / "tofu" / "runs").exists()
