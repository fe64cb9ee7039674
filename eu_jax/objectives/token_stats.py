"""Per-token statistics of the next-token distribution, without materialising [B,T,V] logits.

Unlearning losses need more than log p(target): KL to uniform reads every log p_v, KL-retain and NPO read
the frozen reference's distribution too. At Llama-3 vocabularies (128k) the fp32 logits of a batch, and
their gradient, would be the largest tensors of a step, so `chunked_token_stats` forms logits for
`chunk_tokens` tokens at a time under `jax.checkpoint` and keeps only [B,T] statistics (DESIGN.md 7).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

TokenFn = Callable[[jax.Array, "jax.Array | None", jax.Array], jax.Array]
"""(logits [c,V] fp32, reference logits [c,V] fp32 or None, targets [c] int) -> [c] fp32."""


def _require_reference(ref_logits: jax.Array | None, name: str) -> jax.Array:
    if ref_logits is None:
        raise ValueError(
            f"token statistic {name!r} needs the reference model's logits: "
            "pass ref_hidden and ref_kernel to chunked_token_stats"
        )
    return ref_logits


def target_logprob(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """log p(target) = z_target - logsumexp_v z_v; the per-token NLL is minus this."""
    picked = jnp.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def reference_target_logprob(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """log p_ref(target): the frozen model's side of NPO's and DPO's log-ratios."""
    return target_logprob(_require_reference(ref_logits, "reference_target_logprob"), None, targets)


def mean_logprob(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """(1/V) sum_v log p_v = mean_v z_v - logsumexp_v z_v: minus the cross-entropy of p to uniform."""
    return jnp.mean(logits, axis=-1) - jax.nn.logsumexp(logits, axis=-1)


def kl_to_uniform(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """KL(U || p) = -log V - (1/V) sum_v log p_v >= 0, zero iff p is uniform (Exclusive Unlearning).

    Computed as logsumexp(z - mean z) - log V, which is exactly 0 at constant logits."""
    centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
    return jax.nn.logsumexp(centred, axis=-1) - math.log(logits.shape[-1])


def entropy(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """H(p) = -sum_v p_v log p_v."""
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def kl_from_reference(logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
    """KL(p_ref || p) = sum_v p_ref,v (log p_ref,v - log p_v): the KL-retain penalty."""
    log_ref = jax.nn.log_softmax(_require_reference(ref_logits, "kl_from_reference"), axis=-1)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.exp(log_ref) * (log_ref - log_p), axis=-1)


@dataclasses.dataclass(frozen=True)
class _UndialCrossEntropy:
    beta: float

    def __call__(self, logits: jax.Array, ref_logits: jax.Array | None, targets: jax.Array) -> jax.Array:
        ref_logits = _require_reference(ref_logits, "undial_cross_entropy")
        teacher = jax.nn.softmax(ref_logits - self.beta * jax.nn.one_hot(targets, logits.shape[-1]), axis=-1)
        return -jnp.sum(teacher * jax.nn.log_softmax(logits, axis=-1), axis=-1)


def undial_cross_entropy(beta: float) -> TokenFn:
    """UNDIAL (Dong et al. 2024): -sum_v q_v log p_v with teacher q = softmax(z_ref - beta * onehot(target)).

    The reference's logit of the token to forget is lowered by beta and the policy distilled towards it.
    Returned as a value-equal object, so two requests for the same beta merge into one statistic."""
    return _UndialCrossEntropy(float(beta))


def _chunk_logits(hidden: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("cd,dv->cv", hidden, kernel, preferred_element_type=jnp.float32)


CPU_STAT_ROWS = 32


def forward_stat_rows() -> int:
    """`chunked_token_stats`' `stat_rows` for forward-only statistics (scoring): row blocks on CPU only.

    XLA:CPU's fused exp-and-sum over rows as long as a vocabulary runs several times slower over a whole
    [1024, V] chunk of logits than over blocks of a few dozen rows (V = 49,152 and up; profiled in
    BENCHMARKS.md's findings): scoring 16 rows of 256 SmolLM2 tokens took 9.2 s with whole chunks and
    6.6 s with blocks of 32. A train step's gradient gained nothing, and on accelerators a loop over blocks
    would only serialise work, so both keep whole chunks."""
    return CPU_STAT_ROWS if jax.default_backend() == "cpu" else 0


def chunked_token_stats(
    token_fns: Mapping[str, TokenFn],
    hidden: jax.Array,
    kernel: jax.Array,
    targets: jax.Array,
    ref_hidden: jax.Array | None = None,
    ref_kernel: jax.Array | None = None,
    chunk_tokens: int = 1024,
    stat_rows: int = 0,
) -> dict[str, jax.Array]:
    """Every `token_fns` statistic for every token: {name: [B,T] fp32}.

    hidden [B,T,D] (final-norm) and kernel [D,V] give the policy's logits; ref_hidden/ref_kernel the
    frozen reference's (under stop_gradient). The B*T tokens are padded to n chunks of at most
    min(chunk_tokens, B*T), as even as a multiple of B allows, and mapped over with the chunk body
    rematerialised in the backward pass, so peak memory is O(chunk_tokens * V) however large the batch. Chunk k holds the strided tokens
    k, k+n, k+2n, ...: with the batch sharded, each device computes its own 1/devices of every chunk
    and no logits or hidden states are gathered, provided chunk_tokens (counted over all devices) is a
    multiple of the data-parallel device count (when it does not divide B*T, the padding costs a
    re-layout of the [B*T,D] hidden states, nothing of size V). With `stat_rows` > 0 the statistics of each
    chunk's logits are computed that many tokens at a time, again strided (so sharded rows stay where they
    are when `stat_rows` is a multiple of the device count), the chunk rounded up to a multiple of it
    (`forward_stat_rows` says when that pays).
    """
    if (ref_hidden is None) != (ref_kernel is None):
        raise ValueError("chunked_token_stats: pass ref_hidden and ref_kernel together, or neither")
    if chunk_tokens < 1:
        raise ValueError(f"chunked_token_stats: chunk_tokens must be positive, got {chunk_tokens}")
    if stat_rows < 0:
        raise ValueError(f"chunked_token_stats: stat_rows must be 0 (whole chunks) or positive, got {stat_rows}")
    b, t, d = hidden.shape
    if targets.shape != (b, t) or kernel.shape[0] != d:
        raise ValueError(
            f"chunked_token_stats: hidden {hidden.shape}, kernel {kernel.shape} and targets {targets.shape} "
            "do not fit [B,T,D], [D,V], [B,T]"
        )
    if ref_hidden is not None and (ref_hidden.shape != hidden.shape or ref_kernel.shape != kernel.shape):
        raise ValueError(
            f"chunked_token_stats: reference shapes {ref_hidden.shape}, {ref_kernel.shape} differ from the "
            f"policy's {hidden.shape}, {kernel.shape}"
        )
    if not token_fns:
        return {}
    if ref_hidden is not None:
        ref_hidden, ref_kernel = jax.lax.stop_gradient(ref_hidden), jax.lax.stop_gradient(ref_kernel)

    n_tokens = b * t
    chunk = min(chunk_tokens, n_tokens)
    # As many chunks, balanced: 384 tokens in chunks of 256 become two of 192, not 256 and a padded 128. A
    # multiple of the rows, so a sharded batch stays sharded; never above chunk_tokens.
    per_chunk = -(-n_tokens // -(-n_tokens // chunk))  # ceil(n_tokens / ceil(n_tokens / chunk))
    chunk = min(chunk, -(-per_chunk // b) * b)
    if stat_rows:
        chunk = -(-chunk // stat_rows) * stat_rows
    n_chunks = -(-n_tokens // chunk)

    def to_chunks(x: jax.Array) -> jax.Array:  # [B,T,...] -> [n_chunks, chunk, ...]
        x = x.reshape(n_tokens, *x.shape[2:])
        x = jnp.pad(x, [(0, n_chunks * chunk - n_tokens)] + [(0, 0)] * (x.ndim - 1))
        return jnp.swapaxes(x.reshape(chunk, n_chunks, *x.shape[1:]), 0, 1)

    def from_chunks(x: jax.Array) -> jax.Array:  # [n_chunks, chunk] -> [B,T]
        return jnp.swapaxes(x, 0, 1).reshape(-1)[:n_tokens].reshape(b, t)

    def statistics(xs):
        logits, ref_logits, tgt = xs
        return {name: fn(logits, ref_logits, tgt).astype(jnp.float32) for name, fn in token_fns.items()}

    @functools.partial(jax.checkpoint, prevent_cse=False)
    def one_chunk(xs):
        h, tgt, ref_h = xs
        logits = _chunk_logits(h, kernel)
        ref_logits = None if ref_h is None else _chunk_logits(ref_h, ref_kernel)
        if not stat_rows:
            return statistics((logits, ref_logits, tgt))
        # Block j holds rows j, j + n, j + 2n, ... (strided, as the chunks are): with the rows sharded, every
        # device keeps its share of each block, and each row is read where it lies.
        strided = jax.tree.map(lambda x: x.reshape(stat_rows, -1, *x.shape[1:]), (logits, ref_logits, tgt))

        def block(j):
            return statistics(jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, j, 1, keepdims=False), strided))

        stats = jax.lax.map(block, jnp.arange(chunk // stat_rows))  # {name: [n, stat_rows]}
        return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1), stats)

    ref_chunks = None if ref_hidden is None else to_chunks(ref_hidden)
    stats = jax.lax.map(one_chunk, (to_chunks(hidden), to_chunks(targets), ref_chunks))
    return {name: from_chunks(value) for name, value in stats.items()}
