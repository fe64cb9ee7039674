"""The fused attention kernels against transformers' PyTorch models: logits, the loss and every gradient, on
padded and packed rows. On CPU `"splash"` runs in Pallas' interpreter and `"cudnn"` as JAX's XLA reference of
the same `jax.nn.dot_product_attention` call, so these check what each is given (causal order, window,
segments), not cuDNN's own kernels."""

from __future__ import annotations

import re

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
LENGTH = 128  # splash's smallest tile: shorter forwards run the decoder's own attention

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


@pytest.fixture(params=["splash", "cudnn"])
def kernel(request):
    return RuntimeOptions(attention=request.param)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return imported_family("llama", tmp_path_factory)


def test_fused_attention_matches_transformers(family, kernel):
    """Logits at real tokens, the summed next-token NLL and every parameter's gradient, against transformers'
    eager attention."""
    logits, torch_loss, torch_grads = torch_next_token_loss(family.hf, BATCH)
    (value, ours), grads = eu_next_token_loss(family, kernel, BATCH)
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


def test_greedy_decoding_after_a_fused_prefill_matches_transformers_generate(family, kernel):
    """Prompts of 128 and 70 tokens (a bucket of 128, left-padded): the prompts' keys and values come from the
    kernel's forward (`Decoder.prefill`), the new tokens from cached one-query steps."""
    prompts = [INPUT_IDS[0].tolist(), INPUT_IDS[1, 58:].tolist()]
    ours = greedy_generate(build_decoder(family.config, family.params, kernel), prompts, max_new_tokens=10, pad_id=0)
    ids, mask = np.zeros((2, LENGTH), np.int64), np.zeros((2, LENGTH), np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, LENGTH - len(prompt):], mask[row, LENGTH - len(prompt):] = prompt, 1
    with torch.no_grad():
        generated = family.hf.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), max_new_tokens=10,
                                       do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == generated[:, LENGTH:].tolist()


def test_packed_examples_attend_only_within_themselves(family, kernel):
    """Two examples and padding packed into one 128-token row give each example's logits alone (transformers)."""
    first, second = INPUT_IDS[0, :50], INPUT_IDS[1, 40:100]
    row = np.concatenate([first, second, np.zeros(LENGTH - 110, np.int64)])[None]
    segments = np.array([[1] * 50 + [2] * 60 + [0] * (LENGTH - 110)])
    decoder = build_decoder(family.config, family.params, kernel)
    got = jax.jit(lambda ids, seg: decoder(ids, (seg > 0).astype(jnp.int32), segment_ids=seg).logits)(
        jnp.asarray(row), jnp.asarray(segments))
    with torch.no_grad():
        alone = [family.hf(input_ids=torch.as_tensor(x[None])).logits[0].numpy() for x in (first, second)]
    np.testing.assert_allclose(np.asarray(got)[0, :110], np.concatenate(alone), atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "smollm_tied_mqa"])
def test_sharded_kernel_gives_the_unsharded_loss_and_gradients(name, kernel, tmp_path_factory):
    """On a data x fsdp x tensor mesh of 8 CPU devices, with the unsharded run's loss and gradients. Splash runs
    per device under `shard_map` (rows over data and fsdp, heads over tensor when it divides the KV heads:
    2 do; one KV head is kept whole on every device); XLA partitions cuDNN's call itself."""
    family = imported_family(name, tmp_path_factory)
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    rules = DEFAULT_RULES if family.config.num_kv_heads % 2 == 0 else {**DEFAULT_RULES, "kv_heads": None}
    params = jax.device_put(family.params, params_shardings(family.config, mesh, kernel, rules))
    rows = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    ids, mask = (jax.device_put(jnp.asarray(np.concatenate([a, a[:1]])), rows) for a in (INPUT_IDS, ATTENTION_MASK))
    targets, weights = (np.concatenate([a, a[:1]]) for a in (BATCH.targets, BATCH.target_weights))

    def loss(params, ids, mask):
        logits = build_decoder(family.config, params, kernel)(ids, mask).logits
        log_p = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), jnp.asarray(targets)[..., None], axis=-1)[..., 0]
        return -(log_p * weights).sum()

    step = jax.jit(jax.value_and_grad(loss))
    with activation_sharding(mesh):
        value, grads = step(params, ids, mask)
        program = str(step.trace(params, ids, mask).jaxpr)
    heads = "'tensor'" if rules is DEFAULT_RULES else "None"
    spec = f"P(('data', 'fsdp'), {heads}), P(('data', 'fsdp'), {heads}), P(('data', 'fsdp'), {heads}))"
    assert (spec in program) == (kernel.attention == "splash")
    expected_value, expected_grads = step(family.params, jnp.asarray(ids), jnp.asarray(mask))
    np.testing.assert_allclose(float(value), float(expected_value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True):
        scale = max(np.abs(want).max(), 1e-3)  # the sum over devices adds in another order
        np.testing.assert_allclose(np.asarray(got) / scale, np.asarray(want) / scale, atol=1e-5)


@pytest.mark.parametrize("length, block", [(128, 128), (384, 128), (768, 256), (2048, 512), (12, None), (201, None)])
def test_kernels_take_lengths_they_can_tile(length, block):
    assert fused_attention.splash_block(length) == block
    assert fused_attention.uses_kernel("splash", length) == (block is not None)
    assert fused_attention.uses_kernel("cudnn", length) == (length % 2 == 0)
    assert not fused_attention.uses_kernel("xla", length)


def test_untileable_forward_falls_back_to_the_decoders_attention(llama, kernel):
    """13 tokens suit neither kernel: the decoder's own attention runs, same logits."""
    ids, mask = jnp.asarray(INPUT_IDS[:, :13]), jnp.asarray(ATTENTION_MASK[:, -13:])
    ours = build_decoder(llama.config, llama.params, kernel)(ids, mask).logits
    reference = build_decoder(llama.config, llama.params)(ids, mask).logits
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))


@pytest.mark.parametrize(
    "attention, backend, dtype, message",
    [
        ("splash", "gpu", "bfloat16", r"'splash' is a TPU kernel and this process runs on GPUs; use 'xla'"),
        ("cudnn", "tpu", "bfloat16", r"'cudnn' is a GPU kernel and this process runs on TPUs; use 'xla'"),
        ("cudnn", "gpu", "float32", r"'cudnn' needs runtime.dtype bfloat16 or float16, not float32 \(cuDNN's flash .*\)"),
    ],
)
def test_a_kernel_the_device_cannot_run_is_refused_in_one_sentence(llama, monkeypatch, attention, backend, dtype, message):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    decoder = build_decoder(llama.config, llama.params, RuntimeOptions(attention=attention, dtype=dtype))
    with pytest.raises(ValueError) as refused:
        decoder(jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK))
    assert re.fullmatch(r"runtime\.attention: .*" + message, str(refused.value).splitlines()[0])
