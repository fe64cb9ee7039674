"""TOFU's metrics (Maini et al. 2024) on an `EvalModel`: what a model still knows about the forgotten
authors, and how much it keeps of everything else.

Answer probabilities are normalised by length: P(a|q)^(1/|a|) = exp(-mean NLL) over the answer's tokens
(and its end-of-turn token, as TOFU scores the EOS) given the question through the chat template. Per item:
- probability: of the answer; on real authors and world facts, of the answer divided by the sum over the
  answer and its perturbed (wrong) options;
- ROUGE-L recall of the greedy answer against the reference answer (`rouge-score`, Porter stemmer, as TOFU);
- truth ratio R = (geometric mean of the perturbed answers' normalised probabilities) / (the paraphrased
  answer's normalised probability); near 1 when the model cannot tell the facts from the wrong ones.
Per set, TOFU's summary of R: on the forget set mean(min(R, 1/R)) (closer to 1 is better forgotten), on the
others mean(max(0, 1 - R)) (closer to 1 is better kept).
- model utility: the harmonic mean of the nine values (probability, ROUGE-L, truth ratio) x (retain, real
  authors, world facts): it collapses when any one of them does;
- forget quality: the p-value of a two-sample Kolmogorov-Smirnov test between the forget set's truth ratios
  under the unlearned model and under a retain-reference model (one never trained on the forget authors);
  high means indistinguishable from never having learnt them.

`evaluate_tofu` runs one model on a benchmark (one scoring call and one generation call per set) and
returns a JSON-ready dict; `add_forget_quality` adds the comparison with the reference model's results.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import hmean, ks_2samp

from eu_jax.data.tofu import SET_NAMES, TofuBenchmark, TofuItem
from eu_jax.eval.model import EvalModel
from eu_jax.eval.scoring import response_scores

OPTION_SETS = ("real_authors", "world_facts")  # probability normalised over the answer and its wrong options
UTILITY_SETS = ("retain", "real_authors", "world_facts")
UTILITY_METRICS = ("probability", "rouge_l_recall", "truth_ratio")
SAMPLES_KEPT = 8  # greedy answers stored per set, for reports


class TofuMetricError(ValueError):
    """Results that cannot be combined, named by what differs."""


# ---- per-item and per-set formulas ---------------------------------------------------------------------


def option_probability(answer_logp: np.ndarray, perturbed_logp: np.ndarray) -> np.ndarray:
    """P(answer) / (P(answer) + sum of P(wrong option)) per item, from normalised log-probabilities;
    `perturbed_logp` is [items, options], NaN where an item has fewer options."""
    answer = np.exp(answer_logp)
    return answer / (answer + np.nansum(np.exp(perturbed_logp), axis=1))


def truth_ratio(paraphrased_logp: np.ndarray, perturbed_logp: np.ndarray) -> np.ndarray:
    """R per item: the perturbed answers' geometric-mean normalised probability over the paraphrased one's."""
    return np.exp(np.nanmean(perturbed_logp, axis=1) - paraphrased_logp)


def truth_ratio_summary(ratios: np.ndarray, forget: bool) -> float:
    """TOFU's per-set value: mean(min(R, 1/R)) on the forget set, mean(max(0, 1 - R)) elsewhere."""
    ratios = np.asarray(ratios, np.float64)
    values = np.minimum(ratios, 1 / ratios) if forget else np.maximum(0.0, 1 - ratios)
    return float(values.mean())


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(replies: Sequence[str], answers: Sequence[str]) -> np.ndarray:
    """ROUGE-L recall of each reply against its reference answer: the longest common subsequence of
    (lowercased, stemmed) words over the answer's word count."""
    scorer = _rouge_scorer()
    pairs = zip(replies, answers, strict=True)
    return np.array([scorer.score(answer, reply)["rougeL"].recall for reply, answer in pairs])


def forget_quality(ratios: Sequence[float], reference_ratios: Sequence[float]) -> dict[str, float]:
    """The KS test between the forget set's truth ratios under a model and under the retain reference."""
    test = ks_2samp(np.asarray(ratios, np.float64), np.asarray(reference_ratios, np.float64))
    return {"p_value": float(test.pvalue), "ks_statistic": float(test.statistic)}


def model_utility(set_results: Mapping[str, Mapping[str, Any]]) -> float:
    """The harmonic mean of probability, ROUGE-L recall and truth ratio on retain, real authors, world facts."""
    return float(hmean([set_results[name][metric] for name in UTILITY_SETS for metric in UTILITY_METRICS]))


# ---- running a model -----------------------------------------------------------------------------------


def _normalised_logps(
    model: EvalModel, items: Sequence[TofuItem], batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean per-token log-probabilities of (answers [n], paraphrased answers [n], perturbed [n, max options]
    NaN-padded), from one scoring call over the distinct (question, response) pairs of the set."""
    pairs: dict[tuple[str, str], int] = {}
    for item in items:
        for response in (item.answer, item.paraphrased_answer, *item.perturbed_answers):
            pairs.setdefault((item.question, response), len(pairs))
    scores = response_scores(model, [q for q, _ in pairs], [r for _, r in pairs], batch_size)
    logp = -scores.nll / scores.tokens
    width = max(len(item.perturbed_answers) for item in items)
    perturbed = np.full((len(items), width), np.nan)
    for i, item in enumerate(items):
        perturbed[i, : len(item.perturbed_answers)] = [logp[pairs[item.question, r]] for r in item.perturbed_answers]
    answer = np.array([logp[pairs[item.question, item.answer]] for item in items])
    paraphrased = np.array([logp[pairs[item.question, item.paraphrased_answer]] for item in items])
    return answer, paraphrased, perturbed


def evaluate_set(model: EvalModel, name: str, items: Sequence[TofuItem], max_new_tokens: int = 64,
                 batch_size: int = 16) -> dict[str, Any]:
    """One set's per-item values, TOFU's per-set summaries and a few greedy answers; `name` (one of
    SET_NAMES) picks the probability (option-normalised or not) and the truth-ratio summary."""
    if name not in SET_NAMES:
        raise TofuMetricError(f"TOFU set name '{name}' is not one of {SET_NAMES}")
    if not items:
        raise TofuMetricError(f"TOFU set '{name}' has no items to evaluate")
    answer, paraphrased, perturbed = _normalised_logps(model, items, batch_size)
    probability = option_probability(answer, perturbed) if name in OPTION_SETS else np.exp(answer)
    ratios = truth_ratio(paraphrased, perturbed)
    replies = model.answer([item.question for item in items], max_new_tokens, batch_size)
    rouge = rouge_l_recall(replies, [item.answer for item in items])
    samples = [{"question": item.question, "answer": item.answer, "reply": reply, "rouge_l_recall": float(r)}
               for item, reply, r in zip(items[:SAMPLES_KEPT], replies, rouge)]
    return {
        "count": len(items),
        "probability": float(probability.mean()),
        "rouge_l_recall": float(rouge.mean()),
        "truth_ratio": truth_ratio_summary(ratios, forget=name == "forget"),
        "items": {
            "probability": probability.tolist(),
            "answer_probability": np.exp(answer).tolist(),
            "paraphrased_probability": np.exp(paraphrased).tolist(),
            "perturbed_probability": [np.exp(row[~np.isnan(row)]).tolist() for row in perturbed],
            "truth_ratio": ratios.tolist(),
            "rouge_l_recall": rouge.tolist(),
        },
        "samples": samples,
    }


def evaluate_tofu(model: EvalModel, benchmark: TofuBenchmark, max_new_tokens: int = 64, batch_size: int = 16,
                  max_items: int = 0) -> dict[str, Any]:
    """Every set of the benchmark (the first `max_items` items of each; 0: all, TOFU uses 300) and the
    model utility; add forget quality with `add_forget_quality`."""
    if max_items < 0:
        raise TofuMetricError(f"max_items must be >= 0, not {max_items}")
    results: dict[str, Any] = {"model": model.name, "checkpoint": str(model.checkpoint)}
    for name, items in benchmark.sets().items():
        results[name] = evaluate_set(model, name, items[: max_items or None], max_new_tokens, batch_size)
    results["model_utility"] = model_utility(results)
    return results


def add_forget_quality(results: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """`results` with "forget_quality" against the retain-reference model's `evaluate_tofu` results, which
    must come from the same forget set."""
    count, reference_count = results["forget"]["count"], reference["forget"]["count"]
    if count != reference_count:
        raise TofuMetricError(
            f"the reference results ({reference.get('model')}) hold {reference_count} forget items and these "
            f"({results.get('model')}) {count}: evaluate both on the same forget set"
        )
    quality = forget_quality(results["forget"]["items"]["truth_ratio"], reference["forget"]["items"]["truth_ratio"])
    return {**results, "forget_quality": quality | {"reference": reference.get("model", "")}}
