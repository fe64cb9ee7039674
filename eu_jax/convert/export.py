"""Export an eu_jax checkpoint to a Hugging Face directory that transformers loads as is.

Params are restored as host numpy arrays (no device copy), a few at a time in the order they are written
(`ParamReader` reads ahead), and streamed tensor by tensor into sharded safetensors, so peak memory stays
near a few stacked parameters, not the model.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from eu_jax.convert.checkpoint import (
    HF_FILES_DIR,
    ModelMeta,
    ParamReader,
    ensure_new_output,
    locate_params,
    read_model_meta,
)
from eu_jax.convert.keymap import rules_for
from eu_jax.convert.safetensors_io import TensorToWrite, write_safetensors_shards
from eu_jax.convert.threads import conversion_threads
from eu_jax.models.config import ModelConfig
from eu_jax.models.state import Params, abstract_params
from eu_jax.tree_paths import get_path

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": None, "float16": np.float16}
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _np_dtype(name: str) -> np.dtype:
    if name not in EXPORT_DTYPES:
        raise ValueError(f"export dtype '{name}' is not one of {', '.join(EXPORT_DTYPES)}")
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(EXPORT_DTYPES[name])


def hf_tensors(read: Callable[[tuple[str, ...]], np.ndarray], config: ModelConfig, shapes: Params, dtype: np.dtype) -> list[TensorToWrite]:
    """Every HF tensor, parameter by parameter (all layers of one before the next), converted only
    when the writer asks for it, so one stacked parameter at a time is in memory."""
    tensors = []
    for rule in rules_for(config):
        stacked_shape = get_path(shapes, rule.path).shape
        hf_shape = rule.hf_shape(stacked_shape[1:] if rule.per_layer else stacked_shape)

        def load(rule=rule, hf_shape=hf_shape, layer=None):
            value = read(rule.path)
            return rule.layout.to_hf(value if layer is None else value[layer], hf_shape, dtype)

        if rule.per_layer:
            tensors.extend(
                TensorToWrite(rule.hf_key(i), hf_shape, dtype, lambda load=load, i=i: load(layer=i))
                for i in range(config.num_layers)
            )
        else:
            tensors.append(TensorToWrite(rule.hf_key(), hf_shape, dtype, load))
    return tensors


def write_hf_config(meta: ModelMeta, vocab_size: int, dtype_name: str, out: Path):
    """config.json from the original HF config, with what the checkpoint may have changed."""
    import transformers

    fields = dict(meta.hf_config)
    fields.update(vocab_size=vocab_size, dtype=dtype_name, tie_word_embeddings=meta.config.tie_word_embeddings)
    fields.pop("transformers_version", None)
    config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
    config.save_pretrained(out)
    return config


def export_checkpoint(
    ckpt: Path,
    out: Path,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `out` as a Hugging Face model directory: safetensors, config, tokenizer, generation config."""
    out = Path(out)
    np_dtype = _np_dtype(dtype)
    ensure_new_output(out)
    _, _, meta_dir = locate_params(ckpt)
    meta = read_model_meta(meta_dir)
    shapes = abstract_params(meta.config)
    out.mkdir(parents=True, exist_ok=True)
    with ParamReader(ckpt, order=[rule.path for rule in rules_for(meta.config)]) as reader:
        write_safetensors_shards(hf_tensors(reader, meta.config, shapes, np_dtype), out, max_shard_bytes,
                                 progress=progress, load_threads=conversion_threads())
    hf_config = write_hf_config(meta, meta.config.vocab_size, dtype, out)
    side = meta_dir / HF_FILES_DIR
    if side.is_dir():
        shutil.copytree(side, out, dirs_exist_ok=True)
    if not (out / "generation_config.json").exists():
        import transformers

        transformers.GenerationConfig.from_model_config(hf_config).save_pretrained(out)
    return out
