"""Jitted sampling over the KV cache: one prefill, then one-token steps inside `lax.while_loop`.

Prompts are left-padded into one batch; every row writes the same cache slot each step, and
padding slots carry position -1 so they are never attended to. The whole generation (prefill,
sampling, stop checks, the decode loop) is one jitted function, so no Python runs per token.

Recompilation is kept rare: the padded prompt length is rounded up to a bucket (`bucket_length`),
the EOS and stop-sequence arrays to fixed multiples, and the sampling knobs and the seed are traced
values. A compilation is selected by the model, `max_new_tokens`, greedy or not, the mesh, the batch
size, the bucketed lengths and the length of a shared beginning (below) only.

Prompts that begin alike (an evaluation's jailbreak template around different requests) have their
common beginning prefilled once and shared by every row's cache (`shared_prefix_length`); the rest of
each prompt is prefilled after it, left-padded, against that cache.

Sampling is reproducible: row r at step s draws with fold_in(fold_in(key(seed), s), r), so a row's
tokens depend on the seed, its index and its own prompt, not on the other rows or on the padding.
"""

from __future__ import annotations

import math
import os
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eu_jax.models.llama import Decoder, DecoderOutput, KVCache
from eu_jax.parallel.sharding import BATCH_AXES, activation_sharding, batch_sharding, to_host

FinishReason = Literal["eos", "stop", "length"]
_LENGTH, _EOS, _STOP = 0, 1, 2
_REASONS: tuple[FinishReason, ...] = ("length", "eos", "stop")
MIN_PROMPT_BUCKET = 32
# A common beginning is shared when it is at least this long, cut to a multiple of the step (few compiled shapes).
MIN_SHARED_PREFIX = 64
SHARED_PREFIX_STEP = 32


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. temperature 0 is greedy (argmax); top_k 0 and top_p 1 are off.

    The filters apply in the usual order (as transformers' logits warpers): temperature, then top-k,
    then top-p over what top-k kept. Ties at a cut-off are all kept.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if not (0 <= self.temperature < math.inf):  # NaN fails too: it would turn every logit into NaN
            raise ValueError(f"temperature={self.temperature} must be a finite number >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 is off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1 is off)")
        if not 0 <= self.seed < 2**32:  # it is traced as a uint32
            raise ValueError(f"seed={self.seed} must be in [0, 2**32 - 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Completion:
    """One row's new tokens, up to and including the EOS token or stop sequence that ended it."""

    tokens: list[int]
    finish_reason: FinishReason
    end_length: int  # trailing tokens that are the EOS or the stop sequence (0 for "length")

    @property
    def content(self) -> list[int]:
        """The tokens without the trailing EOS / stop sequence: what a reader should see."""
        return self.tokens[: len(self.tokens) - self.end_length]


@dataclass(frozen=True)
class GenerationResult:
    completions: list[Completion]  # one per prompt, in order

    @property
    def tokens(self) -> list[list[int]]:
        return [c.tokens for c in self.completions]

def left_pad(
    sequences: Sequence[Sequence[int]], pad_id: int = 0, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (input_ids, attention_mask), both [batch, width or longest], padded on the left."""
    width = max(len(s) for s in sequences) if width is None else width
    ids = np.full((len(sequences), width), pad_id, np.int32)
    mask = np.zeros((len(sequences), width), np.int32)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = seq
            mask[row, width - len(seq) :] = 1
    return ids, mask


def bucket_length(n: int, minimum: int = MIN_PROMPT_BUCKET) -> int:
    """Round a padded length up to a bucket, so new lengths rarely recompile (prompts here; scoring, and
    UniErase's training rows, moments and edit batches too).

    At least `minimum`; above it, a multiple of a quarter of the power of two below `n`: four sizes per
    doubling, at most 25% extra padding (padding is masked, so results do not change).
    """
    if n <= minimum:
        return minimum
    step = (1 << (n.bit_length() - 1)) // 4
    return -(-n // step) * step


def _order_keys(x: jax.Array) -> jax.Array:
    """fp32 -> uint32 keys in the same order (-inf lowest), so thresholds can be searched over integers."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _lowest_key_with_less_above(keys: jax.Array, weights: jax.Array | float, bound: jax.Array) -> jax.Array:
    """[B, V] keys -> [B]: per row, the smallest key t whose strictly greater keys weigh less than `bound`.

    A bisection over the 32-bit key range (32 passes over the logits, no sort). With unit weights and
    bound k that is the k-th largest key; with probabilities and bound p, the lowest key of the nucleus.
    """

    def halve(_, bounds):
        low, high = bounds  # the answer lies in (low, high]
        middle = low + (high - low) // 2
        less = jnp.sum(jnp.where(keys > middle[:, None], weights, 0), axis=-1) < bound
        return jnp.where(less, low, middle), jnp.where(less, middle, high)

    start = (jnp.min(keys, axis=-1) - 1, jnp.max(keys, axis=-1))
    return jax.lax.fori_loop(0, 32, halve, start)[1]


def filter_logits(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """[B, V] logits -> fp32 logits scaled by 1/temperature with filtered-out tokens at -inf.

    top_k <= 0 and top_p >= 1 are off (and cost nothing). The nucleus keeps a token when the probability
    of the tokens above it is below top_p, so the most likely token always survives. The cut-offs are
    found by bisection instead of a sort of the vocabulary (which took ~0.4 s per step at 48 rows on CPU).
    """
    logits = logits.astype(jnp.float32) / temperature
    keys = _order_keys(logits)
    lowest = jnp.min(keys, axis=-1)
    k = jnp.minimum(top_k, logits.shape[-1]).astype(jnp.float32)
    lowest = jax.lax.cond(top_k > 0, lambda: _lowest_key_with_less_above(keys, 1.0, k), lambda: lowest)

    def nucleus() -> jax.Array:
        probs = jax.nn.softmax(jnp.where(keys >= lowest[:, None], logits, -jnp.inf), axis=-1)
        # Never below the top-k cut: the kept mass may sum in float32 to just under a top_p near 1.
        return jnp.maximum(lowest, _lowest_key_with_less_above(keys, probs, top_p))

    lowest = jax.lax.cond(top_p < 1, nucleus, lambda: lowest)
    return jnp.where(keys >= lowest[:, None], logits, -jnp.inf)


def _draw(row_key: jax.Array, logits: jax.Array) -> jax.Array:
    """A token of softmax(logits) by inverting its CDF with one uniform draw in (0, 1]: a token at -inf is
    never drawn. One random number per row, where a Gumbel draw needs one per vocabulary entry (51 ms at
    48 rows on CPU, against 8 ms for the whole choice now; profiled, BENCHMARKS.md findings)."""
    cdf = jnp.cumsum(jax.nn.softmax(logits), axis=-1)
    target = (1.0 - jax.random.uniform(row_key)) * cdf[-1]
    return jnp.sum(cdf < target).astype(jnp.int32)


@flax.struct.dataclass
class _Knobs:
    """The traced sampling settings (changing them does not recompile)."""

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array

    @classmethod
    def of(cls, sampling: SamplingConfig) -> "_Knobs":
        return cls(
            temperature=np.float32(sampling.temperature),  # unused when greedy (0)
            top_k=np.int32(sampling.top_k),
            top_p=np.float32(sampling.top_p),
            seed=np.uint32(sampling.seed),
        )


def _round_up(n: int, multiple: int) -> int:
    return -(-max(n, 1) // multiple) * multiple


@flax.struct.dataclass
class _Stops:
    """EOS ids [E] and stop sequences, right-aligned in [S, L] with a validity mask and lengths [S].

    All three sizes are rounded up (fillers: EOS -1 and empty sequences, which never match), so a
    different set of EOS ids or stop strings usually reuses the compilation.
    """

    eos: jax.Array
    sequences: jax.Array
    valid: jax.Array
    lengths: jax.Array

    @classmethod
    def of(cls, eos_token_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]]) -> "_Stops":
        if any(len(s) == 0 for s in stop_sequences):
            raise ValueError("stop sequences must not be empty")
        eos = np.full(_round_up(len(eos_token_ids), 8), -1, np.int32)
        eos[: len(eos_token_ids)] = eos_token_ids
        stops = list(stop_sequences) + [[]] * (_round_up(len(stop_sequences), 4) - len(stop_sequences))
        width = _round_up(max(len(s) for s in stops), 8)
        sequences, valid = left_pad(stops, pad_id=-1, width=width)
        return cls(eos, sequences, valid.astype(bool), np.asarray([len(s) for s in stops], np.int32))

    @property
    def width(self) -> int:
        return self.sequences.shape[1]


@flax.struct.dataclass
class _Decoding:
    """The while_loop carry. `history` holds `width - 1` columns of -1 before the new tokens, so
    the stop-sequence window is a fixed-size slice even at the first steps."""

    step: jax.Array
    cache: KVCache
    history: jax.Array  # [B, width - 1 + max_new_tokens] int32
    done: jax.Array  # [B] bool
    reason: jax.Array  # [B] int32, _LENGTH / _EOS / _STOP
    length: jax.Array  # [B] int32, new tokens including the ending
    end_length: jax.Array  # [B] int32


def _last_logits(model: Decoder, out: DecoderOutput) -> jax.Array:
    """fp32 logits of the last position only: the prefill never projects every prompt position."""
    return jnp.einsum("bd,dv->bv", out.hidden[:, -1], model.unembed_kernel()).astype(jnp.float32)


def _choose(logits: jax.Array, knobs: _Knobs, step: jax.Array, greedy: bool) -> jax.Array:
    """Next token per row: argmax, or a draw from the filtered logits with the row's own key."""
    if greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits, knobs.temperature, knobs.top_k, knobs.top_p)
    step_key = jax.random.fold_in(jax.random.key(knobs.seed), step)
    row_keys = jax.vmap(lambda row: jax.random.fold_in(step_key, row))(jnp.arange(logits.shape[0]))
    return jax.vmap(_draw)(row_keys, filtered)


def _stop_match_length(window: jax.Array, stops: _Stops) -> jax.Array:
    """[B, L] last tokens -> [B] length of the longest stop sequence they end with (0: none)."""
    equal = window[:, None, :] == stops.sequences[None]
    matched = jnp.all(equal | ~stops.valid[None], axis=-1) & (stops.lengths > 0)[None]
    return jnp.max(jnp.where(matched, stops.lengths[None], 0), axis=-1)


def _record(state: _Decoding, token: jax.Array, stops: _Stops, pad_id: jax.Array) -> _Decoding:
    """Write this step's tokens and end the rows that produced an EOS or completed a stop sequence."""
    token = jnp.where(state.done, pad_id, token)
    history = jax.lax.dynamic_update_slice(state.history, token[:, None], (0, state.step + stops.width - 1))
    window = jax.lax.dynamic_slice(history, (0, state.step), (history.shape[0], stops.width))
    is_eos = jnp.isin(token, stops.eos) & ~state.done
    stop_length = jnp.where(is_eos | state.done, 0, _stop_match_length(window, stops))
    ended = is_eos | (stop_length > 0)
    return state.replace(
        step=state.step + 1,
        history=history,
        done=state.done | ended,
        reason=jnp.where(is_eos, _EOS, jnp.where(stop_length > 0, _STOP, state.reason)),
        length=jnp.where(ended, state.step + 1, state.length),
        end_length=jnp.where(is_eos, 1, jnp.where(stop_length > 0, stop_length, state.end_length)),
    )


def _constrain_cache(cache: KVCache, mesh: Mesh | None) -> KVCache:
    """Pin the cache's batch axis to the data-parallel mesh axes (the loop carry keeps that layout)."""
    if mesh is None:
        return cache
    free = PartitionSpec.UNCONSTRAINED
    kv = NamedSharding(mesh, PartitionSpec(BATCH_AXES, free, None, None))  # each layer's [B, K, S, H]
    return cache.replace(
        k=jax.lax.with_sharding_constraint(cache.k, (kv,) * len(cache.k)),
        v=jax.lax.with_sharding_constraint(cache.v, (kv,) * len(cache.v)),
        positions=jax.lax.with_sharding_constraint(cache.positions, NamedSharding(mesh, PartitionSpec(BATCH_AXES))),
    )


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares and `generate` prefills once: their longest common
    beginning, cut to a multiple of `SHARED_PREFIX_STEP` and short of every prompt's last token (whose
    logits start decoding), or 0 when that is under `MIN_SHARED_PREFIX` tokens or there is one prompt."""
    if len(prompts) < 2:
        return 0
    common = min(len(os.path.commonprefix([list(p) for p in prompts])), min(len(p) for p in prompts) - 1)
    common -= common % SHARED_PREFIX_STEP
    return common if common >= MIN_SHARED_PREFIX else 0


def _prefill(model: Decoder, prefix_ids, input_ids, attention_mask, slots: int) -> DecoderOutput:
    """The prompts into a new cache of `slots` slots. With `prefix_ids` ([shards, P]: the shared beginning,
    once per data-parallel shard so it splits like the batch), that is prefilled on its own, its cache
    repeated for every row, and the prompts' remainders (`input_ids`) run after it against that cache."""
    if prefix_ids is None:
        return model.prefill(input_ids, attention_mask, slots, return_logits=False)
    shared = model.prefill(prefix_ids, jnp.ones_like(prefix_ids), slots, return_logits=False).cache
    repeat = partial(jnp.repeat, repeats=input_ids.shape[0] // prefix_ids.shape[0], axis=0)
    cache = shared.replace(k=tuple(map(repeat, shared.k)), v=tuple(map(repeat, shared.v)), positions=repeat(shared.positions))
    return model(input_ids, attention_mask, cache=cache, return_logits=False)


@partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "greedy", "mesh"))
def _generate_loop(
    graphdef, state, prefix_ids, input_ids, attention_mask, live, stops, knobs, pad_id, max_new_tokens, greedy, mesh
):
    """Prefill (after the shared `prefix_ids` when given), then decode until every row is done or
    `max_new_tokens` are out. Returns (new tokens [B, max_new_tokens], finish reason, length, end length),
    each per row."""
    with activation_sharding(mesh) if mesh is not None else nullcontext():
        model: Decoder = nnx.merge(graphdef, state)
        # XLA's CPU backend copies a layer's weights out of the stack whenever a step slices them, so on CPU
        # the slices are taken once, here, for one more copy of the layer weights while sampling. Elsewhere
        # that memory matters more (large models on accelerators; not measured here) and steps slice as before.
        layers = model.layer_states() if jax.default_backend() == "cpu" else None
        batch, prompt_len = input_ids.shape
        shared_len = 0 if prefix_ids is None else prefix_ids.shape[1]
        out = _prefill(model, prefix_ids, input_ids, attention_mask, shared_len + prompt_len + max_new_tokens)
        start = _Decoding(
            step=jnp.int32(0),
            cache=_constrain_cache(out.cache, mesh),
            history=jnp.full((batch, stops.width - 1 + max_new_tokens), -1, jnp.int32),
            done=~live,
            reason=jnp.full((batch,), _LENGTH, jnp.int32),
            length=jnp.full((batch,), max_new_tokens, jnp.int32),
            end_length=jnp.zeros((batch,), jnp.int32),
        )
        first = _record(start, _choose(_last_logits(model, out), knobs, start.step, greedy), stops, pad_id)

        def keep_going(s: _Decoding) -> jax.Array:
            return (s.step < max_new_tokens) & ~jnp.all(s.done)

        def decode_one(s: _Decoding) -> _Decoding:
            previous = s.history[:, s.step + stops.width - 2]
            out = model(previous[:, None], jnp.ones_like(previous)[:, None], cache=s.cache, return_logits=False, layer_states=layers)
            token = _choose(_last_logits(model, out), knobs, s.step, greedy)
            return _record(s.replace(cache=_constrain_cache(out.cache, mesh)), token, stops, pad_id)

        final = jax.lax.while_loop(keep_going, decode_one, first)
        tokens = final.history[:, stops.width - 1 :]
        return tokens, final.reason, final.length, final.end_length


def _batch_rows(num_prompts: int, mesh: Mesh | None) -> int:
    """Rows in the batch: the prompts, rounded up so the data-parallel mesh axes divide it."""
    if mesh is None:
        return num_prompts
    shards = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES if axis in mesh.shape]))
    return -(-num_prompts // shards) * shards


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    sampling: SamplingConfig = SamplingConfig(),
    eos_token_ids: Sequence[int] = (),
    stop_sequences: Sequence[Sequence[int]] = (),
    pad_id: int = 0,
    mesh: Mesh | None = None,
) -> GenerationResult:
    """Continue every prompt (token ids) until EOS, a stop sequence or `max_new_tokens`, per row.

    A row ends at the first token in `eos_token_ids` (finish reason "eos") or when its new tokens end
    with one of `stop_sequences` (token-id sequences, matched on generated tokens only; "stop"); the
    ending is kept in `tokens` and left out of `content`. A long beginning that every prompt shares is
    prefilled once (`shared_prefix_length`). With `mesh`, the params must already be
    sharded on it; the batch is split over its data-parallel axes (padded with dummy rows to divide
    them) and activations are constrained to that layout.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt needs at least one token")
    rows = _batch_rows(len(prompts), mesh)
    shared = shared_prefix_length(prompts)
    rests = [p[shared:] for p in prompts]
    padded = rests + [[pad_id]] * (rows - len(prompts))
    ids, mask = left_pad(padded, pad_id, width=bucket_length(max(len(p) for p in rests)))
    live = np.arange(rows) < len(prompts)
    prefix = np.tile(np.asarray(prompts[0][:shared], np.int32), (_batch_rows(1, mesh), 1)) if shared else None
    stops, knobs = _Stops.of(eos_token_ids, stop_sequences), _Knobs.of(sampling)
    if mesh is not None:
        ids, mask, live, prefix = jax.device_put((ids, mask, live, prefix), batch_sharding(mesh))
        stops, knobs = jax.device_put((stops, knobs), NamedSharding(mesh, PartitionSpec()))
    graphdef, state = nnx.split(model)
    outputs = _generate_loop(
        graphdef, state, prefix, ids, mask, live, stops, knobs, np.int32(pad_id), sampling.max_new_tokens, sampling.greedy, mesh
    )
    tokens, reasons, lengths, end_lengths = (to_host(x)[: len(prompts)] for x in outputs)
    return GenerationResult(
        [
            Completion(row[:length].tolist(), _REASONS[reason], int(end))
            for row, reason, length, end in zip(tokens, reasons, lengths, end_lengths)
        ]
    )


def greedy_generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_ids: Sequence[int] = (),
    pad_id: int = 0,
) -> list[list[int]]:
    """Greedy continuation of each prompt, cut after the first EOS (which is kept)."""
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    return generate(model, prompts, sampling, eos_token_ids, pad_id=pad_id).tokens
