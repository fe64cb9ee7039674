"""Analytic FLOPs of a train step and the peak FLOP/s of the hardware, for TFLOP/s and MFU."""

from __future__ import annotations

import jax

from eu_jax.models.config import ModelConfig

# Dense bf16 peak per device (vendor figures). CPUs have none here: their matmul rate depends on the model, the
# cores and their vector units (this project's 2-core hosts measured 120 to 300 GFLOP/s), so a fixed figure would
# print a made-up MFU; set train.peak_flops_per_device to a rate measured on the host instead.
PEAK_FLOPS_BY_KIND = {
    "TPU v5p": 459e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v6 lite": 918e12,
    "TPU v4": 275e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


def forward_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Matmul FLOPs of one token's forward pass: 2 per weight (the embedding lookup is free, the
    output head is not) plus attention scores and values over the whole sequence."""
    c = config
    attn_weights = c.hidden_size * c.head_dim * (2 * c.num_heads + 2 * c.num_kv_heads)
    mlp_weights = 3 * c.hidden_size * c.intermediate_size
    matmul = 2 * (c.num_layers * (attn_weights + mlp_weights) + c.hidden_size * c.vocab_size)
    attention = 2 * 2 * c.num_layers * seq_len * c.num_heads * c.head_dim
    return float(matmul + attention)


def step_flops(config: ModelConfig, seq_len: int, trained_tokens: int, reference_tokens: int) -> float:
    """Forward + backward (3x forward) on trained tokens, forward only for the reference model."""
    per_token = forward_flops_per_token(config, seq_len)
    return per_token * (3 * trained_tokens + reference_tokens)


def peak_flops_per_device(override: float = 0.0) -> float:
    """The configured peak, else the table's entry for this device kind (0: unknown, as on CPUs: no MFU)."""
    if override > 0:
        return override
    return peak_flops_of_kind(jax.devices()[0].device_kind)


def peak_flops_of_kind(device_kind: str) -> float:
    """The table's dense bf16 peak for a device kind as jax or torch name it ("NVIDIA H100 80GB HBM3"); 0 if unknown."""
    return next((flops for prefix, flops in PEAK_FLOPS_BY_KIND.items() if device_kind.startswith(prefix)), 0.0)
