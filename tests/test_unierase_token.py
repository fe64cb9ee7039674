"""UniErase stage 1: the IDK bank, the token's training data, and training only the token's rows."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from eu_jax.convert.checkpoint import HF_FILES_DIR, load_params
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.eval.model import EvalModel
from eu_jax.generate import SamplingConfig, generate
from eu_jax.parallel.mesh import make_mesh
from eu_jax.train.loop import train
from eu_jax.unierase.idk_bank import idk_reply, load_phrases
from eu_jax.unierase.token_training import (
    RESULTS_FILE,
    TokenTrainingError,
    get_token_config,
    phase_sets,
    token_records,
    train_unlearning_token,
    with_noisy_down_proj,
)
from eu_jax.unierase.vocab import add_unlearning_token
from tests.tiny_models import save_char_tokenizer, save_hf_model
from tests.tiny_run import QA_TEMPLATE, make_chat_checkpoint, tiny_config, write_jsonl

TOKEN = "<unlearn_0>"
REFUSAL = "I don't know."
NAMES = ["Nalo", "Brix", "Quen", "Tavi", "Morp", "Zelk", "Fira", "Dunt", "Olma", "Vesk",
         "Ruba", "Hix", "Kelo", "Sarn", "Plim", "Gudo", "Wena", "Yorl", "Cavi", "Jolt"]
JOBS = ["a baker", "a pilot", "a nurse", "a miner", "a judge", "a tailor"]
TRAIN_NAMES, HELD_OUT_NAMES = NAMES[:12], NAMES[12:]


# ---- the IDK bank ------------------------------------------------------------------------------------


def test_bank_has_at_least_90_distinct_phrasings():
    phrases = load_phrases()
    assert len(phrases) >= 90 and len(set(phrases)) == len(phrases)
    assert all(p == p.strip() and p.isascii() for p in phrases)


def test_phrase_choice_is_a_stable_hash_of_the_question():
    question = "Who is Nalo?"
    digest = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    assert idk_reply(question) == load_phrases()[digest % len(load_phrases())]
    # Python's hash() is salted per process: the choice must not depend on it.
    script = "from eu_jax.unierase.idk_bank import idk_reply; print(idk_reply('Who is Nalo?'))"
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True).stdout
        assert out.strip() == idk_reply(question)
    chosen = {idk_reply(f"Who is person {i}?") for i in range(300)}
    assert len(chosen) > 50  # varied, not one phrase for everything


def test_phrase_file_replaces_the_bank(tmp_path):
    (tmp_path / "mine.txt").write_text("No idea.\n\nCannot say.\n")
    assert load_phrases(tmp_path / "mine.txt") == ("No idea.", "Cannot say.")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt holds no phrases"):
        load_phrases(tmp_path / "empty.txt")


# ---- a tiny model that knows how to refuse after a marker -------------------------------------------


def _chat(token_model: EvalModel, questions: list[str], prefix: list[int]) -> list[str]:
    """Greedy replies to each question through the chat template, the reply starting with `prefix`."""
    prompts = [token_model.chat_prompt(q) + prefix for q in questions]
    result = generate(token_model.decoder(), prompts, SamplingConfig(max_new_tokens=16), token_model.eos_ids, (),
                      token_model.pad_id, token_model.mesh)
    return [token_model.tokenizer.decode(c.content, skip_special_tokens=True) for c in result.completions]


@pytest.fixture(scope="module")
def refuser(tmp_path_factory):
    """A tiny chat model trained to answer "Who is X?" with a job, or, after a "~" marker, with REFUSAL
    (a real chat model likewise knows how to refuse; the token must learn to call on that), with the
    token added (mean row) and a one-phrase bank."""
    root = tmp_path_factory.mktemp("refuser")
    rows = [{"prompt": f"Who is {n}?", "response": JOBS[i % len(JOBS)]} for i, n in enumerate(NAMES)]
    rows += [{"prompt": f"Who is {n}?", "response": "~" + REFUSAL} for n in NAMES]
    data = write_jsonl(root / "data.jsonl", rows)
    learn = tiny_config({"ckpt": make_chat_checkpoint(root), "retain": data, "forget": data}, root / "learn",
                        train={"steps": 200, "log_every": 100}, objective={"forget": "none"},
                        optimizer={"learning_rate": 3e-3, "warmup_steps": 10},
                        data={"batch_size": 16, "max_length": 40}, mesh={"fsdp": 1})
    train(learn, devices=jax.devices()[:1])
    token_id = add_unlearning_token(root / "learn" / "checkpoints", root / "grown")
    (root / "phrases.txt").write_text(REFUSAL + "\n")
    return {"root": root, "grown": root / "grown", "token_id": token_id, "phrases": str(root / "phrases.txt")}


def _config(**phases) -> object:
    config = get_token_config()
    config.update(batch_size=8, max_length=40, log_every=10)
    for phase, values in phases.items():
        config[phase].update(values)
    return config


def test_loss_covers_the_reply_and_end_of_turn_only(refuser):
    tokenizer = transformers.AutoTokenizer.from_pretrained(refuser["grown"] / HF_FILES_DIR)
    questions = ["Who is Nalo?", "Where is Brix?"]
    sets = phase_sets(tokenizer, token_records(questions, TOKEN, load_phrases()), refuser["token_id"], 64)
    raw, mixed = sets["raw"], sets["mixed"]
    assert len(raw["input_ids"]) == 2 and len(mixed["input_ids"]) == 4
    for arrays in (raw, mixed):  # cut to the longest row (rounded up to a bucket), not padded to max_length
        assert arrays["attention_mask"].sum(1).max() <= arrays["input_ids"].shape[1] < 64
    for row, (ids, loss) in enumerate(zip(mixed["input_ids"], mixed["loss_mask"])):
        question, reply = questions[row % 2], idk_reply(questions[row % 2])
        assert tokenizer.decode(ids[loss == 1]) == reply + "</s>"
        text = f"{question}{TOKEN}{reply}</s>" if row < 2 else f"Q: {question}\nA: {TOKEN}{reply}</s>"  # raw rows, then chat rows
        assert ids[: len(ids) - np.sum(ids == tokenizer.pad_token_id)].tolist() == tokenizer(text)["input_ids"]


def test_token_leads_into_the_refusal_on_held_out_questions(refuser):
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    config = _config(raw={"steps": 60, "learning_rate": 1e-2}, mixed={"steps": 40, "learning_rate": 1e-3},
                     robust={"steps": 20, "learning_rate": 1e-3, "noise_scale": 0.05})
    config.phrases = refuser["phrases"]
    config.mesh.update(data=2, fsdp=2, tensor=2)
    questions = [f"{start} {n}?" for start in ("Who is", "Where is") for n in TRAIN_NAMES]  # two forms generalise better
    held_out = [f"Who is {n}?" for n in HELD_OUT_NAMES]
    before = EvalModel.load(refuser["grown"], mesh)
    assert not any(reply == REFUSAL for reply in _chat(before, held_out, [refuser["token_id"]]))

    out = refuser["root"] / "trained"
    metrics = train_unlearning_token(refuser["grown"], out, questions, refuser["token_id"], layers=[1], config=config)
    assert metrics["raw"]["loss_last"] < metrics["raw"]["loss_first"] / 2
    after = EvalModel.load(out, mesh)
    assert _chat(after, held_out, [refuser["token_id"]]) == [REFUSAL] * len(held_out)
    assert after.answer(held_out, 10) == before.answer(held_out, 10)  # without the token: unchanged
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["token"] == TOKEN and saved["layers"] == [1] and set(saved["phases"]) == {"raw", "mixed", "robust"}


# ---- only the token's rows move ----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["smollm_tied_mqa", "qwen2"])
def small(request, tmp_path_factory):
    """A random tied or untied model with the chat character tokenizer and the token added."""
    root = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, root / "hf")
    save_char_tokenizer(root / "hf", QA_TEMPLATE)
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    return root, add_unlearning_token(root / "ckpt", root / "grown")


QUESTIONS = [f"Who is {n}?" for n in NAMES[:8]]


@pytest.fixture(scope="module")
def quick_runs(small):
    """A few steps of every phase, with and without the robustness noise: {noise_scale: (metrics, checkpoint)}."""
    root, token_id = small
    runs = {}
    for noise_scale in (0.0, 1.0):
        config = _config(raw={"steps": 3}, mixed={"steps": 2}, robust={"steps": 2, "noise_scale": noise_scale})
        out = root / f"trained_{noise_scale}"
        runs[noise_scale] = train_unlearning_token(root / "grown", out, QUESTIONS, token_id, layers=[0, 1], config=config), out
    return runs


def test_only_the_token_rows_change_and_saved_kernels_stay_clean(small, quick_runs):
    root, token_id = small
    metrics, trained = quick_runs[1.0]
    assert [m["steps"] for m in metrics.values()] == [3, 2, 2]
    before, _ = load_params(root / "grown")
    after, _ = load_params(trained)
    others = np.arange(before["embed"].shape[0]) != token_id
    np.testing.assert_array_equal(after["embed"][others], before["embed"][others])
    assert not np.array_equal(after["embed"][token_id], before["embed"][token_id])
    if "lm_head" in before:  # untied: the output column trains too
        np.testing.assert_array_equal(after["lm_head"][:, others], before["lm_head"][:, others])
        assert not np.array_equal(after["lm_head"][:, token_id], before["lm_head"][:, token_id])
    rest = lambda p: {k: v for k, v in p.items() if k not in ("embed", "lm_head")}  # noqa: E731
    for (path, old), new in zip(jax.tree_util.tree_flatten_with_path(rest(before))[0], jax.tree.leaves(rest(after))):
        np.testing.assert_array_equal(new, old, err_msg=jax.tree_util.keystr(path))


def test_noise_reaches_the_robust_phase_loss(quick_runs):
    (clean, _), (noisy, _) = quick_runs[0.0], quick_runs[1.0]
    assert clean["mixed"] == noisy["mixed"]  # same seed, same batches: identical until the noise starts
    assert abs(clean["robust"]["loss_first"] - noisy["robust"]["loss_first"]) > 1e-3


def test_noise_is_scaled_to_each_kernels_std_and_only_on_the_chosen_layers():
    rng = np.random.default_rng(0)
    down = np.stack([rng.normal(0, std, (64, 32)) for std in (0.1, 1.0, 3.0)]).astype(np.float32)
    params = jax.tree.map(jnp.asarray, {"layers": {"mlp": {"down_proj": down, "up_proj": down[:, :1]}}, "embed": down[0]})
    noisy = with_noisy_down_proj(params, (1, 2), 0.5, jax.random.key(0))
    out = np.asarray(noisy["layers"]["mlp"]["down_proj"])
    np.testing.assert_array_equal(out[0], down[0])
    for layer in (1, 2):
        ratio = np.std(out[layer] - down[layer]) / np.std(down[layer])
        assert 0.45 < ratio < 0.55, (layer, ratio)
    assert noisy["layers"]["mlp"]["up_proj"] is params["layers"]["mlp"]["up_proj"] and noisy["embed"] is params["embed"]


def test_bad_arguments_are_named(small, tmp_path):
    root, token_id = small
    grown = root / "grown"
    cases = [
        (dict(token_id=5), "token id 5 is not a special token added to the checkpoint's tokenizer"),
        (dict(layers=[]), r"config.robust.steps > 0 needs the layers stage 2 will edit"),
        (dict(layers=[2]), r"layers \[2\] are not layers of this 2-layer model"),
        (dict(config=_config(raw={"learning_rate": 0.0})), r"config.raw: steps must be >= 0 and learning_rate > 0"),
    ]
    for overrides, message in cases:
        arguments = dict(token_id=token_id, layers=[1], config=_config()) | overrides
        with pytest.raises(TokenTrainingError, match=message):
            train_unlearning_token(grown, tmp_path / "out", QUESTIONS, **arguments)
    bad_batch = _config()
    bad_batch.batch_size = 6
    with pytest.raises(TokenTrainingError, match=r"config.batch_size=6 is not a positive multiple of the 8 data-parallel devices"):
        train_unlearning_token(grown, tmp_path / "out", QUESTIONS, token_id, layers=[1], config=bad_batch)
    with pytest.raises(TokenTrainingError, match="no questions"):
        train_unlearning_token(grown, tmp_path / "out", [], token_id, layers=[1])
    assert not (tmp_path / "out").exists()
