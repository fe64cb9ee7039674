"""Model configuration for the Llama-family decoder, and the adapter from Hugging Face configs.

The adapter reads every config field that changes the math. A field we cannot honour (an
unknown architecture, a RoPE variant, sliding windows that differ per layer, ...) stops the
run with an error naming it: silently ignoring it would produce a different model.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import jax.numpy as jnp

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
REMAT_POLICIES = ("none", "dots", "full")  # from most kept for the backward pass to least
ATTENTION_KERNELS = ("xla", "splash", "cudnn")  # see RuntimeOptions.attention


class UnsupportedModelError(ValueError):
    """The Hugging Face config describes a model or feature this decoder does not implement."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (the `rope_parameters` of transformers 5)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder: everything needed to reproduce its math."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        fields = dict(data)
        fields["rope"] = RopeConfig(**fields.get("rope", {}))
        return cls(**fields)

    @property
    def num_params(self) -> int:
        """Parameter count (as transformers counts it: tied embeddings once)."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        attn += self.qkv_bias * h * (self.num_heads + 2 * self.num_kv_heads) + self.o_bias * d
        attn += self.qk_norm * 2 * h
        mlp = 3 * d * f + self.mlp_bias * (2 * f + d)
        per_layer = attn + mlp + 2 * d
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return self.vocab_size * d + self.num_layers * per_layer + d + head


@dataclass(frozen=True)
class RuntimeOptions:
    """How the decoder runs, independent of the checkpoint: dtypes, remat, layer iteration, attention blocks.

    Parameters are always stored stacked along a leading `layers` axis, so checkpoints are the
    same whether layers run under `lax.scan` (fast compiles) or an unrolled Python loop.
    """

    param_dtype: str = "float32"
    dtype: str = "float32"
    # What a layer keeps for its backward pass: "dots" its matmul outputs (the rest is recomputed), "full" only
    # its input, "none" every intermediate. "dots" is also the fastest on CPU: writing and re-reading every
    # intermediate cost more than recomputing the elementwise ops (bench/train_scaling.py, batch sweep).
    remat: str = "dots"
    scan_layers: bool = True
    attention_block: int = 256  # queries per block of causal attention; 0 = every score in one product
    # Forwards without a KV cache: "xla" the decoder's own attention (any backend); fused flash attention:
    # "splash" Pallas' kernel (TPU; interpreted on CPU, for tests) for sequences a multiple of 128 tokens,
    # "cudnn" cuDNN's (NVIDIA GPUs, bf16 or fp16; JAX's XLA reference on CPU, for tests) at even lengths.
    attention: str = "xla"

    def __post_init__(self) -> None:
        """Each message starts with the field's name, which a config's validation prefixes with its section."""
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat: '{self.remat}' is not one of {', '.join(REMAT_POLICIES)}")
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention: '{self.attention}' is not one of {', '.join(ATTENTION_KERNELS)}")
        if self.attention_block < 0:
            raise ValueError(f"attention_block: must be 0 (off) or a number of query tokens, got {self.attention_block}")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{key}: '{getattr(self, key)}' is not one of float32, bfloat16, float16")

    @property
    def jnp_param_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)


def _as_dict(hf_config: Any) -> dict[str, Any]:
    if isinstance(hf_config, Mapping):
        return dict(hf_config)
    return hf_config.to_dict()


def _rope_from_hf(cfg: Mapping[str, Any]) -> RopeConfig:
    """Read rotary parameters from transformers 5's `rope_parameters` or the older keys."""
    params = cfg.get("rope_parameters")
    if params is None:
        params = dict(cfg.get("rope_scaling") or {})
        params.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
    params = dict(params)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"RoPE scaling type '{rope_type}' is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(cfg.get("partial_rotary_factor", params.get("partial_rotary_factor", 1.0))) != 1.0:
        raise UnsupportedModelError("partial_rotary_factor != 1 (partial rotary embeddings) is not supported")
    if float(params.get("attention_factor") or 1.0) != 1.0:
        raise UnsupportedModelError("RoPE attention_factor != 1 is not supported")
    rope = RopeConfig(theta=float(params.get("rope_theta", 10000.0)), type=rope_type)
    if rope_type == "linear":
        rope = dataclasses.replace(rope, factor=float(params["factor"]))
    elif rope_type == "llama3":
        rope = dataclasses.replace(
            rope,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    return rope


def _sliding_window_from_hf(cfg: Mapping[str, Any]) -> int | None:
    """A uniform window (Mistral v0.1) is supported; windows on only some layers are not."""
    model_type = cfg["model_type"]
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        kinds = set(layer_types)
        if kinds - {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(f"layer_types {sorted(kinds)} contains an unsupported attention type")
        if kinds == {"full_attention", "sliding_attention"}:
            raise UnsupportedModelError(
                "sliding-window attention on some layers only (layer_types mixes full_attention and "
                "sliding_attention) is not supported"
            )
        if kinds == {"full_attention"}:
            return None
    if model_type in ("qwen2", "qwen3"):
        if cfg.get("use_sliding_window"):
            raise UnsupportedModelError(f"{model_type} with use_sliding_window=True is not supported")
        return None
    if model_type != "mistral" or window is None:  # transformers' Llama ignores a sliding_window key
        return None
    return int(window)


def check_model_type(hf_config: Any) -> str:
    """The config's model_type, if this decoder implements it. The import checks a raw config.json with it
    before transformers reads it, which for an unknown type would want remote code or fail in its own words."""
    cfg = _as_dict(hf_config)
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = ", ".join(cfg.get("architectures") or []) or "unknown architecture"
        raise UnsupportedModelError(
            f"model_type '{model_type}' ({arch}) is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return model_type


def from_hf_config(hf_config: Any, where: str = "the Hugging Face config") -> ModelConfig:
    """Build a ModelConfig from a transformers config object or a plain `config.json` dict.

    `where` names the config (a file) in errors. A raw config.json may leave out fields transformers fills in
    (AutoConfig), so a missing required field is an UnsupportedModelError naming it, not a KeyError.
    """
    cfg = _as_dict(hf_config)
    model_type = check_model_type(cfg)
    try:
        return _model_config(cfg, model_type)
    except KeyError as err:
        raise UnsupportedModelError(f"{where} lacks {err.args[0]!r}, which a {model_type} model needs") from None


def _model_config(cfg: Mapping[str, Any], model_type: str) -> ModelConfig:
    """from_hf_config's work once the model type is known to be supported."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act '{act}' is not supported (only 'silu')")
    for key in ("attention_dropout", "hidden_dropout", "mlp_dropout"):
        if float(cfg.get(key) or 0.0) != 0.0:
            raise UnsupportedModelError(f"{key}={cfg[key]} is not supported (dropout must be 0)")
    if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise UnsupportedModelError("mixture-of-experts layers are not supported")

    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    attention_bias = bool(cfg.get("attention_bias", False))
    # Which projections carry biases differs per family although the flag has one name.
    qkv_bias, o_bias = {
        "llama": (attention_bias, attention_bias),
        "mistral": (False, False),
        "qwen2": (True, False),
        "qwen3": (attention_bias, attention_bias),
    }[model_type]
    return ModelConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        # transformers' default where a raw config.json leaves head_dim out: Qwen3's is 128, the others' derived.
        head_dim=int(cfg.get("head_dim") or (128 if model_type == "qwen3" else hidden // num_heads)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=_rope_from_hf(cfg),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if model_type == "llama" else False,
        qk_norm=model_type == "qwen3",
        sliding_window=_sliding_window_from_hf(cfg),
        initializer_range=float(cfg.get("initializer_range", 0.02)),
    )
