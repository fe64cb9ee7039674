"""The declarative, reversible map between Hugging Face tensor names/layouts and eu_jax params.

Each rule names one parameter on both sides and a layout transform that runs in either
direction. Transforms are only transposes and reshapes, so a round trip is bit-exact.
The Llama, Mistral, Qwen2 and Qwen3 checkpoints share one naming scheme; rules that exist
only for some configs (biases, q/k norms, an untied head) say so with `applies`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from eu_jax.models.config import ModelConfig


@dataclass(frozen=True)
class Layout:
    """How our tensor's axes relate to the Hugging Face tensor's, in both directions.

    copy:   same shape (embeddings, norm scales).
    flat:   HF keeps a flat vector, we split heads out (q/k/v biases: [n*h] <-> [n, h]).
    linear: HF linear weights are [out, in]; ours are [in..., out...] with head axes split out.
    """

    kind: str

    def to_ours_into(self, hf: np.ndarray, dest: np.ndarray) -> None:
        """Write `hf` (HF layout) into the contiguous array `dest` (our layout), casting to its dtype."""
        if self.kind == "linear":
            _transpose_into(dest.reshape(hf.shape[::-1]), hf)
        else:
            np.copyto(dest, hf.reshape(dest.shape), casting="unsafe")

    def to_hf(self, ours: np.ndarray, hf_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """`ours` in HF layout, as a new contiguous array of `dtype`."""
        out = np.empty(hf_shape, dtype)
        if self.kind == "linear":
            _transpose_into(out, ours.reshape(hf_shape[::-1]))
        else:
            np.copyto(out, ours.reshape(hf_shape), casting="unsafe")
        return out

    def hf_shape(self, our_shape: tuple[int, ...], in_axes: int) -> tuple[int, ...]:
        """HF shape of a tensor whose first `in_axes` axes (ours) are its input features."""
        if self.kind == "copy":
            return our_shape
        if self.kind == "flat":
            return (math.prod(our_shape),)
        return (math.prod(our_shape[in_axes:]), math.prod(our_shape[:in_axes]))


# Word sizes `_transpose_by_words` moves, widest first (the first that divides a row is taken), as the dtypes
# numpy copies them with (same-dtype copies move raw bytes by item size, so any bit pattern survives;
# complex128 is numpy's only 16-byte item it copies natively).
_WORD_DTYPES = {16: np.complex128, 8: np.uint64}


def _transpose_into(dest: np.ndarray, src: np.ndarray) -> None:
    """dest[...] = src.T for 2-D arrays, casting where the dtypes differ.

    numpy moves a transposed element at a time (~50 ms for a [8192, 2048] bf16 weight, 17x a plain copy),
    so same-dtype transposes whose rows split into 16 or 8-byte words go through `_transpose_by_words`
    (~14 and ~23 ms, profiled); the rest go a band of rows at a time."""
    row_bytes = src.shape[1] * src.itemsize
    word = next((size for size in _WORD_DTYPES if row_bytes % size == 0), None)
    if (word is not None and src.dtype == dest.dtype and src.itemsize < word and src.strides[1] == src.itemsize
            and dest.flags.c_contiguous):
        _transpose_by_words(dest, src, word)
    else:
        _transpose_bands(dest, src)


def _transpose_bands(dest: np.ndarray, src: np.ndarray, block_rows: int = 128) -> None:
    """dest[...] = src.T a band of src's rows at a time: a whole-matrix transposed copy strides through
    memory and misses the cache on every element, bands keep both sides in cache (~5x faster)."""
    for start in range(0, src.shape[0], block_rows):
        dest[:, start : start + block_rows] = src[start : start + block_rows].T


def _transpose_by_words(dest: np.ndarray, src: np.ndarray, word: int, word_columns: int = 128) -> None:
    """dest[...] = src.T in two passes, `word_columns` words of src's columns at a time (one bounded scratch).

    Viewed as `word`-byte items, src's rows hold words of `group` elements; transposing the words puts each
    word's elements in the right column of `group` consecutive dest rows, and a short-strided copy spreads
    them. Wider words mean fewer long-strided moves: 16 bytes ~1.6x faster than 8 on bf16 (profiled)."""
    rows, group = src.shape[0], word // src.itemsize
    words = src.view(_WORD_DTYPES[word])
    spread = dest.reshape(words.shape[1], group, rows)
    scratch = np.empty((min(word_columns, words.shape[1]), rows), words.dtype)
    for start in range(0, words.shape[1], word_columns):
        chunk = words[:, start : start + word_columns]
        part = scratch[: chunk.shape[1]]
        _transpose_bands(part, chunk)
        elements = part.view(src.dtype).reshape(chunk.shape[1], rows, group)
        spread[start : start + chunk.shape[1]] = elements.transpose(0, 2, 1)


COPY = Layout("copy")
FLAT = Layout("flat")
LINEAR = Layout("linear")


def _always(config: ModelConfig) -> bool:
    return True


@dataclass(frozen=True)
class KeyRule:
    """One parameter: our path, the HF name ({layer} for per-layer tensors) and its layout."""

    path: tuple[str, ...]
    hf_name: str
    layout: Layout = COPY
    in_axes: int = 1  # how many leading axes of our (per-layer) tensor are input features
    applies: Callable[[ModelConfig], bool] = field(default=_always, compare=False)

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.hf_name

    def hf_key(self, layer: int | None = None) -> str:
        return self.hf_name.format(layer=layer) if self.per_layer else self.hf_name

    def hf_shape(self, our_shape: tuple[int, ...]) -> tuple[int, ...]:
        """The HF tensor shape for one (per-layer) slice of our parameter."""
        return self.layout.hf_shape(our_shape, self.in_axes)


def _layer(*path: str) -> tuple[str, ...]:
    return ("layers", *path)


LLAMA_FAMILY_RULES: tuple[KeyRule, ...] = (
    KeyRule(("embed",), "model.embed_tokens.weight"),
    KeyRule(_layer("input_norm", "scale"), "model.layers.{layer}.input_layernorm.weight"),
    KeyRule(_layer("attn", "q_proj"), "model.layers.{layer}.self_attn.q_proj.weight", LINEAR),
    KeyRule(_layer("attn", "k_proj"), "model.layers.{layer}.self_attn.k_proj.weight", LINEAR),
    KeyRule(_layer("attn", "v_proj"), "model.layers.{layer}.self_attn.v_proj.weight", LINEAR),
    KeyRule(_layer("attn", "o_proj"), "model.layers.{layer}.self_attn.o_proj.weight", LINEAR, in_axes=2),
    KeyRule(_layer("attn", "q_bias"), "model.layers.{layer}.self_attn.q_proj.bias", FLAT, applies=lambda c: c.qkv_bias),
    KeyRule(_layer("attn", "k_bias"), "model.layers.{layer}.self_attn.k_proj.bias", FLAT, applies=lambda c: c.qkv_bias),
    KeyRule(_layer("attn", "v_bias"), "model.layers.{layer}.self_attn.v_proj.bias", FLAT, applies=lambda c: c.qkv_bias),
    KeyRule(_layer("attn", "o_bias"), "model.layers.{layer}.self_attn.o_proj.bias", applies=lambda c: c.o_bias),
    KeyRule(_layer("attn", "q_norm", "scale"), "model.layers.{layer}.self_attn.q_norm.weight", applies=lambda c: c.qk_norm),
    KeyRule(_layer("attn", "k_norm", "scale"), "model.layers.{layer}.self_attn.k_norm.weight", applies=lambda c: c.qk_norm),
    KeyRule(_layer("post_attn_norm", "scale"), "model.layers.{layer}.post_attention_layernorm.weight"),
    KeyRule(_layer("mlp", "gate_proj"), "model.layers.{layer}.mlp.gate_proj.weight", LINEAR),
    KeyRule(_layer("mlp", "up_proj"), "model.layers.{layer}.mlp.up_proj.weight", LINEAR),
    KeyRule(_layer("mlp", "down_proj"), "model.layers.{layer}.mlp.down_proj.weight", LINEAR),
    KeyRule(_layer("mlp", "gate_bias"), "model.layers.{layer}.mlp.gate_proj.bias", applies=lambda c: c.mlp_bias),
    KeyRule(_layer("mlp", "up_bias"), "model.layers.{layer}.mlp.up_proj.bias", applies=lambda c: c.mlp_bias),
    KeyRule(_layer("mlp", "down_bias"), "model.layers.{layer}.mlp.down_proj.bias", applies=lambda c: c.mlp_bias),
    KeyRule(("final_norm", "scale"), "model.norm.weight"),
    KeyRule(("lm_head",), "lm_head.weight", LINEAR, applies=lambda c: not c.tie_word_embeddings),
)

# Tensors some checkpoints carry that hold no information for the model.
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)


def rules_for(config: ModelConfig) -> list[KeyRule]:
    return [rule for rule in LLAMA_FAMILY_RULES if rule.applies(config)]


def expected_hf_names(config: ModelConfig) -> list[str]:
    """Every HF tensor name the config needs, in the order transformers writes them."""
    names = []
    for rule in rules_for(config):
        layers = range(config.num_layers) if rule.per_layer else [None]
        names.extend(rule.hf_key(i) for i in layers)
    return names


def is_ignorable(name: str, config: ModelConfig) -> bool:
    """A tensor the import may skip: buffers, and a duplicate head in tied checkpoints."""
    if any(name.endswith(suffix) for suffix in IGNORED_HF_TENSORS):
        return True
    return config.tie_word_embeddings and name == "lm_head.weight"
