"""The fused attention kernel (`runtime.attention="splash"`, run by Pallas' interpreter on CPU) against
transformers' PyTorch models: logits, the loss and every gradient, on padded and packed rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec

from eu_jax.generate import greedy_generate
from eu_jax.models import fused_attention
from eu_jax.models.config import RuntimeOptions
from eu_jax.models.state import build_decoder, params_shardings
from eu_jax.parallel.mesh import make_mesh
from eu_jax.parallel.sharding import BATCH_AXES, DEFAULT_RULES, activation_sharding
from tests.test_model_parity import (
    TokenBatch, assert_every_gradient_matches, eu_next_token_loss, imported_family, torch_next_token_loss,
)

SPLASH = RuntimeOptions(attention="splash")
LENGTH = 128  # the kernel's smallest tile: shorter forwards run the decoder's own attention

# A full row, a left-padded and a right-padded one.
INPUT_IDS = np.random.default_rng(1).integers(3, 256, size=(3, LENGTH))
ATTENTION_MASK = np.ones((3, LENGTH), np.int64)
ATTENTION_MASK[1, :40] = 0
ATTENTION_MASK[2, 77:] = 0
BATCH = TokenBatch(INPUT_IDS, ATTENTION_MASK)


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen3", "smollm_tied_mqa"])
def family(request, tmp_path_factory):
    """Grouped KV heads, a sliding window (5 slots), q/k norms with an odd head size, one KV head."""
    return imported_family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return imported_family("llama", tmp_path_factory)


def test_splash_attention_matches_transformers(family):
    """Logits at real tokens, the summed next-token NLL and every parameter's gradient, against transformers'
    eager attention."""
    logits, torch_loss, torch_grads = torch_next_token_loss(family.hf, BATCH)
    (value, ours), grads = eu_next_token_loss(family, SPLASH, BATCH)
    valid = ATTENTION_MASK.astype(bool)
    assert np.abs(logits - np.asarray(ours))[valid].max() < 1e-4
    np.testing.assert_allclose(float(value), torch_loss, rtol=1e-5)
    assert_every_gradient_matches(family, grads, torch_grads)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_splash_gradients_match_transformers_under_other_remat_policies(llama, remat):
    _, torch_loss, torch_grads = torch_next_token_loss(llama.hf, BATCH)
    (value, _), grads = eu_next_token_loss(llama, RuntimeOptions(attention="splash", remat=remat), BATCH)
    np.testing.assert_allclose(float(value), torch_loss, rtol=1e-5)
    assert_every_gradient_matches(llama, grads, torch_grads)


@pytest.mark.parametrize("remat, kept", [("dots", True), ("full", False)])
def test_remat_dots_keeps_the_kernels_output_and_log_sum_exp(llama, capsys, remat, kept):
    """So the backward pass runs only the kernel's gradient kernels, not its forward again: the output
    [layers, B, N, T, H] and log-sum-exp [layers, B, N, T] are among the residuals the layer scan keeps."""
    options = RuntimeOptions(attention="splash", remat=remat)
    ids = jnp.asarray(INPUT_IDS)
    jax.ad_checkpoint.print_saved_residuals(lambda p: build_decoder(llama.config, p, options)(ids).logits.sum(), llama.params)
    saved = capsys.readouterr().out
    layers, (rows, length), heads, head_dim = llama.config.num_layers, ids.shape, llama.config.num_heads, llama.config.head_dim
    for shape in (f"f32[{layers},{rows},{heads},{length},{head_dim}]", f"f32[{layers},{rows},{heads},{length}]"):
        assert (f"{shape} output of scan" in saved) == kept, saved


def test_greedy_decoding_after_a_splash_prefill_matches_transformers_generate(family):
    """Prompts of 128 and 70 tokens (a bucket of 128, left-padded): the prompts' keys and values come from the
    kernel's forward (`Decoder.prefill`), the new tokens from cached one-query steps."""
    prompts = [INPUT_IDS[0].tolist(), INPUT_IDS[1, 58:].tolist()]
    ours = greedy_generate(build_decoder(family.config, family.params, SPLASH), prompts, max_new_tokens=10, pad_id=0)
    ids, mask = np.zeros((2, LENGTH), np.int64), np.zeros((2, LENGTH), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, LENGTH - len(prompt):], mask[row, LENGTH - len(prompt):] = prompt, 1
    with torch.no_grad():
        generated = family.hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=10,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == generated[:, LENGTH:].tolist()


def test_packed_examples_attend_only_within_themselves(family):
    """Two examples and padding packed into one 128-token row give each example's logits alone (transformers)."""
    first, second = INPUT_IDS[0, :50], INPUT_IDS[1, 40:100]
    row = np.concatenate([first, second, np.zeros(LENGTH - 110, np.int64)])[None]
    segments = np.array([[1] * 50 + [2] * 60 + [0] * (LENGTH - 110)])
    decoder = build_decoder(family.config, family.params, SPLASH)
    got = jax.jit(lambda ids, seg: decoder(ids, (seg > 0).astype(jnp.int32), segment_ids=seg).logits)(
        jnp.asarray(row), jnp.asarray(segments))
    with torch.no_grad():
        alone = [family.hf(input_ids=torch.as_tensor(x[None])).logits[0].numpy() for x in (first, second)]
    np.testing.assert_allclose(np.asarray(got)[0, :110], np.concatenate(alone), atol=1e-4)


def test_sharded_kernel_runs_on_each_devices_rows_and_heads(family):
    """On a data x fsdp x tensor mesh of 8 CPU devices the kernel runs per device (rows over data and fsdp,
    heads over tensor when it divides the KV heads: 2 do; one KV head is kept whole on every device), for
    each family, with the unsharded run's loss and
    gradients."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = DEFAULT_RULES if family.config.num_kv_heads % 2 == 0 else {**DEFAULT_RULES, "kv_heads": None}
    params = jax.device_put(family.params, params_shardings(family.config, mesh, SPLASH, rules))
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    ids, mask = (jax.device_put(jnp.asarray(np.concatenate([a, a[:1]])), rows) for a in (INPUT_IDS, ATTENTION_MASK))
    targets, weights = (np.concatenate([a, a[:1]]) for a in (BATCH.targets, BATCH.target_weights))

    def loss(params, ids, mask):
        logits = build_decoder(family.config, params, SPLASH)(ids, mask).logits
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return -(log_p * weights).sum()

    step = jax.jit(jax.value_and_grad(loss))
    with activation_sharding(mesh):
        value, grads = step(params, ids, mask)
        program = str(step.trace(params, ids, mask).jaxpr)
    heads = "'tensor'" if rules is DEFAULT_RULES else "None"
    assert f"P(('data', 'fsdp'), {heads}), P(('data', 'fsdp'), {heads}), P(('data', 'fsdp'), {heads}))" in program
    expected_value, expected_grads = step(family.params, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        scale = max(np.abs(want).max(), 1e-3)  # the sum over devices adds in another order
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5)


@pytest.mark.parametrize("length, block", [(128, 128), (384, 128), (768, 256), (2048, 512), (12, None), (200, None)])
def test_kernel_takes_lengths_its_tiles_divide(length, block):
    assert fused_attention.splash_block(length) == block
    assert fused_attention.uses_kernel("splash", length) == (block is not None)
    assert not fused_attention.uses_kernel("xla", length)


def test_short_forward_falls_back_to_the_decoders_attention(family):
    """12 tokens are no multiple of the kernel's tiles: the decoder's own attention runs, same logits."""
    ids, mask = jnp.asarray(INPUT_IDS[:, :12]), jnp.asarray(ATTENTION_MASK[:, -12:])
    ours = build_decoder(family.config, family.params, SPLASH)(ids, mask).logits
    reference = build_decoder(family.config, family.params)(ids, mask).logits
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


def test_splash_refuses_gpus_in_one_sentence(llama, monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    decoder = build_decoder(llama.config, llama.params, SPLASH)
    with pytest.raises(ValueError, match=r"^runtime\.attention: 'splash' is a TPU kernel and this process runs on GPUs; use 'xla'"):
        decoder(jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK))
