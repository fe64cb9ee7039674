"""Second moments of MLP keys over a retained corpus, and the projector onto their null space.

AlphaEdit's promise: an edit of `down_proj` whose rows lie in the null space of the keys that retained
knowledge produces leaves those keys' outputs unchanged. The keys' second moment E[k k^T] over a corpus
of retained text gives that space: its eigenvectors with eigenvalues below a threshold. Computing it
costs a forward over the corpus, so the moments are cached on disk, keyed by the checkpoint, the
corpus tokens, the layers and the token budget; the projector is cheap and recomputed from them.
With `replies_only`, only the tokens of each text's reply (its `loss` mask) count, not its prompt: how
UniErase keeps the unlearning token's own continuation (the refusal after it) out of the edit's reach
while the position before the token, the one the edit must move, stays free.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from eu_jax.data.cache import TokenCache, digest
from eu_jax.data.chat import Encoded
from eu_jax.generate import bucket_length
from eu_jax.models.config import ModelConfig
from eu_jax.models.state import Params, build_decoder
from eu_jax.parallel.sharding import BATCH_AXES, activation_sharding, batch_sharding, to_global, to_host
from eu_jax.unierase.tracing import run_layers

MOMENTS_VERSION = 1


def checkpoint_fingerprint(ckpt: Path) -> str:
    """What identifies a checkpoint's weights without reading them: its path and every file's size and mtime."""
    from eu_jax.convert.checkpoint import locate_params

    orbax_dir = locate_params(Path(ckpt))[0]
    files = sorted((str(p.relative_to(orbax_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in orbax_dir.rglob("*") if p.is_file())
    return digest({"path": str(orbax_dir), "files": files})


@lru_cache(maxsize=4)
def _moment_sums(config: ModelConfig, layers: tuple[int, ...]):
    """jit(params, ids, attention, counted) -> ([len(layers), F, F] sums of k k^T over the counted tokens, their count)."""

    @jax.jit
    def sums(params, ids, attention, counted):
        model = build_decoder(config, params)
        inputs = model.prepare(ids, attention)
        _, keys = run_layers(model, inputs, inputs.x, 0, max(layers) + 1, layers)
        mask = (counted * attention).astype(jnp.float32)[..., None]
        stacked = jnp.stack([keys[layer].astype(jnp.float32) * mask for layer in layers])
        return jnp.einsum("lbtf,lbtg->lfg", stacked, stacked), mask.sum()

    return sums


def key_second_moments(
    config: ModelConfig,
    params: Params,
    mesh: Mesh,
    corpus: Sequence[Encoded],
    layers: Sequence[int],
    max_tokens: int = 100_000,
    batch_size: int = 16,
    replies_only: bool = False,
) -> tuple[np.ndarray, int]:
    """E[k k^T] of each layer's keys over the corpus's tokens (at most `max_tokens`; with `replies_only` only
    the tokens each text's `loss` mask marks count): [len(layers), F, F], and the count."""
    if not corpus:
        raise ValueError("the retained corpus for the null space is empty")
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    rows = -(-batch_size // shards) * shards
    fn, sharding = _moment_sums(config, tuple(layers)), batch_sharding(mesh)
    total, count = None, 0
    # Batches of similar lengths, padded to bucket lengths: few widths to compile (each a forward up to the last
    # edited layer; every batch its own width compiled a dozen programs for a corpus of 10k tokens).
    taken = sorted(_take_tokens(corpus, max_tokens), key=len)
    for start in range(0, len(taken), rows):
        chunk = taken[start : start + rows]
        width = bucket_length(max(len(e) for e in chunk))
        ids, attention, counted = (np.zeros((rows, width), np.int32) for _ in range(3))
        for row, e in enumerate(chunk):
            ids[row, : len(e)], attention[row, : len(e)] = e.ids, 1
            counted[row, : len(e)] = e.loss if replies_only else 1
        with activation_sharding(mesh):
            sums, n = fn(params, *(to_global(a, sharding) for a in (ids, attention, counted)))
        sums = to_host(sums).astype(np.float64)
        total = sums if total is None else total + sums
        count += int(to_host(n))
    if not count:
        raise ValueError("the retained corpus for the null space has no tokens to count")
    return (total / count).astype(np.float32), count


def _take_tokens(corpus: Sequence[Encoded], max_tokens: int) -> list[Encoded]:
    """The corpus's sequences in order until `max_tokens` tokens (the last one cut to fit)."""
    taken, left = [], max_tokens
    for encoded in corpus:
        if left <= 0:
            break
        taken.append(Encoded(np.asarray(encoded.ids[:left]), np.asarray(encoded.loss[:left])))
        left -= len(taken[-1])
    return taken


def cached_key_second_moments(
    fingerprint: str,
    config: ModelConfig,
    params: Params,
    mesh: Mesh,
    corpus: Sequence[Encoded],
    layers: Sequence[int],
    max_tokens: int = 100_000,
    cache_dir: str | Path | None = None,
    replies_only: bool = False,
) -> tuple[np.ndarray, int]:
    """key_second_moments, read from / written to the on-disk cache."""
    from eu_jax.assets import cache_dir as default_cache_dir

    fields = {"checkpoint": fingerprint, "corpus": _sequences_hash(e.ids for e in corpus), "layers": list(layers),
              "max_tokens": max_tokens, "version": MOMENTS_VERSION}
    if replies_only:
        fields |= {"replies_only": _sequences_hash(e.loss for e in corpus)}
    key = digest(fields)
    cache = TokenCache(Path(cache_dir) if cache_dir else default_cache_dir() / "unierase_moments")
    entry = cache.load(key)
    if entry is not None:
        return np.asarray(entry[0]["moments"]), int(entry[1]["count"])
    moments, count = key_second_moments(config, params, mesh, corpus, layers, max_tokens, replies_only=replies_only)
    if jax.process_index() == 0:
        cache.store(key, {"moments": moments}, {"count": count, "layers": list(layers)})
    return moments, count


def _sequences_hash(sequences) -> str:
    """SHA-256 of int sequences, each as int32 bytes followed by a separator."""
    return hashlib.sha256(b"".join(np.asarray(s, np.int32).tobytes() + b"|" for s in sequences)).hexdigest()


def null_space_projector(moments: np.ndarray, energy: float) -> tuple[np.ndarray, int]:
    """P = U0 U0^T over the eigenvectors of E[k k^T] with the smallest eigenvalues that together hold at most
    `energy` of their sum (the share of retained keys' squared norm an edit in that space can reach), and
    dim(null space). A share rather than AlphaEdit's absolute eigenvalue cut (2e-2 for Llama-3-8B) because
    key scales differ between models: on SmolLM2-135M that cut leaves ~92% of the dimensions and ~10% of
    the energy in the "null" space."""
    values, vectors = np.linalg.eigh(np.asarray(moments, np.float64))  # ascending
    cumulative = np.cumsum(np.clip(values, 0, None)) / max(float(np.clip(values, 0, None).sum()), 1e-300)
    null = vectors[:, cumulative <= energy]
    return (null @ null.T).astype(np.float32), int(null.shape[1])
