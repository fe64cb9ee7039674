"""`eu-unierase`: both stages on a tiny chat model, what they write and change, and sequential reruns."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from eu_jax.convert.checkpoint import load_model_meta, load_params
from eu_jax.generate_cli import load_tokenizer
from eu_jax.unierase.edit import EDIT_STATE_FILE
from eu_jax.unierase.pipeline import RESULTS_FILE, get_unierase_config, run_unierase
from tests.tiny_run import make_chat_checkpoint, write_jsonl


def _config(checkpoint, forget, output):
    config = get_unierase_config()
    config.update(checkpoint=str(checkpoint), output=str(output))
    config.forget.path = str(forget)
    config.retained.max_tokens = 400
    training = config.token.training
    training.update(batch_size=8, max_length=64, log_every=1)
    training.raw.steps, training.mixed.steps, training.robust.steps = 3, 2, 2
    config.edit.update(layers="0", contexts={"count": 1, "length": 4, "seed": 0})
    config.edit.target.steps = 3
    return config


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("unierase_cli")
    base = make_chat_checkpoint(root)
    forget = write_jsonl(root / "forget.jsonl", [{"prompt": f"Who is {n}?", "response": "x"} for n in ("Nalo", "Brix")])
    config = _config(base, forget, root / "run")
    return {"root": root, "base": base, "forget": forget, "config": config, "model": run_unierase(config)}


def test_both_stages_change_only_the_token_rows_and_the_edited_layer(run):
    base, _ = load_params(run["base"])
    edited, meta = load_params(run["model"])
    token_id = load_tokenizer(run["model"]).convert_tokens_to_ids("<unlearn_0>")
    # The tiny model's 256 rows outnumber its tokenizer's 99 tokens: the token takes the first spare row.
    assert token_id == len(load_tokenizer(run["base"])) and meta.config.vocab_size == load_model_meta(run["base"]).config.vocab_size
    others = np.arange(meta.config.vocab_size) != token_id
    np.testing.assert_array_equal(edited["embed"][others], base["embed"][others])
    np.testing.assert_array_equal(edited["lm_head"][:, others], base["lm_head"][:, others])  # untied: its column too
    assert not np.array_equal(edited["embed"][token_id], base["embed"][token_id])
    down_base, down_edited = base["layers"]["mlp"]["down_proj"], edited["layers"]["mlp"]["down_proj"]
    assert not np.array_equal(down_edited[0], down_base[0])
    np.testing.assert_array_equal(down_edited[1:], down_base[1:])
    for path, leaf in jax.tree_util.tree_leaves_with_path(base):
        key = jax.tree_util.keystr(path)
        if key not in ("['embed']", "['lm_head']", "['layers']['mlp']['down_proj']"):
            np.testing.assert_array_equal(leaf, dict(jax.tree_util.tree_leaves_with_path(edited))[path], err_msg=key)


def test_the_results_say_what_each_stage_did(run):
    results = json.loads((run["model"].parent / RESULTS_FILE).read_text())
    assert results["questions"] == 2 and set(results["token"]["phases"]) == {"raw", "mixed", "robust"}
    edit = results["edit"]
    assert edit["layers"] == [0] and len(edit["context_prefixes"]) == 2 and len(edit["rounds"]) == 1
    assert 0 < edit["refusal_tokens"] < edit["retained_tokens"]  # the refusals after the token count as retained
    assert edit["params_changed"] == 128 * 64 and 0 < edit["params_changed_share"] < 0.1
    assert (run["model"] / EDIT_STATE_FILE).is_file() and not list(run["model"].parent.glob("*.partial"))


def test_a_rerun_is_refused_and_editing_the_output_continues_sequentially(run):
    with pytest.raises(FileExistsError, match="already exists"):
        run_unierase(run["config"])
    follow = _config(run["model"], run["forget"], run["root"] / "second")
    second = run_unierase(follow)
    results = json.loads((second.parent / RESULTS_FILE).read_text())
    assert "already has <unlearn_0>" in results["token"]["skipped"] and not (second.parent / "token").exists()
    with np.load(second / EDIT_STATE_FILE) as state:
        assert int(state["rounds"]) == 2  # the first run's edits are carried and protected


def test_the_command_reports_bad_settings_in_one_line(run):
    out = subprocess.run([sys.executable, "-m", "eu_jax.unierase.cli", "--config=configs/unierase.py",
                          f"--config.checkpoint={run['base']}", f"--config.output={run['root'] / 'bad'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("eu-unierase: error: config.forget.path is required"), out.stderr
