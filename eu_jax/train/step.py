"""The pure train step: forward both halves of the batch, the weighted objective, AdamW.

`make_train_step` returns a function of (state, batch, reference params) that `jax.jit` compiles
once with explicit shardings and a donated state. Gradients are accumulated over micro-batches
inside the step with `lax.scan`; an update whose loss is not finite is skipped (params keep their
last good value) and flagged so the loop can stop with the step and term named.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from eu_jax.models.config import ModelConfig, RuntimeOptions
from eu_jax.models.llama import Decoder, DecoderOutput
from eu_jax.models.state import Params, build_decoder
from eu_jax.objectives import Objective, Requirements, SideInputs, SideRequirements, make_side_inputs
from eu_jax.train.state import TrainState

Batch = dict[str, dict[str, jax.Array]]


def _forward(model: Decoder, side: dict[str, jax.Array], layers: tuple[int, ...], prefix: str = "") -> DecoderOutput:
    """The policy's forward over one half of the batch: final hidden states and the asked residual layers."""
    return model(side[prefix + "input_ids"], side[prefix + "attention_mask"], hidden_layers=layers, return_logits=False,
                 segment_ids=side.get(prefix + "segment_ids"))


def _layers(needs: SideRequirements) -> tuple[int, ...]:
    return () if needs.hidden_layer is None else (needs.hidden_layer,)


def _joint_forward(model: Decoder, batch: Batch, needs: Requirements) -> dict[str, DecoderOutput] | None:
    """Both halves in one forward, when their rows fit together (same shape, both packed or neither).

    Twice the rows per matmul and one pass over the weights instead of two, for the same numbers. Rows are
    interleaved (retain row i, forget row i, ...) so each device's rows stay on that device: its block of
    the batch axis holds its own retain and forget rows, and no data moves between devices."""
    retain, forget = batch["retain"], batch["forget"]
    if retain["input_ids"].shape != forget["input_ids"].shape or ("segment_ids" in retain) != ("segment_ids" in forget):
        return None
    layers = tuple(sorted({needs.retain.hidden_layer, needs.forget.hidden_layer} - {None}))

    def interleave(key: str) -> jax.Array:
        a, b = retain[key], forget[key]
        return jnp.stack([a, b], axis=1).reshape(-1, *a.shape[1:])

    out = _forward(model, {key: interleave(key) for key in retain if key in ("input_ids", "attention_mask", "segment_ids")}, layers)

    def half(x: jax.Array, index: int, axis: int = 0) -> jax.Array:
        shape = x.shape[:axis] + (x.shape[axis] // 2, 2) + x.shape[axis + 1 :]
        return jnp.take(x.reshape(shape), index, axis=axis + 1)

    outputs = {}
    for index, (name, side_needs) in enumerate((("retain", needs.retain), ("forget", needs.forget))):
        hidden_states = None
        if side_needs.hidden_layer is not None:
            hidden_states = half(out.hidden_states[layers.index(side_needs.hidden_layer)][None], index, axis=1)
        outputs[name] = DecoderOutput(logits=None, hidden=half(out.hidden, index), hidden_states=hidden_states, cache=None)
    return outputs


def _side_inputs(
    model: Decoder,
    reference: Decoder | None,
    side: dict[str, jax.Array],
    needs: SideRequirements,
    chunk_tokens: int,
    prefix: str = "",
    out: DecoderOutput | None = None,
) -> SideInputs:
    """Run the policy (unless its output `out` is given) and the frozen reference, when needed, on one half.

    Position t predicts token t+1, so statistics and the mask are over targets ids[:, 1:]. Rows may
    pack several examples (`segment_ids`); attention and targets then stay inside each example.
    Residual streams are taken at the target tokens themselves (RMU steers their activations).
    """
    ids, attention = side[prefix + "input_ids"], side[prefix + "attention_mask"]
    segments = side.get(prefix + "segment_ids")  # packed rows: several examples per row
    layers = _layers(needs)
    out = _forward(model, side, layers, prefix) if out is None else out
    ref_out = _forward(reference, side, layers, prefix) if needs.needs_reference else None
    preferred = None
    if needs.preferred:
        preferred = _side_inputs(model, reference, side, needs.for_preferred(), chunk_tokens, prefix="preferred_")
    mask = (side[prefix + "loss_mask"][:, 1:] * attention[:, 1:]).astype(jnp.float32)
    if segments is not None:  # never score a token from the end of the previous example
        mask = mask * (segments[:, 1:] == segments[:, :-1])
    return make_side_inputs(
        needs,
        mask,
        ids[:, 1:],
        out.hidden[:, :-1],
        model.unembed_kernel(),
        ref_final_hidden=ref_out.hidden[:, :-1] if needs.reference_logits else None,
        ref_kernel=reference.unembed_kernel() if needs.reference_logits else None,
        layer_hidden=out.hidden_states[0][:, 1:] if layers else None,
        ref_layer_hidden=ref_out.hidden_states[0][:, 1:] if needs.reference_hidden else None,
        preferred=preferred,
        chunk_tokens=chunk_tokens,
    )


def make_loss_fn(
    config: ModelConfig, options: RuntimeOptions, objective: Objective, chunk_tokens: int
) -> Callable[[Params, Params | None, Batch], tuple[jax.Array, dict[str, jax.Array]]]:
    needs = objective.requirements()

    def loss_fn(params, reference_params, batch):
        model = build_decoder(config, params, options)
        reference = None if reference_params is None else build_decoder(config, reference_params, options)
        joint = _joint_forward(model, batch, needs) or {}
        retain = _side_inputs(model, reference, batch["retain"], needs.retain, chunk_tokens, out=joint.get("retain"))
        forget = _side_inputs(model, reference, batch["forget"], needs.forget, chunk_tokens, out=joint.get("forget"))
        return objective(retain, forget)

    return loss_fn


def split_microbatches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B/count, ...], taking every count-th row so that each device's rows
    split evenly across micro-batches and no data moves between devices."""

    def split(x):
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def _accumulated_grads(grad_fn, params: Params, reference_params: Params | None, batch: Batch, microbatches: int):
    """Mean gradients and metrics over the batch's micro-batches, accumulated in a scan."""
    micro = split_microbatches(batch, microbatches)

    def accumulate(carry, microbatch):
        (_, metrics), grads = grad_fn(params, reference_params, microbatch)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, reference_params, first)[0][1])
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), micro)
    return jax.tree.map(lambda g: g / microbatches, grads), {k: v / microbatches for k, v in metrics.items()}


def make_train_step(
    config: ModelConfig,
    options: RuntimeOptions,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    microbatches: int = 1,
    chunk_tokens: int = 1024,
) -> Callable[[TrainState, Batch, Params | None], tuple[TrainState, dict[str, jax.Array]]]:
    grad_fn = jax.value_and_grad(make_loss_fn(config, options, objective, chunk_tokens), has_aux=True)

    def train_step(state: TrainState, batch: Batch, reference_params: Params | None):
        if microbatches == 1:  # no accumulator: a params-sized zero buffer and sum cost real time on hosts
            (_, metrics), grads = grad_fn(state.params, reference_params, batch)
        else:
            grads, metrics = _accumulated_grads(grad_fn, state.params, reference_params, batch, microbatches)

        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step), finite=finite)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
        )
        return new_state, metrics

    return train_step
