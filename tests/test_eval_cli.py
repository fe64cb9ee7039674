"""`eu-eval`: the whole suite on a tiny chat model, one process x 8 devices vs two processes x 4 devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

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
