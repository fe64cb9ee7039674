"""`eu-unierase`'s inputs: stage 1 reused only for what it was trained from, token names that are no new token,
and edit settings refused before any work, in one sentence naming the setting."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from eu_jax.convert.checkpoint import load_params
from eu_jax.unierase.edit import check_edit_config, get_edit_config
from eu_jax.unierase.pipeline import forget_questions, run_unierase, stage_one
from eu_jax.unierase.vocab import VocabError, add_unlearning_token
from tests.test_unierase_pipeline import _config
from tests.tiny_run import make_chat_checkpoint, write_jsonl

LAYERS = [0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two tiny chat checkpoints with different weights, and forget questions."""
    root = tmp_path_factory.mktemp("unierase_inputs")
    forget = write_jsonl(root / "forget.jsonl", [{"prompt": f"Who is {n}?", "response": "x"} for n in ("Nalo", "Brix")])
    return {"root": root, "a": make_chat_checkpoint(root / "a"), "b": make_chat_checkpoint(root / "b", seed=1), "forget": forget}


def _stage_one(config, out):
    return stage_one(config, forget_questions(config), LAYERS, out)


def test_stage_one_is_reused_only_while_its_inputs_are_the_same(files, tmp_path, capsys):
    out = tmp_path / "run"
    config = _config(files["a"], files["forget"], out)
    folder, summary = _stage_one(config, out)
    assert "token_id" in summary
    assert _stage_one(config, out) == (folder, {"reused": str(folder)})

    # An interrupted run continued with another checkpoint: its token model is built from that one.
    config.checkpoint = str(files["b"])
    capsys.readouterr()
    assert "token_id" in _stage_one(config, out)[1]
    said = capsys.readouterr().out.splitlines()[0]
    assert said.startswith(f"unierase: {folder} was trained from another checkpoint or settings (checkpoint: {files['a']}")
    assert said.endswith("): training the token again")
    token_model, _ = load_params(folder)
    base, _ = load_params(files["b"])
    others = np.arange(len(base["embed"])) != summary["token_id"]
    np.testing.assert_array_equal(token_model["embed"][others], base["embed"][others])
    assert _stage_one(config, out)[1] == {"reused": str(folder)}


def test_a_token_without_a_record_of_its_inputs_is_refused_and_kept(files, tmp_path):
    """A token an earlier eu_jax trained has no record of its inputs: neither reused on a guess nor deleted."""
    out = tmp_path / "run"
    config = _config(files["a"], files["forget"], out)
    folder, _ = _stage_one(config, out)
    (folder / "unierase_inputs.json").unlink()
    with pytest.raises(FileExistsError, match=f"^{folder} holds a trained token with no unierase_inputs.json"):
        _stage_one(config, out)
    assert load_params(folder)  # still there


@pytest.mark.parametrize("change", ["forget", "init", "training", "layers"])
def test_other_questions_or_token_settings_train_the_token_again(files, tmp_path, change, capsys):
    out = tmp_path / "run"
    config = _config(files["a"], files["forget"], out)
    questions = forget_questions(config)
    stage_one(config, questions, LAYERS, out)
    layers = LAYERS
    if change == "forget":
        questions = questions[:1]
    elif change == "init":
        config.token.init = "?"
    elif change == "training":
        config.token.training.seed = 1
    else:
        layers = [1]  # the robust phase adds its noise to the layers the edit will change
    capsys.readouterr()
    assert "token_id" in stage_one(config, questions, layers, out)[1]
    assert "training the token again" in capsys.readouterr().out


def test_a_checkpoint_with_the_token_skips_stage_one(files, tmp_path):
    """How a rerun on an earlier run's output recognises its own token: a special token added to the tokenizer."""
    out = tmp_path / "run"
    folder, _ = _stage_one(_config(files["a"], files["forget"], out), out)
    assert _stage_one(_config(folder, files["forget"], tmp_path / "again"), tmp_path / "again")[1] == {
        "skipped": f"{folder} already has <unlearn_0>"
    }


def test_a_name_the_tokenizer_does_not_add_as_a_new_token_is_refused(files, tmp_path):
    with pytest.raises(VocabError, match="does not add '' as a new token of its own"):
        add_unlearning_token(files["a"], tmp_path / "grown", token="")
    assert not (tmp_path / "grown").exists()
    config = _config(files["a"], files["forget"], tmp_path / "run")
    config.token.name = ""
    with pytest.raises(ValueError, match="^config.token.name is empty"):
        run_unierase(config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["a", "<s>"])  # an ordinary vocabulary entry; the tokenizer's own BOS
def test_a_name_already_in_the_vocabulary_is_refused(files, tmp_path, name):
    config = _config(files["a"], files["forget"], tmp_path / "run")
    config.token.name = name
    with pytest.raises(VocabError, match=f"^config.token.name='{name}' is already a token of .* tokenizer"):
        run_unierase(config)
    assert not (tmp_path / "run" / "token").exists()


BAD_EDIT_SETTINGS = [
    ("requests_per_round", -1, r"requests_per_round=-1 must be >= 0"),
    ("l2", 0.0, r"l2=0.0 must be > 0"),
    ("nullspace_energy", -0.1, r"nullspace_energy=-0.1 must be in \[0, 1\)"),
    ("nullspace_energy", 1.0, r"nullspace_energy=1.0 must be in \[0, 1\)"),
    ("layers", "0,x", r"layers='0,x' is not a comma-separated list of layer indices"),
    ("layers", "2", r"layers='2': each must be in \[0, 1\] for this 2-layer model"),
    ("position", "middle", r"position='middle' is not one of"),
    ("contexts.length", 0, r"contexts.length=0 must be >= 1"),
    ("kl_template", "{0}{1}", r"kl_template='\{0\}\{1\}' must hold exactly one \{\} field"),
    ("kl_template", "{x} is", r"kl_template='\{x\} is' must hold exactly one \{\} field"),
]


@pytest.mark.parametrize("key, value, message", BAD_EDIT_SETTINGS)
def test_bad_edit_settings_are_refused_before_any_work(files, tmp_path, key, value, message):
    config = _config(files["a"], files["forget"], tmp_path / "run")
    config.edit.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=f"^config.edit.{message}"):
        run_unierase(config)
    assert not (tmp_path / "run").exists()


def test_edit_settings_at_their_bounds_are_accepted():
    cfg = get_edit_config()
    cfg.update(requests_per_round=0, nullspace_energy=0.0, l2=1e-6, kl_template="{{}} about {}", layers=" 1, 0 ")
    assert check_edit_config(cfg, 2) == [0, 1]


def test_the_command_reports_a_bad_setting_in_one_line(files, tmp_path):
    out = subprocess.run([sys.executable, "-m", "eu_jax.unierase.cli", "--config=configs/unierase.py",
                          f"--config.checkpoint={files['a']}", f"--config.forget.path={files['forget']}",
                          f"--config.output={tmp_path / 'run'}", "--config.edit.kl_template={0}{1}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "eu-unierase: error: config.edit.kl_template='{0}{1}' must hold exactly one {} field, where the subject goes "
        "(e.g. '{} is a')"
    )
