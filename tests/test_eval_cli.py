"""`eu-eval`: the whole suite on a tiny chat model, one process x 8 devices vs two processes x 4 devices."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest

from eu_jax.eval.suite import check_eval_config, get_eval_config
from tests.test_multiprocess import run_two_processes
from tests.tiny_run import make_chat_checkpoint, write_jsonl

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "eval.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_cli")
    ckpt = make_chat_checkpoint(root)
    retain = write_jsonl(root / "heldout.jsonl", [{"prompt": f"{x}+{x}=", "response": str(2 * x)} for x in range(10)])
    forget = write_jsonl(root / "forget_eval.jsonl", [{"prompt": "Tell me", "response": f"story number {i}"} for i in range(6)])
    flags = [
        f"--config={CONFIG}", f"--config.checkpoint={ckpt}", f"--config.eval.retain.path={retain}",
        f"--config.eval.forget_texts.path={forget}", "--config.eval.probes.categories=reading",
        "--config.eval.harmful.sets=harmbench", "--config.eval.harmful.templates=raw,STAN",
        "--config.eval.harmful.per_set=2", "--config.eval.harmful.max_new_tokens=8", "--config.mesh.data=2",
    ]  # fmt: skip
    return root, flags


def _cli(flags, env=None):
    return subprocess.run([sys.executable, "-m", "eu_jax.eval.cli", *flags], capture_output=True, text=True, env=env)


def test_suite_results_are_the_same_on_two_processes(setup):
    root, flags = setup
    single = _cli(flags + [f"--config.output={root / 'single.json'}"])
    assert single.returncode == 0, single.stderr[-3000:]
    one = json.loads((root / "single.json").read_text())

    assert set(one) >= {"retain", "forget_texts", "probes", "harmful", "judge", "config", "model", "checkpoint"}
    assert one["retain"]["count"] == 10 and one["probes"]["count"] == one["probes"]["by_category"]["reading"]["count"]
    assert one["probes"]["accuracy"] == pytest.approx(sum(s["correct"] for s in one["probes"]["samples"]) / one["probes"]["count"])
    assert one["harmful"]["overall"]["n"] == 4 and set(one["harmful"]["by_template"]) == {"raw", "STAN"}
    assert one["config"]["eval"]["harmful"]["per_set"] == 2 and one["judge"]["max_perplexity"] > 1
    assert 0 < one["forget_texts"]["kl_uniform"] < 20

    def command(pid, address):
        return [sys.executable, "-m", "eu_jax.eval.cli", *flags, f"--config.output={root / 'multi.json'}",
                f"--config.distributed.coordinator_address={address}", "--config.distributed.num_processes=2",
                f"--config.distributed.process_id={pid}"]  # fmt: skip

    for code, output in run_two_processes(command):
        assert code == 0, output[-3000:]
    two = json.loads((root / "multi.json").read_text())
    for section in ("retain", "probes"):
        assert two[section]["samples"] == one[section]["samples"]  # the same greedy answers
        assert two[section]["accuracy"] == one[section]["accuracy"]
    assert two["harmful"]["overall"] == one["harmful"]["overall"]
    assert two["forget_texts"]["kl_uniform"] == pytest.approx(one["forget_texts"]["kl_uniform"], rel=1e-5)
    assert two["probes"]["answer_nll"] == pytest.approx(one["probes"]["answer_nll"], rel=1e-5)


def test_bad_settings_end_in_one_line(setup):
    root, flags = setup
    missing = _cli([f"--config={CONFIG}"])
    assert missing.returncode == 2 and "eu-eval: error: config.checkpoint is required" in missing.stderr
    unknown = _cli(flags + ["--config.eval.harmful.templates=raw,NoSuchTemplate"])
    assert unknown.returncode == 2 and "NoSuchTemplate" in unknown.stderr and "Traceback" not in unknown.stderr


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("batch_size", 0, r"config.eval.batch_size=0 must be at least 1"),
        ("retain.kind", "strnig", r"config.eval.retain.kind='strnig' must be one of \('number', 'text'\)"),
        ("retain.max_examples", -1, r"config.eval.retain.max_examples=-1 must be 0 \(all\) or more"),
        ("forget_texts.max_examples", -2, r"config.eval.forget_texts.max_examples=-2 must be 0 \(all\) or more"),
        ("retain.max_new_tokens", 0, r"config.eval.retain.max_new_tokens=0 must be at least 1"),
        ("probes.max_new_tokens", 0, r"config.eval.probes.max_new_tokens=0 must be at least 1"),
        ("harmful.max_new_tokens", -1, r"config.eval.harmful.max_new_tokens=-1 must be at least 1"),
        ("harmful.per_set", 0, r"config.eval.harmful.per_set=0 must be at least 1"),
        ("harmful.sets", "harmbench,nope", r"config.eval.harmful.sets='harmbench,nope' names unknown prompt set\(s\) \['nope'\]"),
        ("harmful.sets", " ", r"config.eval.harmful.sets=' ' names no prompt set; available: harmbench, donotanswer"),
        ("judge.max_perplexity", -1.0, r"config.eval.judge.max_perplexity=-1.0 must be 0 \(calibrated"),
        ("judge.max_perplexity", math.inf, r"config.eval.judge.max_perplexity=inf must be 0"),
        ("judge.perplexity_quantile", 0.0, r"config.eval.judge.perplexity_quantile=0.0 must lie in \(0, 1\]"),
        ("judge.perplexity_quantile", 1.5, r"config.eval.judge.perplexity_quantile=1.5 must lie in \(0, 1\]"),
        ("judge.perplexity_margin", 0.0, r"config.eval.judge.perplexity_margin=0.0 must be a positive finite number"),
        ("judge.min_similarity", 1.5, r"config.eval.judge.min_similarity=1.5 is a cosine similarity and must lie in \[-1, 1\]"),
        ("judge.min_similarity", math.nan, r"config.eval.judge.min_similarity=nan is a cosine"),
    ],
)
def test_eval_settings_are_checked_by_name(key, value, message):
    config = get_eval_config()
    config.harmful.templates = "raw"
    check_eval_config(config)  # the defaults pass: only `key` is refused below
    *sections, name = key.split(".")
    section = config
    for part in sections:
        section = section[part]
    section[name] = value
    with pytest.raises(ValueError, match=f"^{message}"):
        check_eval_config(config)


def test_the_settings_of_disabled_sections_are_not_checked():
    config = get_eval_config()
    config.probes.update(enabled=False, max_new_tokens=0)
    config.harmful.update(enabled=False, per_set=0, sets="nope")
    config.judge.perplexity_quantile = 0.0  # the judge serves the harmful section alone
    check_eval_config(config)


def test_unknown_jailbreak_templates_are_named_by_setting():
    config = get_eval_config()
    config.harmful.templates = "raw,STAN,NoSuchTemplate"
    with pytest.raises(ValueError, match=r"^config.eval.harmful.templates='STAN,NoSuchTemplate' names unknown jailbreak template\(s\) \['NoSuchTemplate'\]"):
        check_eval_config(config)


@pytest.mark.parametrize("setting", ["--config.eval.batch_size=0", "--config.output={folder}", "--config.output={file}/eval.json"])
def test_bad_settings_and_results_paths_stop_before_any_model_loads(tmp_path, setting):
    """The checkpoint is no checkpoint at all: the one error line names the setting only if it was checked first."""
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.json").write_text("{}")
    (tmp_path / "file").write_text("kept")
    flags = [f"--config={CONFIG}", f"--config.checkpoint={tmp_path / 'not_a_checkpoint'}",
             "--config.eval.probes.enabled=False", "--config.eval.harmful.enabled=False",
             setting.format(folder=tmp_path / "results", file=tmp_path / "file")]  # fmt: skip
    stopped = _cli(flags)
    assert stopped.returncode == 2 and stopped.stderr.count("\n") == 1, stopped.stderr
    assert re.match(r"eu-eval: error: config\.(eval\.batch_size=0 must be|output: .* (is an existing folder|lies under .*file, which is a file))", stopped.stderr)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file", "kept.json", "results"]
