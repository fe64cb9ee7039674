"""The built-in evaluation hook: held-out NLL on retain and forget sets, every `train.eval_every` steps.

The full metric suite (accuracy, attack success, KL to uniform, ...) plugs in through the same
`(params, step) -> {name: value}` callable.
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from eu_jax.models.config import ModelConfig, RuntimeOptions
from eu_jax.models.state import Params, build_decoder
from eu_jax.objectives.token_stats import chunked_token_stats, forward_stat_rows, target_logprob


def _pad_rows(array: np.ndarray, multiple: int) -> np.ndarray:
    extra = -len(array) % multiple
    return np.concatenate([array, np.zeros((extra,) + array.shape[1:], array.dtype)]) if extra else array


def make_nll_eval(
    config: ModelConfig,
    options: RuntimeOptions,
    sets: Mapping[str, Mapping[str, np.ndarray]],
    rows_per_forward: int,
    sharding: NamedSharding,
    chunk_tokens: int = 1024,
) -> Callable[[Params, int], dict[str, float]]:
    """Token-weighted NLL of each named set, over all its examples, `rows_per_forward` rows at a time."""

    @jax.jit
    def nll_sums(params, ids, attention, loss_mask):
        model = build_decoder(config, params, options)
        out = model(ids, attention, return_logits=False)
        logp = chunked_token_stats(
            {"logp": target_logprob}, out.hidden[:, :-1], model.unembed_kernel(), ids[:, 1:],
            chunk_tokens=chunk_tokens, stat_rows=forward_stat_rows(),
        )["logp"]
        mask = (loss_mask[:, 1:] * attention[:, 1:]).astype(jnp.float32)
        return -(logp * mask).sum(), mask.sum()

    # Pad every set to whole batches with empty rows (no attention, no loss): they count for nothing.
    padded = {name: {k: _pad_rows(a, rows_per_forward) for k, a in arrays.items()} for name, arrays in sets.items()}

    def evaluate(params: Params, step: int) -> dict[str, float]:
        results = {}
        for name, arrays in padded.items():
            total, count = 0.0, 0.0
            for start in range(0, len(arrays["input_ids"]), rows_per_forward):
                rows = slice(start, start + rows_per_forward)
                batch = [jax.device_put(arrays[k][rows], sharding) for k in ("input_ids", "attention_mask", "loss_mask")]
                s, c = jax.device_get(nll_sums(params, *batch))
                total, count = total + float(s), count + float(c)
            results[f"eval/{name}_nll"] = total / max(count, 1.0)
        return results

    return evaluate
