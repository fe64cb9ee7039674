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
    """jit(params, ids, attention, loss_mask) -> [4, B] sums of -log p(target), KL(U||p), H(p), count."""
    fns = {"logp": target_logprob, "kl": kl_to_uniform, "entropy": entropy}

    @jax.jit
    def row_sums(params, ids, attention, loss_mask):
        model = build_decoder(config, params)
        out = model(ids, attention, return_logits=False)
        stats = chunked_token_stats(
            fns, out.hidden[:, :-1], model.unembed_kernel(), ids[:, 1:], chunk_tokens=chunk_tokens, stat_rows=forward_stat_rows()
        )
        mask = (loss_mask[:, 1:] * attention[:, 1:]).astype(jnp.float32)
        return jnp.stack([(-stats["logp"] * mask).sum(1), (stats["kl"] * mask).sum(1), (stats["entropy"] * mask).sum(1), mask.sum(1)])

    return row_sums


def _batch_shards(model: EvalModel) -> int:
    return int(np.prod([model.mesh.shape[a] for a in BATCH_AXES if a in model.mesh.shape]))


def score_encoded(model: EvalModel, encoded: Sequence[Encoded], batch_size: int = 16, chunk_tokens: int = 1024) -> ExampleScores:
    """Scores of token sequences with their loss masks, in batches of similar length.

    Sequences are sorted by length and padded to bucket lengths (four per doubling), so a set compiles a few
    shapes; rows are padded to a multiple of the mesh's data-parallel size with empty rows.
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
        arrays = np.zeros((3, rows, width), np.int32)  # ids, attention, loss mask
        for row, i in enumerate(chosen):
            n = len(encoded[i])
            arrays[0, row, :n], arrays[1, row, :n], arrays[2, row, :n] = encoded[i].ids, 1, encoded[i].loss
        with activation_sharding(model.mesh):
            out = fn(model.params, *(to_global(a, sharding) for a in arrays))
        sums[:, chosen] = to_host(out)[:, : len(chosen)]
    return ExampleScores(*sums[:3], tokens=sums[3])


def score_records(model: EvalModel, records: Sequence[Record], batch_size: int = 16) -> ExampleScores:
    """Scores of records (pairs, chats or text) encoded as training encodes them, without truncation."""
    return score_encoded(model, Encoder(model.tokenizer).encode_many(list(records)), batch_size)


def response_scores(model: EvalModel, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 16) -> ExampleScores:
    """Scores of each response as the assistant's reply to its prompt (the prompt is context, not scored)."""
    records = [Record(where=f"response {i}", prompt=p, response=r) for i, (p, r) in enumerate(zip(prompts, responses))]
    return score_records(model, records, batch_size)
