"""Layer-by-layer tracing against transformers: MLP keys, residual streams, logits, and an added offset."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from eu_jax.convert.checkpoint import load_params
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.models.state import build_decoder
from eu_jax.unierase.tracing import add_at_positions, at_positions, final_logits, run_layers
from tests.tiny_models import save_hf_model

IDS = np.array([[1, 17, 42, 99, 7, 3, 250, 12], [1, 5, 6, 7, 8, 0, 0, 0]], np.int32)
MASK = np.array([[1] * 8, [1] * 5 + [0] * 3], np.int32)


@pytest.fixture(scope="module", params=["llama_biases", "qwen3"])
def models(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf = save_hf_model(request.param, root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    params, meta = load_params(root / "ckpt")
    return hf, build_decoder(meta.config, params)


def _torch_trace(hf, offset_layer=None, offset=None, positions=None):
    """Logits, down_proj inputs and layer outputs of the PyTorch model (hooks), with an optional offset added."""
    keys, outputs, handles = {}, {}, []
    for i, layer in enumerate(hf.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_hook(lambda m, args, out, i=i: keys.__setitem__(i, args[0].detach().numpy())))

        def on_layer(m, args, out, i=i):
            hidden = out[0] if isinstance(out, tuple) else out
            if i == offset_layer:
                hidden = hidden.clone()
                hidden[torch.arange(len(positions)), torch.as_tensor(positions)] += torch.as_tensor(offset)
            outputs[i] = hidden.detach().numpy()
            return (hidden,) + tuple(out[1:]) if isinstance(out, tuple) else hidden

        handles.append(layer.register_forward_hook(on_layer))
    with torch.no_grad():
        logits = hf(input_ids=torch.as_tensor(IDS).long(), attention_mask=torch.as_tensor(MASK).long()).logits.numpy()
    for handle in handles:
        handle.remove()
    return logits, keys, outputs


def test_keys_residuals_and_logits_match_transformers(models):
    hf, model = models
    n = model.config.num_layers
    inputs = model.prepare(IDS, MASK)
    x, keys = run_layers(model, inputs, inputs.x, 0, n, key_layers=tuple(range(n)))
    logits, torch_keys, torch_outputs = _torch_trace(hf)
    real = MASK.astype(bool)
    np.testing.assert_allclose(np.asarray(final_logits(model, x))[real], logits[real], atol=1e-4)
    for i in range(n):
        np.testing.assert_allclose(np.asarray(keys[i])[real], torch_keys[i][real], atol=1e-4)
    first, _ = run_layers(model, inputs, inputs.x, 0, 1)
    np.testing.assert_allclose(np.asarray(first)[real], torch_outputs[0][real], atol=1e-4)


def test_an_offset_after_a_layer_changes_the_rest_as_in_transformers(models):
    hf, model = models
    positions = np.array([3, 2], np.int32)
    offset = np.random.default_rng(0).normal(size=(2, model.config.hidden_size)).astype(np.float32)
    inputs = model.prepare(IDS, MASK)
    h, _ = run_layers(model, inputs, inputs.x, 0, 1)
    np.testing.assert_allclose(np.asarray(at_positions(h, positions)), np.asarray(h)[[0, 1], positions], atol=0)
    x, _ = run_layers(model, inputs, add_at_positions(h, positions, offset), 1, model.config.num_layers)
    logits, _, _ = _torch_trace(hf, offset_layer=0, offset=offset, positions=positions)
    plain, _, _ = _torch_trace(hf)
    real = MASK.astype(bool)
    assert np.abs(logits - plain)[real].max() > 1e-2  # the offset matters at and after its position
    np.testing.assert_allclose(np.asarray(final_logits(model, x))[real], logits[real], atol=1e-4)
