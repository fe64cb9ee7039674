"""One Flax NNX decoder for the Llama family: Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM.

Layout choices:
- Kernels are stored input-major with heads as their own axis (q: [embed, heads, head_dim]), so
  every parameter has a logical axis per dimension for the sharding table.
- Layer parameters are always stacked along a leading `layers` axis. `scan_layers` only decides
  whether a forward without a KV cache runs them under `lax.scan` or unrolled, so checkpoints never
  differ. With a cache (sampling) the layers run unrolled, each with its own cache arrays, except in
  `prefill`, which runs them as a forward without a cache and then fills the cache arrays.
- Attention masks are built from slots and positions, which covers left/right padding, the KV
  cache (prefill and one-token steps) and sliding windows with one rule.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from eu_jax.models import fused_attention
from eu_jax.models.config import ModelConfig, RuntimeOptions
from eu_jax.models.rope import apply_rotary, inverse_frequencies, rotary_tables
from eu_jax.parallel.sharding import constrain_batch, gather_replicated

_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    # The matmul outputs, and the fused attention kernel's output and log-sum-exp (nothing else is named so).
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names(fused_attention.RESIDUALS),
    ),
}


def dense(x: jax.Array, kernel: jax.Array, contract: int = 1) -> jax.Array:
    """x [..., in...] times kernel [in..., out...] over the `contract` trailing dims of x, as one 2-D matmul.

    Batch and sequence are folded into one row axis first: XLA's CPU backend runs the weight gradients of a
    [rows, in] x [in, out] product several times faster than the same contraction with batch and sequence as
    two axes (profiled; bench/train_step.py times the whole step), and on accelerators the two forms compile alike."""
    lead, inner = x.shape[: x.ndim - contract], x.shape[x.ndim - contract :]
    size = math.prod(inner)
    y = x.reshape(-1, size) @ kernel.reshape(size, -1)
    return y.reshape(*lead, *kernel.shape[contract:])


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], names: tuple[str, ...], dtype, init) -> nnx.Param:
    """A parameter carrying its logical axis names; placement on a mesh happens elsewhere."""
    key = rngs.params() if rngs is not None else jax.random.key(0)
    return nnx.Param(init(key, shape, dtype), out_sharding=names, eager_sharding=False)


@flax.struct.dataclass
class KVCache:
    """Keys and values of every layer, plus the position held in each slot (-1: empty or padding).

    All rows write the same slots in lockstep (`index` is the next free slot); left-padded rows
    simply hold -1 positions in their padding slots, which masks them out.
    """

    k: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, head_dim, slots] (slots last: see `_one_query_attention`)
    v: tuple[jax.Array, ...]  # per layer: [batch, kv_heads, slots, head_dim]
    positions: jax.Array  # [batch, slots] int32
    index: jax.Array  # [] int32

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> "KVCache":
        """An empty cache. Each layer's keys and values are arrays of their own, so a decoding step updates
        them in place and never slices a layer out of a stacked array (see `Decoder.layer_states`)."""
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        key_shape = (batch, config.num_kv_heads, config.head_dim, max_len)
        k, v = (tuple(jnp.zeros(s, dtype) for _ in range(config.num_layers)) for s in (key_shape, shape))
        return cls(k=k, v=v, positions=jnp.full((batch, max_len), -1, jnp.int32), index=jnp.zeros((), jnp.int32))


def _check_cache_room(cache: KVCache, tokens: int) -> None:
    """Refuse tokens the cache has no slots left for, where that is known when tracing (always for more tokens
    than slots; for a cache index that is not traced, from the index): `dynamic_update_slice` would silently
    move the write back over earlier slots instead."""
    slots = cache.positions.shape[1]
    try:
        index = int(cache.index)
    except jax.errors.ConcretizationTypeError:  # inside jit: only the shapes are known
        index = 0
    if index + tokens > slots:
        raise ValueError(f"a KV cache of {slots} slots, {index} of them in use, cannot take {tokens} more tokens")


def _swap_slots_last(keys: jax.Array) -> jax.Array:
    """Keys [B,K,T,H] <-> the cache's [B,K,H,T] layout (slots last, see `_one_query_attention`); its own inverse."""
    return jnp.swapaxes(keys, 2, 3)


@flax.struct.dataclass
class LayerInputs:
    """What every layer takes: the embedded tokens and the attention mask and rotary tables."""

    x: jax.Array  # [batch, seq, embed]
    cos: jax.Array
    sin: jax.Array
    mask: jax.Array  # [batch, seq, slots]; or [batch, seq] segment ids when the fused kernel attends (uses_kernel)
    key_positions: jax.Array  # [batch, slots]: positions the keys hold (the cache's, with a cache)


@flax.struct.dataclass
class DecoderOutput:
    logits: jax.Array | None  # [batch, seq, vocab], None when return_logits=False
    hidden: jax.Array  # final-norm hidden states [batch, seq, embed]
    hidden_states: jax.Array | None  # [len(hidden_layers), batch, seq, embed]
    cache: KVCache | None


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, options: RuntimeOptions):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), options.jnp_param_dtype), out_sharding=("norm",), eager_sharding=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in fp32, cast back, then scale: the order transformers uses.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs | None):
        d, n, k, h = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        pdt, init = options.jnp_param_dtype, jax.nn.initializers.normal(config.initializer_range)
        zeros = jax.nn.initializers.zeros
        self.dtype = options.jnp_dtype
        self.q_proj = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), pdt, init)
        self.k_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt, init)
        self.v_proj = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), pdt, init)
        self.o_proj = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), pdt, init)
        if config.qkv_bias:
            self.q_bias = _param(rngs, (n, h), ("heads", "head_dim"), pdt, zeros)
            self.k_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pdt, zeros)
            self.v_bias = _param(rngs, (k, h), ("kv_heads", "head_dim"), pdt, zeros)
        if config.o_bias:
            self.o_bias = _param(rngs, (d,), ("embed",), pdt, zeros)
        if config.qk_norm:
            self.q_norm = RMSNorm(h, config.rms_norm_eps, options)
            self.k_norm = RMSNorm(h, config.rms_norm_eps, options)
        self.has_qkv_bias, self.has_o_bias, self.has_qk_norm = config.qkv_bias, config.o_bias, config.qk_norm
        self.scale = h**-0.5
        self.block = options.attention_block
        self.window = config.sliding_window
        self.kernel = options.attention

    def _project(self, x: jax.Array, kernel: nnx.Param, bias_name: str) -> jax.Array:
        y = dense(x, kernel[...].astype(self.dtype))
        if self.has_qkv_bias:
            y = y + getattr(self, bias_name)[...].astype(self.dtype)
        return y

    def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
        """x [B,T,D]; mask [B,T,S] (or [B,T] segment ids for the fused kernel, `Decoder.prepare`); with a cache,
        k_cache [B,K,H,S] and v_cache [B,K,S,H] get this step's keys and values at slot `index`, and are returned
        in that layout (without a cache, this call's own keys and values, both [B,K,T,H]).

        Keys and values are kept heads-first: the score and value products then read a cache in place, where a
        [B,S,K,H] cache was transposed whole in every decoding step."""
        q = self._project(x, self.q_proj, "q_bias")
        k = self._project(x, self.k_proj, "k_bias")
        v = self._project(x, self.v_proj, "v_bias")
        if self.has_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
        if k_cache is not None:
            k = jax.lax.dynamic_update_slice(k_cache, _swap_slots_last(k).astype(k_cache.dtype), (0, 0, 0, index))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, 0, index, 0))
        k, v = k.astype(self.dtype), v.astype(self.dtype)
        if k_cache is not None:
            out = _cached_attention(q, k, v, mask, self.scale, used_slots=index + q.shape[1])
        elif mask.ndim == 2:
            out = fused_attention.attend(self.kernel, q, k, v, mask, self.scale, self.window)
        elif 0 < self.block < q.shape[1]:
            out = _block_causal_attention(q, k, v, mask, self.scale, self.block)
        else:
            out = _grouped_attention(q, k, v, mask, self.scale)
        y = dense(out, self.o_proj[...].astype(self.dtype), contract=2)
        if self.has_o_bias:
            y = y + self.o_bias[...].astype(self.dtype)
        return y, k, v


def _grouped_attention(q, k, v, mask, scale):
    """Softmax attention with grouped KV heads (q [B,T,N,H], k/v [B,K,S,H]); scores and softmax in fp32."""
    b, t, n, h = q.shape
    kv_heads = k.shape[1]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)
    scores = jnp.einsum("btkgh,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksh->btkgh", probs, v).reshape(b, t, n, h)


def cache_prefixes(slots: int, most: int = 8, multiple: int = 16, min_slots: int = 256) -> tuple[int, ...]:
    """The static cache lengths a decoding step may read: up to `most`, evenly spaced, the last all `slots`.

    A cache shorter than `min_slots` is read whole: XLA copies each prefix slice before its products, and
    with a short cache the reads saved do not pay for those copies and the branches' compilation (the A/B
    runs are in BENCHMARKS.md's generation findings)."""
    if slots < min_slots:
        return (slots,)
    stride = -(-slots // most)
    stride = -(-stride // multiple) * multiple
    return tuple(range(stride, slots, stride)) + (slots,)


def _cached_attention(q, k, v, mask, scale, used_slots):
    """Attention of q [B,T,N,H] to a cache (k [B,K,H,S], v [B,K,S,H]) read up to its first `used_slots` slots,
    rounded up to a `cache_prefixes` length; one query per row (a decoding step) goes to `_one_query_attention`.

    All rows fill the cache's slots in lockstep from slot 0, so the slots past `used_slots` hold no key yet
    and are masked; the cache is allocated for the prompt plus every new token, so reading it whole spent
    about half of a generation's attention passes (and most of the prefill's scores) on them. Each prefix
    length is a branch of one `lax.switch` on a static slice of the cache."""
    prefixes = cache_prefixes(k.shape[3])
    b, t, n, h = q.shape

    def attend_prefix(length, q, k, v, mask):
        k, v, mask = k[..., :length], v[:, :, :length], mask[..., :length]
        if t > 1:
            return _grouped_attention(q, _swap_slots_last(k), v, mask, scale)
        grouped = q.reshape(b, k.shape[1], n // k.shape[1], h)
        return _one_query_attention(grouped, k, v, mask[:, 0], scale).reshape(b, 1, n, h)

    branches = [functools.partial(attend_prefix, length) for length in prefixes]
    branch = jnp.searchsorted(jnp.asarray(prefixes), used_slots)  # the first prefix holding them all
    return jax.lax.switch(branch, branches, q, k, v, mask)


def _one_query_attention(q, k, v, mask, scale):
    """One query per row (a decoding step): q [B,K,G,H], k [B,K,H,S], v [B,K,S,H], mask [B,S] -> [B,K,G,H].

    Written as products summed over an axis rather than as two batched matmuls: with one query the
    products are matrix-vector shaped, which XLA's CPU backend ran through its generic dot emitter at a few
    GFLOP/s (0.5 ms per layer for the value product at batch 16, profiled), while a multiply-and-sum
    fuses into one pass over each cache array (bench/generate.py times the sampler). The keys lie slots
    last, so the scores sum over a non-minor axis, vectorised along the slots (BENCHMARKS.md's generation
    findings). fp32 throughout, as the matmul form's scores and accumulation."""
    f32 = jnp.float32
    scores = jnp.sum(q.astype(f32)[..., None] * k.astype(f32)[:, :, None], axis=3) * scale  # [B,K,G,S]
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(f32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.sum(probs[..., None] * v.astype(f32)[:, :, None], axis=3).astype(v.dtype)


def _block_causal_attention(q, k, v, mask, scale, block):
    """`_grouped_attention` over the queries `block` at a time, each block against the keys up to its own last.

    Without a cache, a query's key slots are the sequence itself and the mask is causal by slot, so the keys
    after a block are masked for all of its queries: skipping them computes the same outputs with
    (1 + 1/blocks)/2 of the score and softmax work, and the backward pass keeps that much of the [T, T]
    probabilities. A query row whose keys are all masked (padding) averages the values it was given, so such
    rows, which no loss reads, differ from the unblocked product's."""
    t = q.shape[1]
    outs = [
        _grouped_attention(q[:, start : start + block], k[:, :, : start + block], v[:, :, : start + block],
                           mask[:, start : start + block, : start + block], scale)
        for start in range(0, t, block)
    ]
    return jnp.concatenate(outs, axis=1)


class MLP(nnx.Module):
    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs | None):
        d, f = config.hidden_size, config.intermediate_size
        pdt, init = options.jnp_param_dtype, jax.nn.initializers.normal(config.initializer_range)
        self.dtype = options.jnp_dtype
        self.gate_proj = _param(rngs, (d, f), ("embed", "mlp"), pdt, init)
        self.up_proj = _param(rngs, (d, f), ("embed", "mlp"), pdt, init)
        self.down_proj = _param(rngs, (f, d), ("mlp", "embed"), pdt, init)
        self.has_bias = config.mlp_bias
        if config.mlp_bias:
            zeros = jax.nn.initializers.zeros
            self.gate_bias = _param(rngs, (f,), ("mlp",), pdt, zeros)
            self.up_bias = _param(rngs, (f,), ("mlp",), pdt, zeros)
            self.down_bias = _param(rngs, (d,), ("embed",), pdt, zeros)

    def _linear(self, x, name):
        y = dense(x, getattr(self, f"{name}_proj")[...].astype(self.dtype))
        return y + getattr(self, f"{name}_bias")[...].astype(self.dtype) if self.has_bias else y

    def keys(self, x: jax.Array) -> jax.Array:
        """The input of down_proj, [..., mlp]: the 'keys' that knowledge-editing methods solve for."""
        return jax.nn.silu(self._linear(x, "gate")) * self._linear(x, "up")

    def down(self, keys: jax.Array) -> jax.Array:
        return self._linear(keys, "down")

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(self.keys(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs | None):
        self.input_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options)
        self.attn = Attention(config, options, rngs)
        self.post_attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, options)
        self.mlp = MLP(config, options, rngs)

    def attend(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
        """The residual stream after this layer's attention block (before its MLP), and the new K/V."""
        attn_out, k, v = self.attn(self.input_norm(x), cos, sin, mask, k_cache, v_cache, index)
        return x + attn_out, k, v

    def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
        x, k, v = self.attend(x, cos, sin, mask, k_cache, v_cache, index)
        return x + self.mlp(self.post_attn_norm(x)), k, v


def _stacked_layers(config: ModelConfig, options: RuntimeOptions, rngs: nnx.Rngs | None) -> DecoderLayer:
    """`num_layers` DecoderLayers as one module whose parameters have a leading `layers` axis."""

    @nnx.split_rngs(splits=config.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(layer_rngs):
        return DecoderLayer(config, options, layer_rngs)

    return make(rngs if rngs is not None else nnx.Rngs(0))


def _layer_state(stacked: nnx.State, index: int) -> nnx.State:
    """Layer `index`'s parameters out of the stacked ones."""
    return jax.tree.map(lambda a: a[index], stacked)


def build_attention_mask(
    query_positions: jax.Array, key_positions: jax.Array, query_start: jax.Array | int, window: int | None
) -> jax.Array:
    """[B,T,S] mask: a query sees earlier-or-same slots holding a real token (position >= 0)
    and, with a sliding window, only keys fewer than `window` positions behind it."""
    t, s = query_positions.shape[1], key_positions.shape[1]
    query_slots = query_start + jnp.arange(t)
    causal = jnp.arange(s)[None, :] <= query_slots[:, None]
    mask = causal[None] & (key_positions >= 0)[:, None, :]
    if window is not None:
        mask &= (query_positions[:, :, None] - key_positions[:, None, :]) < window
    return mask


def _positions_within_segments(segment_ids: jax.Array) -> jax.Array:
    """0, 1, 2, ... restarting wherever the segment id changes along the row."""
    t = jnp.arange(segment_ids.shape[1])
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return (t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)).astype(jnp.int32)


class Decoder(nnx.Module):
    """Causal LM: embeddings -> stacked decoder layers -> final RMSNorm -> (tied) output head."""

    def __init__(self, config: ModelConfig, options: RuntimeOptions = RuntimeOptions(), *, rngs: nnx.Rngs | None = None):
        self.config, self.options = config, options
        v, d = config.vocab_size, config.hidden_size
        init = jax.nn.initializers.normal(config.initializer_range)
        self.embed = _param(rngs, (v, d), ("vocab", "embed"), options.jnp_param_dtype, init)
        self.layers = _stacked_layers(config, options, rngs)
        self.final_norm = RMSNorm(d, config.rms_norm_eps, options)
        if not config.tie_word_embeddings:
            self.lm_head = _param(rngs, (d, v), ("embed", "vocab"), options.jnp_param_dtype, init)

    def unembed_kernel(self) -> jax.Array:
        """The [embed, vocab] output projection (the transposed embedding when tied)."""
        kernel = self.embed[...].T if self.config.tie_word_embeddings else self.lm_head[...]
        return kernel.astype(self.options.jnp_dtype)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        hidden_layers: Sequence[int] = (),
        return_logits: bool = True,
        segment_ids: jax.Array | None = None,
        layer_states: tuple[nnx.State, ...] | None = None,
    ) -> DecoderOutput:
        """Run the decoder.

        input_ids [B,T]; attention_mask [B,T] (1 real token, 0 padding, left or right);
        positions [B,T] default to counting real tokens (continuing after the cache's).
        With a cache, the T new tokens are written at `cache.index` and the cache returned.
        hidden_layers: indices i in [0, num_layers] of the residual stream to return, i = the
        output of the first i layers (0 = embeddings), as transformers' `hidden_states[i]` (whose last entry,
        i = num_layers, is taken after the final norm, so it is here too).
        segment_ids [B,T]: packed rows; tokens attend only within their own segment, and default
        positions restart at 0 in each segment (no cache).
        layer_states: `self.layer_states()`, taken once outside a decoding loop, so that the steps inside it
        do not slice the stacked weights (with a cache the layers always run unrolled, on these or on
        slices taken in the call).
        """
        inputs = self.prepare(input_ids, attention_mask, positions, cache, segment_ids)
        x, k_all, v_all, per_layer = self._run_layers(
            inputs.x, inputs.cos, inputs.sin, inputs.mask, cache, bool(hidden_layers), layer_states
        )
        hidden_states = None
        if hidden_layers:
            last = self.config.num_layers
            hidden_states = jnp.stack([self.final_norm(per_layer[i]) if i == last else per_layer[i] for i in hidden_layers])
        new_cache = None
        if cache is not None:
            t = input_ids.shape[1]
            new_cache = KVCache(k=k_all, v=v_all, positions=inputs.key_positions, index=cache.index + t)
        return self._output(x, return_logits, hidden_states, new_cache)

    def prefill(
        self, input_ids: jax.Array, attention_mask: jax.Array, slots: int, return_logits: bool = True
    ) -> DecoderOutput:
        """Run prompts into a new cache of `slots` slots (as `KVCache.init` makes it): their keys and values fill
        slots 0..T-1 and decoding continues at slot T. Arguments as in __call__.

        The same outputs and cache as `__call__` on an empty cache, but the layers run as in a forward
        without a cache: one scanned layer program (with `scan_layers`) reading only the prompts' own keys.
        Through `__call__`, each layer is traced and compiled on its own against every cache length a
        step may read, which was half of a sampler's compilation (BENCHMARKS.md's generation findings)."""
        batch, t = input_ids.shape
        if slots < t:
            raise ValueError(f"a cache of {slots} slots cannot hold prompts of {t} tokens")
        inputs = self.prepare(input_ids, attention_mask)
        x, keys, values, _ = self._run_layers(inputs.x, inputs.cos, inputs.sin, inputs.mask, None, False, keep_kv=True)
        empty = KVCache.init(self.config, batch, slots, self.options.jnp_dtype)

        def fill(cache_slots: jax.Array, prompt: jax.Array) -> jax.Array:
            return jax.lax.dynamic_update_slice(cache_slots, prompt.astype(cache_slots.dtype), (0,) * cache_slots.ndim)

        cache = KVCache(
            k=tuple(fill(empty_k, _swap_slots_last(keys[i])) for i, empty_k in enumerate(empty.k)),
            v=tuple(fill(empty_v, values[i]) for i, empty_v in enumerate(empty.v)),
            positions=fill(empty.positions, inputs.key_positions),
            index=jnp.asarray(t, jnp.int32),
        )
        return self._output(x, return_logits, None, cache)

    def _output(self, x, return_logits, hidden_states, cache) -> DecoderOutput:
        """The final norm and (optionally) the output head on the last layer's residual stream."""
        hidden = self.final_norm(x)
        logits = self.logits(hidden) if return_logits else None
        return DecoderOutput(logits=logits, hidden=hidden, hidden_states=hidden_states, cache=cache)

    def prepare(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: KVCache | None = None,
        segment_ids: jax.Array | None = None,
    ) -> "LayerInputs":
        """Embeddings, attention mask and rotary tables for the layers (arguments as in __call__)."""
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids, dtype=jnp.int32)
        valid = attention_mask.astype(bool)
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed rows) are for training forwards, not KV-cache decoding")
        if cache is not None:
            _check_cache_room(cache, input_ids.shape[1])
        if positions is None and segment_ids is not None:
            positions = _positions_within_segments(segment_ids)
        elif positions is None:
            start = -1 if cache is None else jnp.max(cache.positions, axis=1, keepdims=True)
            positions = start + jnp.cumsum(valid, axis=1, dtype=jnp.int32)
        positions = jnp.where(valid, positions, -1).astype(jnp.int32)
        if cache is None:
            key_positions, query_start = positions, 0
        else:
            key_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
            query_start = cache.index
        if cache is None and fused_attention.uses_kernel(self.options.attention, input_ids.shape[1]):
            mask = fused_attention.kernel_segments(valid, segment_ids)
        else:
            mask = build_attention_mask(positions, key_positions, query_start, self.config.sliding_window)
            if segment_ids is not None:
                mask &= segment_ids[:, :, None] == segment_ids[:, None, :]
        inv_freq = inverse_frequencies(self.config.rope, self.config.head_dim)
        cos, sin = (constrain_batch(t) for t in rotary_tables(jnp.maximum(positions, 0), inv_freq, self.options.jnp_dtype))
        x = constrain_batch(jnp.take(gather_replicated(self.embed[...]), input_ids, axis=0).astype(self.options.jnp_dtype))
        return LayerInputs(x=x, cos=cos, sin=sin, mask=mask, key_positions=key_positions)

    def layer(self, index: int) -> DecoderLayer:
        """Layer `index` as its own module (a view of the stacked parameters), for layer-by-layer work."""
        graphdef, stacked = nnx.split(self.layers)
        return nnx.merge(graphdef, _layer_state(stacked, index))

    def layer_states(self) -> tuple[nnx.State, ...]:
        """Each layer's parameters as arrays of their own.

        A jitted decoding loop takes these once, before the loop: XLA's CPU backend copies a layer's
        weights out of the stacked arrays whenever a step slices them, which doubled the weight traffic
        of every decoded token (profiled; bench/generate.py times the sampler)."""
        stacked = nnx.state(self.layers)
        return tuple(_layer_state(stacked, i) for i in range(self.config.num_layers))

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Output logits [..., vocab] of final-norm hidden states."""
        return jnp.einsum("...d,dv->...v", hidden, self.unembed_kernel())

    def _run_layers(self, x, cos, sin, mask, cache, keep_hidden, layer_states=None, keep_kv=False):
        """Apply every layer; returns (x, keys, values, residual stream per layer). Keys and values come
        per layer: the cache's with a cache, else each layer's own [B,K,T,H] when `keep_kv` (stacked along
        a leading layers axis when scanned), else None."""
        graphdef, stacked = nnx.split(self.layers)
        if cache is not None:
            return self._run_cached_layers(graphdef, layer_states or self.layer_states(), x, cos, sin, mask, cache, keep_hidden)

        def layer_step(x, layer_state):
            x, k, v = nnx.merge(graphdef, layer_state)(x, cos, sin, mask)
            return constrain_batch(x), (k, v) if keep_kv else (None, None)

        if self.options.remat != "none":
            layer_step = jax.checkpoint(layer_step, policy=_REMAT_POLICIES[self.options.remat])

        if self.options.scan_layers:

            def body(x, layer_state):
                x, kv = layer_step(x, layer_state)
                return x, (x if keep_hidden else None, kv)

            x_out, (outputs, (keys, values)) = jax.lax.scan(body, x, stacked)
            per_layer = None if outputs is None else jnp.concatenate([x[None], outputs])
        else:
            per_layer, kvs = [x], []
            for i in range(self.config.num_layers):
                x, kv = layer_step(per_layer[-1], _layer_state(stacked, i))
                per_layer.append(x)
                kvs.append(kv)
            x_out = per_layer[-1]
            keys, values = (tuple(kv[j] for kv in kvs) if keep_kv else None for j in range(2))
        return x_out, keys, values, per_layer

    def _run_cached_layers(self, graphdef, layer_states, x, cos, sin, mask, cache, keep_hidden):
        """The layers unrolled over per-layer parameters, each writing its own arrays of the cache."""
        keys, values, per_layer = [], [], [x]
        for state, k_cache, v_cache in zip(layer_states, cache.k, cache.v, strict=True):
            x, k, v = nnx.merge(graphdef, state)(x, cos, sin, mask, k_cache, v_cache, cache.index)
            x = constrain_batch(x)
            keys.append(k)
            values.append(v)
            per_layer.append(x)
        return x, tuple(keys), tuple(values), per_layer if keep_hidden else None
