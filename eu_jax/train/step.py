"""The pure train step: forward both halves of the batch, the weighted objective, AdamW.

`make_train_step` returns a function of (state, batch, reference params) that `jax.jit` compiles
once with explicit shardings and a donated state. Gradients are accumulated over micro-batches
inside the step with `lax.scan`; an update whose loss is not finite is skipped (params and optimizer
state keep their last good value) and flagged so the loop can stop with the step and term named.
Objectives that read a frozen reference model get its outputs in the batch, from a program of its own
that runs before the step (`make_reference_forward`, `with_reference_outputs`).
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


def _reference_forwards(reference: Decoder, batch: Batch, needs: Requirements) -> Batch:
    """The frozen reference's outputs on every sequence set that the objective reads them on, keyed like the
    batch: `ref_hidden` (final-norm hidden states, for its logits) and `ref_layer_hidden` (the residual stream
    at the side's hidden layer), prefixed like their sequences (`preferred_`)."""
    outputs: Batch = {}
    for name in ("retain", "forget"):
        side_needs: SideRequirements = getattr(needs, name)
        sequences = [("", side_needs)] + ([("preferred_", side_needs.for_preferred())] if side_needs.preferred else [])
        for prefix, seq_needs in sequences:
            if not seq_needs.needs_reference:
                continue
            out = _forward(reference, batch[name], _layers(seq_needs), prefix)
            side = outputs.setdefault(name, {})
            if seq_needs.reference_logits:
                side[prefix + "ref_hidden"] = out.hidden
            if seq_needs.reference_hidden:
                side[prefix + "ref_layer_hidden"] = out.hidden_states[0]
    return outputs


def _carried_reference(side: dict[str, jax.Array], key: str, needed: bool) -> jax.Array | None:
    """The reference's output `key` that a batch half carries, where the objective reads it."""
    if not needed:
        return None
    if key not in side:
        raise ValueError(
            f"the batch lacks the frozen reference's {key!r}: add the outputs of make_reference_forward's "
            "function to the batch (with_reference_outputs) before the step"
        )
    return side[key]


def _target_mask(side: dict[str, jax.Array], prefix: str = "") -> jax.Array:
    """[B, T-1]: 1 on the target tokens that count (position t scores token t+1); packed rows never score a
    token from the end of the previous example."""
    attention = side[prefix + "attention_mask"]
    mask = (side[prefix + "loss_mask"][:, 1:] * attention[:, 1:]).astype(jnp.float32)
    segments = side.get(prefix + "segment_ids")
    if segments is not None:
        mask = mask * (segments[:, 1:] == segments[:, :-1])
    return mask


def _half_counts(batch: Batch) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per half, the counted tokens and the sequences with any: what a micro-batch's means divide by."""
    counts = {}
    for name in ("retain", "forget"):
        mask = _target_mask(batch[name])
        counts[name] = (jnp.sum(mask), jnp.sum(jnp.sum(mask, axis=-1) > 0).astype(jnp.float32))
    return counts


def _side_inputs(
    model: Decoder,
    side: dict[str, jax.Array],
    needs: SideRequirements,
    chunk_tokens: int,
    ref_kernel: jax.Array | None,
    prefix: str = "",
    out: DecoderOutput | None = None,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> SideInputs:
    """The term inputs of one half: the policy's forward (unless its output `out` is given), and the
    reference's outputs that the batch carries (`with_reference_outputs`).

    Position t predicts token t+1, so statistics and the mask are over targets ids[:, 1:]. Rows may
    pack several examples (`segment_ids`); attention and targets then stay inside each example.
    Residual streams are taken at the target tokens themselves (RMU steers their activations).
    """
    ids = side[prefix + "input_ids"]
    layers = _layers(needs)
    out = _forward(model, side, layers, prefix) if out is None else out
    preferred = None
    if needs.preferred:
        preferred = _side_inputs(model, side, needs.for_preferred(), chunk_tokens, ref_kernel, prefix="preferred_")
    ref_hidden = _carried_reference(side, prefix + "ref_hidden", needs.reference_logits)
    ref_layer_hidden = _carried_reference(side, prefix + "ref_layer_hidden", needs.reference_hidden)
    return make_side_inputs(
        needs,
        _target_mask(side, prefix),
        ids[:, 1:],
        out.hidden[:, :-1],
        model.unembed_kernel(),
        ref_final_hidden=None if ref_hidden is None else ref_hidden[:, :-1],
        ref_kernel=ref_kernel if needs.reference_logits else None,
        layer_hidden=out.hidden_states[0][:, 1:] if layers else None,
        ref_layer_hidden=None if ref_layer_hidden is None else ref_layer_hidden[:, 1:],
        preferred=preferred,
        chunk_tokens=chunk_tokens,
        counts=counts,
    )


def make_loss_fn(
    config: ModelConfig, options: RuntimeOptions, objective: Objective, chunk_tokens: int
) -> Callable[[Params, Params | None, Batch], tuple[jax.Array, dict[str, jax.Array]]]:
    """The objective on a batch that carries the reference's outputs; of the reference params it reads only the
    output projection (for the reference's logits)."""
    needs = objective.requirements()

    def loss_fn(params, reference_params, batch, counts=None):
        model = build_decoder(config, params, options)
        ref_kernel = None
        if reference_params is not None and (needs.retain.reference_logits or needs.forget.reference_logits):
            ref_kernel = build_decoder(config, reference_params, options).unembed_kernel()
        joint = _joint_forward(model, batch, needs) or {}
        retain, forget = (
            _side_inputs(model, batch[name], getattr(needs, name), chunk_tokens, ref_kernel, out=joint.get(name),
                         counts=None if counts is None else counts[name])
            for name in ("retain", "forget")
        )
        return objective(retain, forget)

    return loss_fn


def make_reference_forward(
    config: ModelConfig, options: RuntimeOptions, objective: Objective, microbatches: int = 1
) -> Callable[[Params, Batch], Batch] | None:
    """The frozen reference's forward on a step's batch, as a program of its own (None when the objective reads
    no reference): its outputs, {half: {name: [B,T,D]}}, go into the batch (`with_reference_outputs`).

    Run apart from the train step, the reference's temporaries (its weights cast to the compute dtype where
    stored narrower, its layers' activations) are freed before the step allocates its own, so the step holds
    only the [B,T,D] outputs and the reference's output projection. In one program XLA:CPU widened the bf16
    reference's stacked weights while the step's saved-activation buffers were already live: the SmolLM2 NPO
    step's temporaries were 0.44 GB above the EU step's, apart 0.12 GB (BENCHMARKS.md). With micro-batches it
    runs one micro-batch at a time, as the step does."""
    needs = objective.requirements()
    if not needs.needs_reference:
        return None

    def reference_forward(reference_params: Params, batch: Batch) -> Batch:
        reference = build_decoder(config, reference_params, options)
        if microbatches == 1:
            return _reference_forwards(reference, batch, needs)
        forwards = jax.lax.map(lambda micro: _reference_forwards(reference, micro, needs), split_microbatches(batch, microbatches))
        return merge_microbatches(forwards)

    return reference_forward


def with_reference_outputs(batch: Batch, outputs: Batch) -> Batch:
    """The batch with the reference's outputs (from `make_reference_forward`'s function) added to its halves."""
    return {name: {**side, **outputs.get(name, {})} for name, side in batch.items()}


def split_microbatches(batch: Batch, count: int) -> Batch:
    """[B, ...] -> [count, B/count, ...], taking every count-th row so that each device's rows
    split evenly across micro-batches and no data moves between devices."""

    def split(x):
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape((rows // count, count) + x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def merge_microbatches(micro: Batch) -> Batch:
    """The inverse of `split_microbatches`: [count, B/count, ...] -> [B, ...] in the batch's row order."""

    def merge(x):
        return jnp.swapaxes(x, 0, 1).reshape((-1,) + x.shape[2:])

    return jax.tree.map(merge, micro)


def _accumulated_grads(grad_fn, params: Params, reference_params: Params | None, batch: Batch, microbatches: int):
    """The whole batch's gradients and metrics, summed over its micro-batches in a scan: every micro-batch's
    means divide by the whole half-batch's counts (`_half_counts`), so the sums are exactly the one-batch
    values, whatever the micro-batches' token counts."""
    micro = split_microbatches(batch, microbatches)
    counts = _half_counts(batch)

    def accumulate(carry, microbatch):
        (_, metrics), grads = grad_fn(params, reference_params, microbatch, counts)
        return jax.tree.map(jnp.add, carry, (grads, metrics)), None

    zero_grads = jax.tree.map(jnp.zeros_like, params)
    first = jax.tree.map(lambda x: x[0], micro)
    zero_metrics = jax.tree.map(jnp.zeros_like, jax.eval_shape(grad_fn, params, reference_params, first, counts)[0][1])
    (grads, metrics), _ = jax.lax.scan(accumulate, (zero_grads, zero_metrics), micro)
    return grads, metrics


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

        grad_norm = optax.tree.norm(grads)  # a finite loss can still have inf/NaN gradients (overflow in the backward)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in [*metrics.values(), grad_norm]]))

        def update(params_and_opt_state):
            params, opt_state = params_and_opt_state
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        # A branch, not `where(finite, new, old)` per leaf: XLA then updated the donated AdamW moments in place
        # only after copying both (the new params read the old moments, which the new moments overwrite), a
        # second copy of them held through the whole step (1.08 GB on SmolLM2, BENCHMARKS.md).
        params, opt_state = jax.lax.cond(finite, update, lambda kept: kept, (state.params, state.opt_state))
        metrics = dict(metrics, grad_norm=grad_norm, learning_rate=schedule(state.step), finite=finite)
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            rng=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)),
        )
        return new_state, metrics

    return train_step
