"""Teacher-forced eval statistics vs transformers' PyTorch model; greedy answers independent of batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from eu_jax.data import Encoder, Record
from eu_jax.eval.model import EvalModel
from eu_jax.eval.scoring import response_scores, score_records
from eu_jax.parallel.mesh import make_mesh, single_device_mesh
from tests.tiny_run import make_chat_checkpoint, make_tiny_run

TEXTS = ["short", "a somewhat longer text of many characters", "mid-size line!", "x" * 70, "q"]
# Prompts and replies of unrelated lengths: batches of two mix 62 and 15 scored tokens, or pair a long
# prompt with a short reply, so the scored positions gathered for the output head differ row by row.
PAIRS = [
    ("Who is 01?", "Person 01."),
    ("a much longer prompt than the other one, with many more characters in it", "ok"),
    ("5", "a reply that is much longer than its prompt, by a good margin"),
    ("mid-size question here?", "yes"),
    ("q", "r"),
    ("what is the capital city of some far-away country?", "It is far away"),
    ("Why?", "Because the sky is blue."),
]
RECORDS = {
    "texts": [Record(where=f"t{i}", text=t) for i, t in enumerate(TEXTS)],  # every token scored
    "pairs": [Record(where=f"p{i}", prompt=p, response=r) for i, (p, r) in enumerate(PAIRS)],  # replies only
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("eval_scoring"))


def torch_sums(hf_dir, encoded):
    """Per-example NLL, KL(U||p) and entropy sums over scored targets, computed in PyTorch."""
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float64).eval()
    rows = []
    for enc in encoded:
        with torch.no_grad():
            logits = model(torch.tensor(enc.ids[None].astype(np.int64))).logits[0, :-1]
        logp = torch.log_softmax(logits, -1).numpy()
        targets, mask = enc.ids[1:], enc.loss[1:].astype(bool)
        nll = -logp[np.arange(len(targets)), targets]
        kl = -np.log(logp.shape[-1]) - logp.mean(-1)
        ent = -(np.exp(logp) * logp).sum(-1)
        rows.append([nll[mask].sum(), kl[mask].sum(), ent[mask].sum(), mask.sum()])
    return np.array(rows).T


@pytest.mark.parametrize("kind", sorted(RECORDS))
@pytest.mark.parametrize("mesh_spec", [None, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_scores_match_pytorch(tiny, mesh_spec, kind):
    mesh = single_device_mesh() if mesh_spec is None else make_mesh(mesh_spec)
    model = EvalModel.load(tiny["ckpt"], mesh)
    records = RECORDS[kind]
    scores = score_records(model, records, batch_size=2)  # several batches and widths, a ragged last one
    encoded = Encoder(model.tokenizer).encode_many(records)
    expected = torch_sums(tiny["ckpt"].parent / "hf", encoded)
    if kind == "pairs":  # the prompt is context only: BOS and prompt are never scored
        assert np.all(expected[3] < [len(e) - 1 for e in encoded])
    np.testing.assert_allclose(scores.tokens, expected[3])
    for i, name in enumerate(("nll", "kl_uniform", "entropy")):
        np.testing.assert_allclose(getattr(scores, name), expected[i], rtol=2e-4, atol=1e-3, err_msg=name)
    assert scores.token_mean("nll") == pytest.approx(expected[0].sum() / expected[3].sum(), rel=2e-4)
    assert np.all(scores.kl_uniform > 0) and np.all(scores.entropy < scores.tokens * np.log(256))


def test_response_scores_count_only_the_response(tiny):
    model = EvalModel.load(tiny["ckpt"], single_device_mesh())
    a = response_scores(model, ["Who is 01?", "a much longer prompt than the other one"], ["Person 01.", "Person 01."])
    # The char tokenizer has no template: [BOS] prompt response EOS, scoring the response and EOS.
    np.testing.assert_array_equal(a.tokens, [len("Person 01.") + 1] * 2)
    assert a.perplexity()[0] != pytest.approx(a.perplexity()[1])  # the prompt conditions the response


@pytest.mark.parametrize("chat", [False, True])
def test_response_scores_without_the_closing_token(tiny, chat):
    """The judge's fluency scores: the reply's text alone, without the EOS (no template) or the template's
    end-of-turn token ("</s>" in QA_TEMPLATE) that closes it."""
    root = tiny["ckpt"].parent
    checkpoint = make_chat_checkpoint(root) if chat else tiny["ckpt"]
    model = EvalModel.load(checkpoint, single_device_mesh())
    prompts, replies = ["Who is 01?", "5"], ["Person 01.", "a reply cut off at the tok"]
    text_only = response_scores(model, prompts, replies, end_of_turn=False)
    np.testing.assert_array_equal(text_only.tokens, [len(r) for r in replies])
    encoded = Encoder(model.tokenizer).encode_many([Record(where="", prompt=p, response=r) for p, r in zip(prompts, replies)])
    for e in encoded:  # the closing token is the last scored one, and special
        last = np.flatnonzero(e.loss)[-1]
        assert model.tokenizer.convert_ids_to_tokens(int(e.ids[last])) == "</s>"
        e.loss[last] = 0
    expected = torch_sums(root / ("chat_hf" if chat else "hf"), encoded)
    np.testing.assert_allclose(text_only.nll, expected[0], rtol=2e-4)
    whole = response_scores(model, prompts, replies)
    assert np.all(whole.tokens == text_only.tokens + 1) and np.all(whole.nll > text_only.nll)


def test_answers_do_not_depend_on_batching(tiny):
    model = EvalModel.load(tiny["ckpt"], make_mesh({"data": 2, "fsdp": 4}))
    prompts = ["01+01=", "Who is 07?", "a longer prompt, to pad others", "5"]
    together = model.answer(prompts, max_new_tokens=6, batch_size=3)
    alone = [model.answer([p], max_new_tokens=6)[0] for p in prompts]
    assert together == alone
    assert any(together)  # a random model still writes something
