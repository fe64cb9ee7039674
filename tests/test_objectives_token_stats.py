"""Chunked per-token statistics: each statistic against float64 NumPy, chunking changes neither values
nor gradients, reference inputs get no gradient, and no [B*T, V] tensor is ever formed."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from eu_jax.objectives import token_stats as ts
from eu_jax.objectives.token_stats import chunked_token_stats
from eu_jax.parallel.mesh import make_mesh

B, T, D, V = 3, 8, 16, 40
UNDIAL_BETA = 3.0


def _np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _np_stats(z, z_ref, y):
    """Float64 NumPy versions of every standard statistic, written from their formulas."""
    logp, logp_ref = _np_log_softmax(z), _np_log_softmax(z_ref)
    p, p_ref = np.exp(logp), np.exp(logp_ref)
    rows = np.arange(len(y))
    teacher_logits = z_ref.copy()
    teacher_logits[rows, y] -= UNDIAL_BETA
    q = np.exp(_np_log_softmax(teacher_logits))
    return {
        "target_logprob": logp[rows, y],
        "reference_target_logprob": logp_ref[rows, y],
        "mean_logprob": logp.mean(-1),
        "kl_to_uniform": np.sum((1.0 / z.shape[-1]) * (np.log(1.0 / z.shape[-1]) - logp), -1),
        "entropy": -np.sum(p * logp, -1),
        "kl_from_reference": np.sum(p_ref * (logp_ref - logp), -1),
        "undial_cross_entropy": -np.sum(q * logp, -1),
    }


FNS = {
    "target_logprob": ts.target_logprob,
    "reference_target_logprob": ts.reference_target_logprob,
    "mean_logprob": ts.mean_logprob,
    "kl_to_uniform": ts.kl_to_uniform,
    "entropy": ts.entropy,
    "kl_from_reference": ts.kl_from_reference,
    "undial_cross_entropy": ts.undial_cross_entropy(UNDIAL_BETA),
}


def _inputs(seed=0, b=B, t=T, d=D, v=V):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(b, t, d)).astype(np.float32)
    kernel = (rng.normal(size=(d, v)) / math.sqrt(d)).astype(np.float32)
    ref_hidden = hidden + 0.3 * rng.normal(size=hidden.shape).astype(np.float32)
    ref_kernel = kernel + 0.1 * rng.normal(size=kernel.shape).astype(np.float32)
    targets = rng.integers(0, v, size=(b, t)).astype(np.int32)
    return hidden, kernel, targets, ref_hidden, ref_kernel


@pytest.mark.parametrize("name", sorted(FNS))
def test_each_token_fn_matches_float64_numpy(name):
    rng = np.random.default_rng(1)
    z = 3.0 * rng.normal(size=(12, V))
    z_ref = 3.0 * rng.normal(size=(12, V))
    y = rng.integers(0, V, size=12)
    got = jax.jit(FNS[name])(z.astype(np.float32), z_ref.astype(np.float32), y.astype(np.int32))
    assert got.shape == (12,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _np_stats(z, z_ref, y)[name], rtol=1e-5, atol=1e-5)


def test_kl_to_uniform_is_zero_at_constant_logits_and_positive_otherwise():
    y = jnp.zeros((2,), jnp.int32)
    kl = jax.jit(ts.kl_to_uniform)
    flat = np.full((2, 50_000), 7.25, np.float32)
    assert np.all(np.asarray(kl(flat, None, y)) == 0.0)
    noisy = flat + 0.1 * np.random.default_rng(0).normal(size=flat.shape).astype(np.float32)
    assert np.all(np.asarray(kl(noisy, None, y)) > 1e-3)


@pytest.mark.parametrize("name", ["reference_target_logprob", "kl_from_reference", "undial_cross_entropy"])
def test_reference_statistics_refuse_to_run_without_reference_logits(name):
    with pytest.raises(ValueError, match="needs the reference model's logits"):
        FNS[name](jnp.zeros((2, V)), None, jnp.zeros((2,), jnp.int32))


def test_undial_fns_compare_equal_by_beta():
    assert ts.undial_cross_entropy(2) == ts.undial_cross_entropy(2.0) != ts.undial_cross_entropy(3.0)


def _full_stats(fns, hidden, kernel, targets, ref_hidden, ref_kernel):
    """The plain, unchunked computation: full [B*T, V] logits, then each fn."""
    logits = hidden.reshape(-1, hidden.shape[-1]) @ kernel
    ref_logits = ref_hidden.reshape(-1, ref_hidden.shape[-1]) @ ref_kernel
    flat_targets = targets.reshape(-1)
    return {name: fn(logits, ref_logits, flat_targets).reshape(targets.shape) for name, fn in fns.items()}


@pytest.mark.parametrize("chunk_tokens, stat_rows", [(5, 0), (8, 0), (1000, 0), (5, 4), (1000, 5)])
def test_chunked_equals_unchunked(chunk_tokens, stat_rows):
    # Chunk mechanics (padding, strided order, reference alignment) with one policy-and-target statistic
    # and one reference statistic; every statistic goes through chunks in the gradient test below. With
    # row blocks the chunk grows to a multiple of them (5 -> 8: three full chunks; 24 -> 25: one padded).
    hidden, kernel, targets, ref_hidden, ref_kernel = _inputs()
    fns = {"logp": ts.target_logprob, "kl": ts.kl_from_reference}
    chunked = functools.partial(chunked_token_stats, fns, chunk_tokens=chunk_tokens, stat_rows=stat_rows)
    got = jax.jit(chunked)(hidden, kernel, targets, ref_hidden, ref_kernel)
    want = _full_stats(fns, hidden, kernel, targets, ref_hidden, ref_kernel)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].shape == (B, T) and got[name].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-6, err_msg=name)


def _weighted_loss(stats, weights):
    return sum(jnp.sum(weights[i] * stats[name]) for i, name in enumerate(sorted(stats)))


@pytest.mark.parametrize("stat_rows", [0, 3])
def test_values_and_gradients_through_chunks_equal_full_logits(stat_rows):
    """All statistics at once through 5-token chunks (24 tokens: the last chunk padded), or 6-token chunks
    in blocks of 3 rows; the reference inputs get exactly zero gradient."""
    hidden, kernel, targets, ref_hidden, ref_kernel = _inputs(seed=2)
    weights = np.random.default_rng(3).normal(size=(len(FNS), B, T)).astype(np.float32)

    def chunked(h, k, rh, rk):
        stats = chunked_token_stats(FNS, h, k, targets, rh, rk, chunk_tokens=5, stat_rows=stat_rows)
        return _weighted_loss(stats, weights)

    def full(h, k):
        return _weighted_loss(_full_stats(FNS, h, k, targets, ref_hidden, ref_kernel), weights)

    got_value, got = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2, 3)))(hidden, kernel, ref_hidden, ref_kernel)
    want_value, want = jax.jit(jax.value_and_grad(full, argnums=(0, 1)))(hidden, kernel)
    np.testing.assert_allclose(float(got_value), float(want_value), rtol=1e-6)
    for g, w in zip(got[:2], want):
        assert np.abs(np.asarray(w)).max() > 1e-2  # a real gradient, not two zeros agreeing
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5)
    for g in got[2:]:
        assert not np.any(np.asarray(g))


def _intermediate_shapes(jaxpr):
    """Shapes of every equation's outputs, descending into sub-jaxprs (scan/map bodies, remat, pjit)."""
    for eqn in jaxpr.eqns:
        yield from (tuple(v.aval.shape) for v in eqn.outvars)
        stack = list(eqn.params.values())
        while stack:
            param = stack.pop()
            if isinstance(param, (tuple, list)):
                stack.extend(param)
            elif hasattr(param, "eqns"):
                yield from _intermediate_shapes(param)
            elif hasattr(getattr(param, "jaxpr", None), "eqns"):
                yield from _intermediate_shapes(param.jaxpr)


def test_no_batch_by_vocab_intermediate_forward_or_backward():
    b, t, d, v, chunk = 4, 16, 32, 50_000, 16
    hidden = jax.ShapeDtypeStruct((b, t, d), jnp.float32)
    kernel = jax.ShapeDtypeStruct((d, v), jnp.float32)
    targets = jnp.zeros((b, t), jnp.int32)
    fns = {"logp": ts.target_logprob, "uniform": ts.kl_to_uniform, "kl": ts.kl_from_reference}

    def loss(h, k, rh, rk):
        stats = chunked_token_stats(fns, h, k, targets, rh, rk, chunk_tokens=chunk)
        return sum(jnp.sum(s) for s in stats.values())

    forward = jax.make_jaxpr(loss)(hidden, kernel, hidden, kernel)
    backward = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, kernel, hidden, kernel)
    for jaxpr in (forward, backward):
        shapes = list(_intermediate_shapes(jaxpr.jaxpr))
        assert (chunk, v) in shapes  # the walk does see the per-chunk logits
        assert (b * t, v) not in shapes and (b, t, v) not in shapes
        # Nothing bigger than the kernel (or its gradient) either: e.g. no per-chunk stack of [D,V].
        assert max(math.prod(s) for s in shapes) <= d * v


def test_one_chunk_when_the_batch_fits():
    hidden, kernel, targets, *_ = _inputs()
    jaxpr = jax.make_jaxpr(lambda h: chunked_token_stats({"logp": ts.target_logprob}, h, kernel, targets))(hidden)
    assert (B * T, V) in set(_intermediate_shapes(jaxpr.jaxpr))


def _np_expected(hidden, kernel, targets, ref_hidden, ref_kernel):
    """Every statistic in float64 NumPy, as [B,T] arrays."""
    flat = lambda h, k: np.asarray(h, np.float64).reshape(-1, h.shape[-1]) @ np.asarray(k, np.float64)  # noqa: E731
    stats = _np_stats(flat(hidden, kernel), flat(ref_hidden, ref_kernel), np.asarray(targets).reshape(-1))
    return {name: value.reshape(targets.shape) for name, value in stats.items()}


def test_bf16_activations_give_fp32_statistics():
    hidden, kernel, targets, ref_hidden, ref_kernel = _inputs(seed=5)
    hidden, kernel = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)
    fns = {"target_logprob": ts.target_logprob, "entropy": ts.entropy}
    got = jax.jit(functools.partial(chunked_token_stats, fns, chunk_tokens=7))(hidden, kernel, targets)
    want = _np_expected(hidden.astype(np.float32), kernel.astype(np.float32), targets, ref_hidden, ref_kernel)
    for name in fns:
        assert got[name].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("stat_rows", [0, 8])
@pytest.mark.parametrize("chunk_tokens", [16, 20])
def test_batch_sharded_inputs_stay_sharded_chunk_by_chunk(stat_rows, chunk_tokens):
    """Chunks (and row blocks within them) hold strided tokens, so with the batch split over 8 devices each
    device computes its own 1/8 of every chunk: no all-gather of hidden states or logits, and the same values.
    48 tokens in chunks of at most 20 go as three balanced chunks of 16 (a multiple of the rows), not 20 + 20
    + a padded 8."""
    hidden, kernel, targets, ref_hidden, ref_kernel = _inputs(seed=6, b=8, t=6)
    rows = NamedSharding(make_mesh({"data": -1}), PartitionSpec("data"))
    fns = {"target_logprob": ts.target_logprob, "kl_from_reference": ts.kl_from_reference}
    run = jax.jit(
        lambda h, t, rh: chunked_token_stats(fns, h, kernel, t, rh, ref_kernel, chunk_tokens=chunk_tokens, stat_rows=stat_rows)
    )
    args = [jax.device_put(x, rows) for x in (hidden, targets, ref_hidden)]
    compiled = run.lower(*args).compile().as_text()
    assert "all-gather" not in compiled and f"f32[2,{V}]" in compiled  # 16 tokens / 8 devices per chunk
    got = run(*args)
    want = _np_expected(hidden, kernel, targets, ref_hidden, ref_kernel)
    for name in fns:
        np.testing.assert_allclose(np.asarray(got[name]), want[name], rtol=1e-5, atol=1e-5)


def test_bad_arguments_are_refused():
    hidden, kernel, targets, ref_hidden, ref_kernel = _inputs()
    fns = {"logp": ts.target_logprob}
    with pytest.raises(ValueError, match="ref_hidden and ref_kernel together"):
        chunked_token_stats(fns, hidden, kernel, targets, ref_hidden=ref_hidden)
    with pytest.raises(ValueError, match="do not fit"):
        chunked_token_stats(fns, hidden, kernel, targets[:, :-1])
    with pytest.raises(ValueError, match="reference shapes"):
        chunked_token_stats(fns, hidden, kernel, targets, ref_hidden[:, :-1], ref_kernel)
    with pytest.raises(ValueError, match="chunk_tokens must be positive"):
        chunked_token_stats(fns, hidden, kernel, targets, chunk_tokens=0)
    with pytest.raises(ValueError, match="stat_rows must be 0"):
        chunked_token_stats(fns, hidden, kernel, targets, stat_rows=-1)
    with pytest.raises(ValueError, match="needs the reference model's logits"):
        chunked_token_stats({"kl": ts.kl_from_reference}, hidden, kernel, targets)
