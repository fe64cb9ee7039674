"""Add a new special token (UniErase's `<unlearn_0>`) to a checkpoint: tokenizer, embedding and output head.

The token gets the id the tokenizer assigns it (the next free one). When the model already has a spare
row there (vocabularies padded beyond the tokenizer, as Qwen's), that row is reused and the vocabulary
keeps its size; otherwise the embedding [vocab, embed] and an untied `lm_head` [embed, vocab] grow by
one row, or by up to `pad_to_multiple` rows so that a `tensor` mesh axis still divides the vocabulary
(the sharding table puts `vocab` on `tensor` and refuses sizes it does not divide). Padding rows are
zeros: no token maps to them.

The token's row starts from the mean direction of the tokenizer's existing tokens' rows, at their mean norm, or from a copy of
one named token's row (its output column likewise when the head is untied), never from noise: a row far
from the others would give the token an arbitrary logit before training has touched it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from eu_jax.convert.checkpoint import (
    HF_FILES_DIR,
    ModelMeta,
    ensure_new_output,
    load_model_meta,
    load_params,
    locate_params,
    save_params_checkpoint,
)
from eu_jax.generate_cli import load_tokenizer
from eu_jax.models.config import ModelConfig
from eu_jax.models.state import Params, params_shardings
from eu_jax.parallel.mesh import make_mesh
from eu_jax.parallel.sharding import DEFAULT_RULES, MeshAxes

MEAN_INIT = "mean"
DEFAULT_TOKEN = "<unlearn_0>"
# Where the vocabulary axis lies in each parameter that has one.
VOCAB_AXES = {"embed": 0, "lm_head": 1}


class VocabError(ValueError):
    """A token or vocabulary change that cannot be made, told in one sentence."""


def init_source_id(tokenizer: Any, init: str) -> int | None:
    """The token whose row the new one copies (None for the mean): a vocabulary entry as spelled there
    (e.g. 'ĠI' in a BPE vocabulary), or text that the tokenizer encodes as exactly one token."""
    if init == MEAN_INIT:
        return None
    vocab = tokenizer.get_vocab()
    if init in vocab:
        return vocab[init]
    ids = tokenizer(init, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise VocabError(f"init={init!r} is neither 'mean' nor a single token of the tokenizer (it encodes to {len(ids)} tokens)")
    return ids[0]


def vocab_shards(mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> int:
    """How many devices the vocabulary axis is split over on `mesh`."""
    axes = rules["vocab"]
    names = () if axes is None else (axes,) if isinstance(axes, str) else axes
    count = 1
    for name in names:
        count *= mesh.shape[name]
    return count


def grown_vocab_size(config: ModelConfig, token_id: int, pad_to_multiple: int) -> int:
    """Rows the vocabulary needs for `token_id`: unchanged when the row exists, else one more, rounded up."""
    if pad_to_multiple < 1:
        raise VocabError(f"pad_to_multiple={pad_to_multiple} must be at least 1")
    if token_id > config.vocab_size:
        raise VocabError(
            f"the tokenizer gave the new token id {token_id}, beyond the model's {config.vocab_size} embedding rows: "
            "the tokenizer and the checkpoint do not match"
        )
    if token_id < config.vocab_size:
        return config.vocab_size
    return -(-(token_id + 1) // pad_to_multiple) * pad_to_multiple


def with_token_row(matrix: jax.Array, vocab_axis: int, new_size: int, token_id: int, source_id: int | None) -> jax.Array:
    """`matrix` with its vocabulary axis grown to `new_size` (zero rows) and row `token_id` set to the mean
    direction of rows [0, token_id) at their mean norm, or to a copy of row `source_id` (fp32 arithmetic).

    The plain mean would be a short vector (random rows average out), and a short output row caps the
    token's logit whatever the final-norm hidden state is: no edit could then make the model say it.
    """
    rows = jnp.moveaxis(matrix, vocab_axis, 0)
    rows = jnp.pad(rows, [(0, new_size - rows.shape[0]), (0, 0)])
    if source_id is None:
        old = rows[:token_id].astype(jnp.float32)
        mean = jnp.mean(old, axis=0)
        init = mean * jnp.mean(jnp.linalg.norm(old, axis=1)) / jnp.maximum(jnp.linalg.norm(mean), 1e-12)
    else:
        init = rows[source_id]
    rows = rows.at[token_id].set(init.astype(rows.dtype))
    return jnp.moveaxis(rows, 0, vocab_axis)


def params_with_token(params: Params, new_shardings: Params, new_size: int, token_id: int, source_id: int | None) -> Params:
    """The params with the token's row (and padding) in every parameter that has a vocabulary axis,
    each built straight into its new sharding; the other parameters are shared, not copied."""
    out = dict(params)
    for name, axis in VOCAB_AXES.items():
        if name in params:
            grow = jax.jit(
                lambda m, axis=axis: with_token_row(m, axis, new_size, token_id, source_id),
                out_shardings=new_shardings[name],
            )
            out[name] = grow(params[name])
    return out


def add_unlearning_token(
    src_ckpt: str | Path,
    out_ckpt: str | Path,
    token: str = DEFAULT_TOKEN,
    init: str = MEAN_INIT,
    pad_to_multiple: int = 1,
    mesh: Mesh | None = None,
) -> int:
    """Write `out_ckpt`: `src_ckpt` with `token` added as a special token; returns the token's id.

    `init`: "mean" or an existing token whose row (and untied output column) the new one copies.
    `pad_to_multiple`: when the vocabulary grows, round it up to a multiple of this (the size of the
    mesh's `tensor` axis, so the grown model can be sharded there). `mesh`: where the params are placed
    while the rows are added (default: all devices on `fsdp`).
    """
    src_ckpt, out_ckpt = Path(src_ckpt), Path(out_ckpt)
    ensure_new_output(out_ckpt)  # before any work, so a taken path fails at once
    tokenizer = load_tokenizer(src_ckpt)
    existing = tokenizer.get_vocab().get(token)
    if existing is not None:
        raise VocabError(f"token {token!r} is already in the tokenizer of {src_ckpt} (id {existing}); choose another name")
    source_id = init_source_id(tokenizer, init)
    old_size = len(tokenizer)
    added = tokenizer.add_tokens([_special_token(token)], special_tokens=True)
    token_id = tokenizer.convert_tokens_to_ids(token)
    if added != 1 or token_id < old_size:  # e.g. "": nothing added, and its id is <unk>'s, whose rows would be overwritten
        raise VocabError(f"the tokenizer of {src_ckpt} does not add {token!r} as a new token of its own; choose another name")

    mesh = make_mesh({"fsdp": -1}) if mesh is None else mesh
    old_config = load_model_meta(src_ckpt).config
    new_size = grown_vocab_size(old_config, token_id, pad_to_multiple)
    if new_size % vocab_shards(mesh):
        raise VocabError(
            f"a vocabulary of {new_size} rows cannot be split over the mesh's {vocab_shards(mesh)} tensor-parallel devices; "
            f"pass pad_to_multiple={vocab_shards(mesh)}"
        )
    params, meta = load_params(src_ckpt, params_shardings(old_config, mesh))
    config = dataclasses.replace(meta.config, vocab_size=new_size)
    params = params_with_token(params, params_shardings(config, mesh), new_size, token_id, source_id)
    new_meta = ModelMeta(config, dict(meta.hf_config, vocab_size=new_size), meta.param_dtype)
    out = save_params_checkpoint(out_ckpt, params, new_meta, locate_params(src_ckpt)[2] / HF_FILES_DIR)
    if jax.process_index() == 0:
        tokenizer.save_pretrained(out / HF_FILES_DIR)
    return token_id


def _special_token(token: str) -> Any:
    """A special token matched verbatim: never split, never normalised, dropped by skip_special_tokens."""
    from tokenizers import AddedToken

    return AddedToken(token, special=True, normalized=False)

