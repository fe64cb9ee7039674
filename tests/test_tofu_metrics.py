"""TOFU metrics: probabilities and truth ratios against transformers' PyTorch model on the same tiny
checkpoint, ROUGE-L recall, KS forget quality, truth-ratio summaries and model utility against values
computed by hand."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers

from eu_jax.data.tofu import TofuBenchmark, TofuItem
from eu_jax.eval.model import EvalModel
from eu_jax.eval.tofu import (
    TofuMetricError,
    add_forget_quality,
    evaluate_set,
    evaluate_tofu,
    forget_quality,
    model_utility,
    rouge_l_recall,
    truth_ratio_summary,
)
from eu_jax.parallel.mesh import make_mesh
from tests.tiny_run import make_chat_checkpoint

FICTITIOUS = (
    TofuItem("Where was Ana born?", "Ana was born in Oslo.", "Oslo is where Ana was born.",
             ("Ana was born in Rome.", "Ana was born in Lima.", "Ana was born in Kyiv.")),
    TofuItem("What does Bo write?", "Bo writes poems.", "Poems are what Bo writes.",
             ("Bo writes plays.", "Bo writes novels.")),  # fewer options than the others: ragged is fine
    TofuItem("Who taught Cy?", "His aunt.", "Cy was taught by his aunt.",
             ("His uncle.", "His father.", "A monk.")),
)
FACTS = (
    TofuItem("Capital of Peru?", "Lima", "Lima", ("Quito", "Cusco", "La Paz")),
    TofuItem("Largest planet?", "Jupiter", "Jupiter", ("Saturn", "Mars", "Venus")),
)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
    ckpt = make_chat_checkpoint(tmp_path_factory.mktemp("tofu_metrics"))
    hf = ckpt.parent / "chat_hf"
    return {
        "model": EvalModel.load(ckpt, make_mesh({"data": 2, "fsdp": 4})),
        "torch": transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float64).eval(),
        "tokenizer": transformers.AutoTokenizer.from_pretrained(hf),
    }


def torch_normalised_logp(model, tokenizer, question: str, responses: list[str]) -> np.ndarray:
    """Mean log-probability of each response's tokens (and the end-of-turn token the template writes after
    it) given the question, through the tokenizer's chat template, in float64 PyTorch."""
    user = [{"role": "user", "content": question}]
    prompt_len = len(tokenizer(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False))["input_ids"])
    out = []
    for response in responses:
        text = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        ids = tokenizer(text)["input_ids"]
        assert ids[-1] == tokenizer.eos_token_id and len(ids) == prompt_len + len(response) + 1
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1).numpy()
        targets = np.array(ids[1:])
        out.append(logp[np.arange(prompt_len - 1, len(targets)), targets[prompt_len - 1 :]].mean())
    return np.array(out)


def test_probabilities_and_truth_ratios_match_pytorch(chat):
    results = {name: evaluate_set(chat["model"], name, items, max_new_tokens=4, batch_size=4)
               for name, items in (("forget", FICTITIOUS), ("world_facts", FACTS))}
    for name, items in (("forget", FICTITIOUS), ("world_facts", FACTS)):
        got = results[name]["items"]
        for i, item in enumerate(items):
            answer, paraphrased, *perturbed = torch_normalised_logp(
                chat["torch"], chat["tokenizer"], item.question,
                [item.answer, item.paraphrased_answer, *item.perturbed_answers])
            assert got["answer_probability"][i] == pytest.approx(np.exp(answer), rel=1e-4)
            assert got["paraphrased_probability"][i] == pytest.approx(np.exp(paraphrased), rel=1e-4)
            np.testing.assert_allclose(got["perturbed_probability"][i], np.exp(perturbed), rtol=1e-4)
            # R: geometric mean of the wrong answers' normalised probabilities over the paraphrase's.
            assert got["truth_ratio"][i] == pytest.approx(np.exp(np.mean(perturbed)) / np.exp(paraphrased), rel=1e-4)
            expected = (np.exp(answer) / (np.exp(answer) + np.exp(perturbed).sum()) if name == "world_facts"
                        else np.exp(answer))
            assert got["probability"][i] == pytest.approx(expected, rel=1e-4)
    forget = results["forget"]
    assert forget["probability"] == pytest.approx(np.mean(forget["items"]["probability"]))
    ratios = np.array(forget["items"]["truth_ratio"])
    assert forget["truth_ratio"] == pytest.approx(np.mean(np.minimum(ratios, 1 / ratios)))
    ratios = np.array(results["world_facts"]["items"]["truth_ratio"])
    assert results["world_facts"]["truth_ratio"] == pytest.approx(np.mean(np.maximum(0, 1 - ratios)))


def test_rouge_l_recall_by_hand():
    replies = ["cat ran home quickly", "The cat sits", "Paris", "", "home the cats"]
    answers = ["The cats are running home", "the cats sat", "Paris", "Paris", "the cats home"]
    # Words are lowercased and Porter-stemmed (cats -> cat, running -> run; ran and sat stay):
    # [the cat are run home] vs [cat ran home quickli]: LCS "cat home", 2 of 5 answer words;
    # [the cat sat] vs [the cat sit]: "the cat", 2 of 3; [the cat home] vs [home the cat]: "the cat", 2 of 3.
    np.testing.assert_allclose(rouge_l_recall(replies, answers), [2 / 5, 2 / 3, 1.0, 0.0, 2 / 3])
    with pytest.raises(ValueError):
        rouge_l_recall(["one"], ["one", "two"])


def test_truth_ratio_summaries_by_hand():
    ratios = np.array([0.5, 2.0, 1.0, 0.25])
    assert truth_ratio_summary(ratios, forget=True) == pytest.approx((0.5 + 0.5 + 1 + 0.25) / 4)
    assert truth_ratio_summary(ratios, forget=False) == pytest.approx((0.5 + 0 + 0 + 0.75) / 4)


def test_forget_quality_is_the_ks_p_value():
    # Fully separated samples of 3 and 3: D = 1, and 2 of the C(6, 3) = 20 orderings are that extreme.
    assert forget_quality([1, 2, 3], [4, 5, 6]) == pytest.approx({"p_value": 0.1, "ks_statistic": 1.0})
    assert forget_quality([0.2, 0.7, 0.9], [0.9, 0.2, 0.7]) == pytest.approx({"p_value": 1.0, "ks_statistic": 0.0})
    # Empirical CDFs after 1, 2, 3, 4: 1/4 .. 1 vs 0 below 2.5, 1/3 up to 5: largest gap 1 - 1/3 at 4.
    assert forget_quality([1, 2, 3, 4], [2.5, 5, 6])["ks_statistic"] == pytest.approx(2 / 3)


def test_model_utility_is_the_harmonic_mean_of_nine_values():
    values = {"retain": (0.9, 0.6, 0.5), "real_authors": (0.4, 0.8, 0.7), "world_facts": (0.5, 0.9, 0.6)}
    results = {name: dict(zip(("probability", "rouge_l_recall", "truth_ratio"), v)) for name, v in values.items()}
    results["forget"] = {"probability": 1e-9, "rouge_l_recall": 0.0, "truth_ratio": 0.0}  # not part of utility
    flat = [x for v in values.values() for x in v]
    assert model_utility(results) == pytest.approx(9 / sum(1 / x for x in flat))
    results["world_facts"]["rouge_l_recall"] = 0.0
    assert model_utility(results) == 0.0


def test_evaluate_tofu_end_to_end(chat):
    benchmark = TofuBenchmark(forget=FICTITIOUS, retain=FICTITIOUS[::-1], real_authors=FACTS, world_facts=FACTS[::-1])
    results = evaluate_tofu(chat["model"], benchmark, max_new_tokens=6, batch_size=4, max_items=2)
    json.dumps(results, allow_nan=False)  # JSON-ready
    assert {results[name]["count"] for name in ("forget", "retain", "real_authors", "world_facts")} == {2}
    samples = results["retain"]["samples"]
    assert [s["question"] for s in samples] == [item.question for item in FICTITIOUS[::-1][:2]]
    np.testing.assert_allclose(rouge_l_recall([s["reply"] for s in samples], [s["answer"] for s in samples]),
                               results["retain"]["items"]["rouge_l_recall"])
    nine = [results[n][m] for n in ("retain", "real_authors", "world_facts")
            for m in ("probability", "rouge_l_recall", "truth_ratio")]
    assert results["model_utility"] == pytest.approx(len(nine) / sum(1 / x for x in nine) if min(nine) > 0 else 0.0)

    scored = add_forget_quality(results, results)
    assert scored["forget_quality"] == {"p_value": 1.0, "ks_statistic": 0.0, "reference": chat["model"].name}
    assert "forget_quality" not in results  # the input is left as it was
    other = {**results, "model": "other", "forget": {**results["forget"], "count": 1}}
    with pytest.raises(TofuMetricError, match=r"reference results \(other\) hold 1 forget items and these .* 2: evaluate"):
        add_forget_quality(results, other)


def test_bad_set_names_and_sizes_are_refused(chat):
    with pytest.raises(TofuMetricError, match=r"TOFU set name 'trivia' is not one of \('forget', 'retain'"):
        evaluate_set(chat["model"], "trivia", FACTS)
    with pytest.raises(TofuMetricError, match="TOFU set 'retain' has no items to evaluate"):
        evaluate_set(chat["model"], "retain", ())
    with pytest.raises(TofuMetricError, match="max_items must be >= 0, not -1"):
        evaluate_tofu(chat["model"], TofuBenchmark(FICTITIOUS, FICTITIOUS, FACTS, FACTS), max_items=-1)
