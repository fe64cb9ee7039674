"""Layer-by-layer forwards for knowledge editing: MLP keys, residual streams, and an added offset.

Editing needs three views of the model that a plain forward hides: the input of `mlp.down_proj` (the
"keys") at chosen layers and positions, the residual stream after a layer, and the rest of the network
run from that residual with an offset added at chosen positions. All three are `run_layers` over a span
of layers, built from the decoder's own layer modules, so they compute exactly what `Decoder.__call__`
computes (a test checks the logits against transformers).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from eu_jax.models.llama import Decoder, LayerInputs


def run_layers(
    model: Decoder, inputs: LayerInputs, x: jax.Array, start: int, stop: int, key_layers: Sequence[int] = ()
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """Apply layers [start, stop) to the residual stream x [B,T,D].

    Returns the residual after layer stop-1 and, for each layer in `key_layers` within the span, its
    down_proj input [B,T,F].
    """
    keys = {}
    for index in range(start, stop):
        layer = model.layer(index)
        x, _, _ = layer.attend(x, inputs.cos, inputs.sin, inputs.mask)
        layer_keys = layer.mlp.keys(layer.post_attn_norm(x))
        if index in key_layers:
            keys[index] = layer_keys
        x = x + layer.mlp.down(layer_keys)
    return x, keys


def at_positions(values: jax.Array, positions: jax.Array) -> jax.Array:
    """values [B,T,...] at one position per row, positions [B] -> [B,...]."""
    return jnp.take_along_axis(values, positions.reshape((-1,) + (1,) * (values.ndim - 1)), axis=1)[:, 0]


def add_at_positions(x: jax.Array, positions: jax.Array, offsets: jax.Array) -> jax.Array:
    """x [B,T,D] with offsets [B,D] added at one position per row."""
    hit = jnp.arange(x.shape[1])[None, :] == positions[:, None]
    return x + jnp.where(hit[..., None], offsets[:, None, :].astype(x.dtype), 0)


def final_logits(model: Decoder, x: jax.Array) -> jax.Array:
    """Logits of the residual stream after the last layer (final norm, then the output head)."""
    return model.logits(model.final_norm(x))
