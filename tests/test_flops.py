"""Analytic FLOPs (for TFLOP/s and MFU) against XLA's own count of the compiled forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from eu_jax.models.config import ModelConfig, RuntimeOptions
from eu_jax.models.llama import Decoder
from eu_jax.train.flops import forward_flops_per_token, peak_flops_of_kind, peak_flops_per_device, step_flops


@pytest.mark.parametrize("seq_len", [64, 256])
def test_forward_flops_match_xla_cost_analysis(seq_len):
    config = ModelConfig(
        model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384,
        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
    )
    # Unrolled layers: XLA's cost analysis counts a while-loop (lax.scan) body only once.
    graphdef, state = nnx.split(Decoder(config, RuntimeOptions(scan_layers=False), rngs=nnx.Rngs(0)))
    ids = jnp.zeros((2, seq_len), jnp.int32)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x).logits)
    cost = forward.lower(state, ids).compile().cost_analysis()
    xla_flops = (cost[0] if isinstance(cost, list) else cost)["flops"]
    ours = forward_flops_per_token(config, seq_len) * ids.size
    # XLA also counts elementwise work (softmax, norms, SiLU), which the analytic count leaves out.
    assert ours <= xla_flops <= 1.15 * ours


def test_step_flops_count_backward_twice_and_reference_once():
    config = ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    per_token = forward_flops_per_token(config, 16)
    assert step_flops(config, 16, trained_tokens=10, reference_tokens=0) == 30 * per_token
    assert step_flops(config, 16, trained_tokens=10, reference_tokens=10) == 40 * per_token


def test_peak_flops_come_from_the_device_kind_or_the_override():
    assert peak_flops_of_kind("NVIDIA H100 80GB HBM3") == 989e12  # torch's name of the card
    assert peak_flops_of_kind("TPU v5 lite") == 197e12
    assert peak_flops_of_kind("cpu") == 0.0  # no fixed CPU peak: no made-up MFU
    assert peak_flops_per_device() == 0.0  # the tests run on CPU devices
    assert peak_flops_per_device(override=2.5e11) == 2.5e11


@pytest.mark.parametrize(
    "retain, forget, halves",
    [("nll", "npo", ("forget",)), ("kl_ref", "npo", ("retain", "forget")), ("nll", "uniform_kl", ()), ("nll", "idk_dpo", ("forget",))],
)
def test_throughput_counts_the_reference_forward_on_the_halves_it_runs_on(retain, forget, halves):
    from eu_jax.objectives import Objective
    from eu_jax.train.loop import _Throughput, reference_halves

    config = ModelConfig(model_type="llama", vocab_size=10, hidden_size=8, intermediate_size=16,
                         num_layers=1, num_heads=2, num_kv_heads=1, head_dim=4)
    assert reference_halves(Objective(retain=retain, forget=forget)) == halves
    throughput = _Throughput(config, 16, halves, 0.0)
    throughput.add({"retain": 10, "forget": 20})
    per_token = forward_flops_per_token(config, 16)
    assert throughput.tokens == 30
    assert throughput.flops == per_token * (3 * 30 + 10 * ("retain" in halves) + 20 * ("forget" in halves))
