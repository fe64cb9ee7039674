"""Teacher-forced statistics of a model on given texts: NLL, KL to uniform and entropy per example.

These are the distribution-level views of forgetting: a model that has forgotten a text assigns it a
high NLL, and Exclusive Unlearning's target is a next-token distribution near uniform (KL(U || p) -> 0,
entropy -> log V) on everything outside the retain domain. Only the tokens a record scores count
(assistant replies for chats, every token for raw text). Computed in vocabulary chunks and sharded
over the batch like the train step.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eu_jax.data import Encoder, Record
from eu_jax.data.chat import Encoded
from eu_jax.eval.model import EvalModel
from eu_jax.generate import bucket_length
from eu_jax.models.config import ModelConfig
from eu_jax.models.state import build_decoder
from eu_jax.objectives.token_stats import chunked_token_stats, entropy, forward_stat_rows, kl_to_uniform, target_logprob
from eu_jax.parallel.sharding import BATCH_AXES, activation_sharding, batch_sharding, to_global, to_host

STATISTICS = ("nll", "kl_uniform", "entropy")
# The smallest bucket of scored positions per row: a probe's or math answer's 2-5 tokens pad to 8, where
# the prompts' bucket floor of 32 would project four times as many.
MIN_SCORED_BUCKET = 8


@dataclass(frozen=True)
class ExampleScores:
    """Per-example sums over scored tokens (`nll`, `kl_uniform`, `entropy`) and the token counts."""

    nll: np.ndarray
    kl_uniform: np.ndarray
    entropy: np.ndarray
    tokens: np.ndarray

    def token_mean(self, name: str) -> float:
        """The statistic averaged over all scored tokens of all examples."""
        return float(getattr(self, name).sum() / max(self.tokens.sum(), 1))

    def example_mean(self, name: str) -> np.ndarray:
        """The statistic averaged over each example's own tokens (NaN for an example with none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return getattr(self, name) / self.tokens

    def perplexity(self) -> np.ndarray:
        """exp(mean NLL) of each example."""
        return np.exp(self.example_mean("nll"))

    def summary(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}{name}": self.token_mean(name) for name in STATISTICS} | {f"{prefix}tokens": int(self.tokens.sum())}


@lru_cache(maxsize=8)
def _row_sums(config: ModelConfig, chunk_tokens: int):
    """jit(params, ids, attention, positions, valid) -> [4, B] sums of -log p(target), KL(U||p), H(p), count.

    `positions` [B,K] are the scored next-token positions (into the T-1 of `ids[:, 1:]`), `valid` marks the
    real ones: only they are projected onto the vocabulary, so prompt positions never meet the output head.
    """
    fns = {"logp": target_logprob, "kl": kl_to_uniform, "entropy": entropy}

    @jax.jit
    def row_sums(params, ids, attention, positions, valid):
        model = build_decoder(config, params)
        out = model(ids, attention, return_logits=False)
        hidden = jnp.take_along_axis(out.hidden[:, :-1], positions[:, :, None], axis=1)
        targets = jnp.take_along_axis(ids[:, 1:], positions, axis=1)
        stats = chunked_token_stats(
            fns, hidden, model.unembed_kernel(), targets, chunk_tokens=chunk_tokens, stat_rows=forward_stat_rows()
        )
        mask = valid.astype(jnp.float32)
        return jnp.stack([(-stats["logp"] * mask).sum(1), (stats["kl"] * mask).sum(1), (stats["entropy"] * mask).sum(1), mask.sum(1)])

    return row_sums


def _batch_shards(model: EvalModel) -> int:
    return int(np.prod([model.mesh.shape[a] for a in BATCH_AXES if a in model.mesh.shape]))


def score_encoded(model: EvalModel, encoded: Sequence[Encoded], batch_size: int = 16, chunk_tokens: int = 1024) -> ExampleScores:
    """Scores of token sequences with their loss masks, in batches of similar length.

    Sequences are sorted by length and padded to bucket lengths (four per doubling), so a set compiles a few
    shapes; rows are padded to a multiple of the mesh's data-parallel size with empty rows. Only the scored
    positions meet the output head, gathered and padded to a bucket too: a prompt, most of a short
    answer's row, is never projected onto the vocabulary.
    """
    if not encoded:
        raise ValueError("nothing to score: the set is empty")
    rows = -(-batch_size // _batch_shards(model)) * _batch_shards(model)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    sums = np.zeros((4, len(encoded)), np.float64)
    fn, sharding = _row_sums(model.config, chunk_tokens), batch_sharding(model.mesh)
    for start in range(0, len(order), rows):
        chosen = order[start : start + rows]
        width = bucket_length(max(len(encoded[i]) for i in chosen))
        tokens = np.zeros((2, rows, width), np.int32)  # ids, attention
        scored = [np.flatnonzero(encoded[i].loss[1:]) for i in chosen]  # all within attention
        k = min(bucket_length(max(len(s) for s in scored), MIN_SCORED_BUCKET), width - 1)
        picks = np.zeros((2, rows, k), np.int32)  # scored positions into ids[:, 1:], valid
        for row, i in enumerate(chosen):
            n, m = len(encoded[i]), len(scored[row])
            tokens[0, row, :n], tokens[1, row, :n] = encoded[i].ids, 1
            picks[0, row, :m], picks[1, row, :m] = scored[row], 1
        with activation_sharding(model.mesh):
            out = fn(model.params, *(to_global(a, sharding) for a in (*tokens, *picks)))
        sums[:, chosen] = to_host(out)[:, : len(chosen)]
    return ExampleScores(*sums[:3], tokens=sums[3])


def score_records(model: EvalModel, records: Sequence[Record], batch_size: int = 16) -> ExampleScores:
    """Scores of records (pairs, chats or text) encoded as training encodes them, without truncation."""
    return score_encoded(model, Encoder(model.tokenizer).encode_many(list(records)), batch_size)


def response_scores(
    model: EvalModel, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16, end_of_turn: bool = True
) -> ExampleScores:
    """Scores of each response as the assistant's reply to its prompt (the prompt is context, not scored).

    `end_of_turn=False` leaves out the special token that closes the reply (the template's end-of-turn or the
    appended EOS), scoring the reply's text alone: a reply cut off at a token limit is then not charged for
    the unlikely end the encoding gives it (the judge's fluency test).
    """
    records = [Record(where=f"response {i}", prompt=p, response=r) for i, (p, r) in enumerate(zip(prompts, responses))]
    return score_encoded(model, Encoder(model.tokenizer, score_turn_end=end_of_turn).encode_many(records), batch_size)
