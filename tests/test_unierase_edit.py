"""UniErase stage 2: null-space-projected closed-form edits of down_proj.

The edit is checked against independent NumPy algebra (the closed form and its null-space property),
against the parameters themselves (only the edited layers' down_proj moves), and end to end on a tiny
model that first learns made-up facts: the edited questions then predict the target token while the
answers to the others keep their probabilities.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from eu_jax.data import Encoder, Record
from eu_jax.eval.model import EvalModel
from eu_jax.parallel.mesh import single_device_mesh
from eu_jax.train.loop import train
from eu_jax.unierase.covariance import cached_key_second_moments, checkpoint_fingerprint, key_second_moments, null_space_projector
from eu_jax.unierase.edit import Editor, EditState, _closed_form, default_edit_layers, get_edit_config, parse_layers, sample_context_prefixes
from eu_jax.unierase.requests import EditEncoder, EditRequest
from eu_jax.unierase.tracing import run_layers
from eu_jax.unierase.vocab import add_unlearning_token
from tests.tiny_run import make_chat_checkpoint, tiny_config, write_jsonl

NAMES = ["Nalo", "Brix", "Quen", "Tavi", "Morp", "Zelk", "Fira", "Dunt", "Olma", "Vesk",
         "Ruba", "Hix", "Kelo", "Sarn", "Plim", "Gudo", "Wena", "Yorl", "Cavi", "Jolt"]
JOBS = ["a baker", "a pilot", "a nurse", "a miner", "a judge", "a tailor"]
FACTS = [(f"Who is {name}?", JOBS[i % len(JOBS)]) for i, name in enumerate(NAMES)]
FORGET, RETAIN = FACTS[:3], FACTS[3:]
TARGET = "<unlearn_0>"  # added to the trained model's vocabulary (stage 1's first step); its row is the mean


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> EvalModel:
    """A 4-layer tiny Llama (wide MLP, so retained keys leave a null space) trained on the facts, with the
    unlearning token added."""
    root = tmp_path_factory.mktemp("unierase_edit")
    data = write_jsonl(root / "facts.jsonl", [{"prompt": q, "response": a} for q, a in FACTS])
    ckpt = make_chat_checkpoint(root, num_hidden_layers=4, intermediate_size=512)
    config = tiny_config({"ckpt": ckpt, "retain": data, "forget": data}, root / "learn",
                         train={"steps": 300, "log_every": 300}, objective={"forget": "none"},
                         optimizer={"learning_rate": 3e-3, "warmup_steps": 20},
                         data={"batch_size": 16, "max_length": 32}, mesh={"fsdp": 1})
    train(config, devices=jax.devices()[:1])
    add_unlearning_token(root / "learn" / "checkpoints", root / "with_token", TARGET)
    return EvalModel.load(root / "with_token", single_device_mesh())


def _retained_corpus(model: EvalModel):
    return Encoder(model.tokenizer).encode_many([Record(where=q, prompt=q, response=a) for q, a in RETAIN])


def _editor(model: EvalModel, layers: list[int], **overrides) -> Editor:
    cfg = get_edit_config()
    cfg.update(overrides)
    moments, _ = key_second_moments(model.config, model.params, model.mesh, _retained_corpus(model), layers)
    projectors = np.stack([null_space_projector(m, cfg.nullspace_energy)[0] for m in moments])
    return Editor(model.config, model.params, model.tokenizer, model.mesh, cfg, projectors,
                  EditState.empty(layers, model.config.intermediate_size))


def test_closed_form_matches_numpy_and_lies_in_the_null_space():
    rng = np.random.default_rng(0)
    f, d = 12, 5
    retained = rng.normal(size=(40, 6)) @ rng.normal(size=(6, f))  # retained keys span 6 of 12 dimensions
    projector, null_dim = null_space_projector(retained.T @ retained / len(retained), 1e-6)
    assert null_dim == f - 6
    keys, residual = rng.normal(size=(3, f)), rng.normal(size=(3, d))
    previous = (lambda k: k.T @ k)(rng.normal(size=(2, f)))
    update = np.asarray(_closed_form(projector, keys.astype(np.float32), previous.astype(np.float32),
                                     residual.astype(np.float32), 0.5))
    p = projector.astype(np.float64)
    expected = np.linalg.solve(p @ (keys.T @ keys + previous) + 0.5 * np.eye(f), p @ keys.T @ residual)
    np.testing.assert_allclose(update, expected, rtol=1e-3, atol=1e-4)
    assert np.abs(retained @ update).max() < 1e-3 * np.abs(keys @ update).max()  # retained keys see no change


def test_the_null_space_holds_at_most_the_given_share_of_retained_energy():
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    values = np.array([0.001, 0.002, 0.007, 0.09, 0.4, 0.5])  # shares of a total of 1.0
    moments = basis @ np.diag(values) @ basis.T
    for energy, dims in ((0.0005, 0), (0.003, 2), (0.01, 3), (0.2, 4)):
        projector, null_dim = null_space_projector(moments, energy)
        assert null_dim == dims
        np.testing.assert_allclose(projector, basis[:, :dims] @ basis[:, :dims].T, atol=1e-6)


def test_layer_bands_scale_with_depth_per_position_and_bad_layers_are_named():
    assert default_edit_layers(32) == [4, 5, 6, 7, 8]
    assert default_edit_layers(30) == [4, 5, 6, 7, 8]
    assert default_edit_layers(16) == [2, 3, 4]
    assert default_edit_layers(2) == [0]
    # At the prompt's end the question's content arrives late: a band in the last third, never the last layer.
    assert default_edit_layers(30, "prompt_end") == [22, 23, 24, 25, 26]
    assert default_edit_layers(32, "prompt_end") == [23, 24, 25, 26, 27, 28]
    assert default_edit_layers(4, "prompt_end") == [2]
    assert parse_layers("", 30, "prompt_end") == [22, 23, 24, 25, 26] and parse_layers("", 30) == [4, 5, 6, 7, 8]
    with pytest.raises(ValueError, match="edit position 'middle'"):
        default_edit_layers(30, "middle")
    assert parse_layers("3,1", 4) == [1, 3]
    with pytest.raises(ValueError, match=r"must be in \[0, 3\]"):
        parse_layers("4", 4)


def test_edit_positions_point_at_the_subject_and_the_prompt_end(learned):
    tok = learned.tokenizer
    request = EditRequest(prompt="Who is Nalo?", target=TARGET, subject="Nalo")
    batch = EditEncoder(tok).encode([request], ["", "Hi. "], "{} is a")
    for row, prefix in enumerate(["", "Hi. "]):  # the lookup token is Nalo's last letter, the target follows the prompt
        ids = batch.ids[row][batch.attention[row] == 1]
        assert tok.decode([ids[batch.lookup[row]]]) == "o"
        rendered = tok.apply_chat_template([{"role": "user", "content": prefix + request.prompt}], tokenize=False, add_generation_prompt=True)
        assert ids[: batch.target_positions[row, 0] + 1].tolist() == tok(rendered)["input_ids"]  # with the BOS training uses
        assert tok.decode([batch.targets[row, 0]]) == TARGET
    essence = batch.ids[2][batch.attention[2] == 1]
    assert tok.decode(essence[batch.lookup[2] - 3 : batch.lookup[2] + 1]) == "Nalo" and batch.essence[2] == 1
    longer = EditRequest(prompt="Who is Nalos?", target=TARGET, subject="Nalos")  # rounds of one size compile once:
    assert EditEncoder(tok).encode([longer], ["", "Hi. "], "{} is a").ids.shape == batch.ids.shape  # bucketed rows
    end = EditEncoder(tok, position="prompt_end").encode([request], [""], "{} is a")
    assert end.lookup[0] == end.target_positions[0, 0]
    with pytest.raises(ValueError, match="'Bob' does not appear"):
        EditEncoder(tok).encode([EditRequest(prompt="Who is Nalo?", target=TARGET, subject="Bob")], [""], "{}")


def test_an_edit_makes_forget_questions_say_the_target_and_keeps_the_rest(learned):
    layers = [1, 2]
    editor = _editor(learned, layers, position="prompt_end", contexts={"count": 0, "length": 0, "seed": 0})
    editor.cfg.target.steps = 100
    forget = [EditRequest(prompt=q, target=TARGET) for q, _ in FORGET]
    retain = [EditRequest(prompt=q, target=a) for q, a in RETAIN]  # NLL of each true answer
    retain_before = editor.target_nll(retain)
    assert np.all(editor.target_nll(forget) > 5)

    params = editor.edit(forget)
    assert np.all(editor.target_nll(forget) < np.log(2)), editor.state.log  # the target is now the likeliest token
    np.testing.assert_allclose(editor.target_nll(retain), retain_before, atol=0.05)

    before = jax.tree_util.tree_leaves_with_path(learned.params)
    after = dict(jax.tree_util.tree_leaves_with_path(params))
    changed = {jax.tree_util.keystr(path) for path, leaf in before if not np.array_equal(np.asarray(leaf), np.asarray(after[path]))}
    assert changed == {"['layers']['mlp']['down_proj']"}
    down_before, down_after = np.asarray(learned.params["layers"]["mlp"]["down_proj"]), np.asarray(params["layers"]["mlp"]["down_proj"])
    moved = [i for i in range(learned.config.num_layers) if not np.array_equal(down_before[i], down_after[i])]
    assert moved == layers
    assert editor.state.rounds == 1 and np.abs(editor.state.previous).sum() > 0


def test_retained_keys_see_no_output_change(learned):
    """With fewer retained tokens (478) than key dimensions (512) and an energy share near zero, the null space is
    exact: the retained tokens' down_proj outputs (so all the retained texts compute) stay put to float precision."""
    layers = [1]
    editor = _editor(learned, layers, position="prompt_end", contexts={"count": 0, "length": 0, "seed": 0}, nullspace_energy=1e-9)
    editor.edit([EditRequest(prompt=q, target=TARGET) for q, _ in FORGET])
    corpus = _retained_corpus(learned)
    ids = np.zeros((len(corpus), max(len(e) for e in corpus)), np.int32)
    mask = np.zeros_like(ids)
    for row, e in enumerate(corpus):
        ids[row, : len(e)], mask[row, : len(e)] = e.ids, 1
    model = learned.decoder()
    inputs = model.prepare(ids, mask)
    _, keys = run_layers(model, inputs, inputs.x, 0, 2, key_layers=(1,))
    real = np.asarray(keys[1])[mask == 1]
    delta = np.asarray(editor.params["layers"]["mlp"]["down_proj"][1]) - np.asarray(learned.params["layers"]["mlp"]["down_proj"][1])
    assert np.linalg.norm(delta) > 1.0
    assert np.abs(real @ delta).max() < 1e-3 * np.abs(real @ np.asarray(learned.params["layers"]["mlp"]["down_proj"][1])).max()


def test_moments_are_cached_and_context_prefixes_come_from_the_model(learned, tmp_path):
    corpus, layers = _retained_corpus(learned), [0, 2]
    fingerprint = checkpoint_fingerprint(learned.checkpoint)
    first, count = cached_key_second_moments(fingerprint, learned.config, learned.params, learned.mesh, corpus, layers, cache_dir=tmp_path)
    assert count == sum(len(e) for e in corpus) and first.shape == (2, 512, 512)
    again, _ = cached_key_second_moments(fingerprint, learned.config, {}, learned.mesh, corpus, layers, cache_dir=tmp_path)  # no params: read back
    np.testing.assert_array_equal(first, again)
    prefixes = sample_context_prefixes(learned.decoder(), learned.tokenizer, learned.mesh, count=3, length=5, seed=0)
    assert prefixes[0] == "" and len(prefixes) == 4 and all(p.endswith(". ") for p in prefixes[1:])
    assert prefixes == sample_context_prefixes(learned.decoder(), learned.tokenizer, learned.mesh, count=3, length=5, seed=0)


def test_replies_only_moments_count_the_reply_keys_alone(learned, tmp_path):
    """The refusals' moments (UniErase keeps the token's continuation out of the edit's reach) count only the
    tokens the loss mask marks: the same as E[k k^T] over those positions' keys, and cached apart."""
    corpus, layers = _retained_corpus(learned)[:4], [1]
    moments, count = key_second_moments(learned.config, learned.params, learned.mesh, corpus, layers, replies_only=True)
    assert count == sum(int(e.loss.sum()) for e in corpus) < sum(len(e) for e in corpus)
    model = learned.decoder()
    picked = []
    for e in corpus:
        ids = np.asarray(e.ids, np.int32)[None]
        inputs = model.prepare(ids, np.ones_like(ids))
        keys = np.asarray(run_layers(model, inputs, inputs.x, 0, 2, (1,))[1][1][0], np.float64)
        picked.append(keys[np.asarray(e.loss) == 1])
    keys = np.concatenate(picked)
    np.testing.assert_allclose(moments[0], keys.T @ keys / len(keys), rtol=1e-3, atol=1e-5)
    fingerprint = checkpoint_fingerprint(learned.checkpoint)
    everything, _ = cached_key_second_moments(fingerprint, learned.config, learned.params, learned.mesh, corpus, layers, cache_dir=tmp_path)
    replies, _ = cached_key_second_moments(fingerprint, learned.config, learned.params, learned.mesh, corpus, layers, cache_dir=tmp_path,
                                           replies_only=True)
    assert not np.allclose(everything, replies)
    np.testing.assert_allclose(replies, moments, rtol=1e-5, atol=1e-7)
