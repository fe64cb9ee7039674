"""Export: params out of a training state, reduced precision, shard size, and `eu-convert verify`."""

from __future__ import annotations

import json
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from eu_jax.convert.checkpoint import ParamReader, load_params, read_model_meta, storage_dtype, write_model_meta
from eu_jax.convert.cli import main as eu_convert
from eu_jax.convert.export import export_checkpoint
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.convert.keymap import rules_for
from eu_jax.convert.threads import conversion_threads
from eu_jax.models.config import RuntimeOptions
from eu_jax.tree_paths import get_path
from tests.tiny_models import save_hf_model


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    model = save_hf_model("qwen2", root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    return root, model


def test_param_reader_gives_every_param_asked_for_in_or_out_of_its_order(imported):
    """Reads ahead in the order given, yet any param asked for, in any order or twice, is the stored one."""
    root, _ = imported
    stored, meta = load_params(root / "ckpt", keep_stored_dtype=True)
    order = [rule.path for rule in rules_for(meta.config)]
    asked = order[:2] + order[::-1] + [order[0], order[0]]
    with ParamReader(root / "ckpt", order=order) as reader:
        for path in asked:
            expected, got = get_path(stored, path), reader(path)
            assert got.dtype == expected.dtype and np.array_equal(got, expected), path
    assert not [t for t in threading.enumerate() if t.name.startswith("param-read")]


def test_params_inside_a_training_state_export_like_the_params(imported, tmp_path):
    root, model = imported
    params, _ = load_params(root / "ckpt")
    run = tmp_path / "run"
    state = {
        "params": params,
        "opt_state": {"mu": jax.tree.map(np.zeros_like, params), "count": np.int32(7)},
        "step": np.int32(7),
    }
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(run / "3" / "state", jax.tree.map(lambda x: x * 0, state))  # an older step
        checkpointer.save(run / "7" / "state", state)
    write_model_meta(run, read_model_meta(root / "ckpt"))

    export_checkpoint(run, tmp_path / "hf", progress=False)  # the latest step is picked
    exported = safetensors.numpy.load_file(tmp_path / "hf" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        np.testing.assert_array_equal(exported[name], tensor.numpy(), err_msg=name)


@pytest.mark.parametrize("dtype, torch_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float16)])
def test_reduced_precision_export_rounds_like_torch(imported, tmp_path, dtype, torch_dtype):
    root, model = imported
    export_checkpoint(root / "ckpt", tmp_path / "hf", dtype=dtype, progress=False)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["dtype"] == dtype
    reloaded = type(model).from_pretrained(tmp_path / "hf", dtype=torch_dtype)
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor.to(torch_dtype)), name


def test_shard_size_splits_into_an_indexed_set(imported, tmp_path):
    root, model = imported
    export_checkpoint(root / "ckpt", tmp_path / "hf", max_shard_bytes=100_000, progress=False)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())
    reloaded = type(model).from_pretrained(tmp_path / "hf", dtype=torch.float32)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def test_verify_passes_for_a_faithful_import_and_fails_for_a_damaged_one(imported, tmp_path, capsys):
    root, _ = imported
    assert eu_convert(["verify", str(root / "hf"), str(root / "ckpt")]) == 0
    assert "mean KL per token" in capsys.readouterr().out

    params, _ = load_params(root / "ckpt")
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * np.float32(1.5)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "bad" / "params", params)
    write_model_meta(tmp_path / "bad", read_model_meta(root / "ckpt"))
    assert eu_convert(["verify", str(root / "hf"), str(tmp_path / "bad")]) == 1
    assert "FAILED" in capsys.readouterr().err


def _import_bf16_release(root, family: str):
    """A tiny `family` model saved in bf16 to root/hf, imported to root/ckpt with fp32 params; the torch model."""
    model = save_hf_model(family, root / "fp32").to(torch.bfloat16)
    model.save_pretrained(root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    return model


@pytest.mark.parametrize("threads", [1, 5])
def test_bf16_source_round_trips_bit_exact_through_fp32_params(tmp_path, monkeypatch, threads):
    """A bf16 release imported into fp32 params and exported to bf16 gives back the same bits, whether one
    thread lays out the tensors or several read, transpose and load ahead at once."""
    monkeypatch.setattr("eu_jax.convert.hf_import.conversion_threads", lambda: threads)
    monkeypatch.setattr("eu_jax.convert.export.conversion_threads", lambda: threads)
    _import_bf16_release(tmp_path, "llama")
    params, _ = load_params(tmp_path / "ckpt")
    assert params["embed"].dtype == np.float32
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16", progress=False)
    original = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    exported = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    assert set(original) == set(exported)
    for name, tensor in original.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


def test_conversion_threads_follow_the_usable_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(3)), raising=False)
    assert conversion_threads() == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(64)), raising=False)
    assert conversion_threads() == 8  # each thread holds tensors of its own
    monkeypatch.delattr("os.sched_getaffinity", raising=False)  # macOS
    monkeypatch.setattr("os.cpu_count", lambda: None)
    assert conversion_threads() == 1


def _stored_dtypes(ckpt) -> set[str]:
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(ckpt / "params").item_metadata.tree
    return {str(leaf.dtype) for leaf in jax.tree.leaves(tree)}


def test_bf16_source_is_stored_in_bf16_and_loads_as_the_exact_fp32_values(tmp_path):
    """The import writes the bf16 weights as they are (half the bytes of fp32); load_params widens them."""
    model = _import_bf16_release(tmp_path, "qwen2")  # qwen2: q/k/v biases too
    assert _stored_dtypes(tmp_path / "ckpt") == {"bfloat16"}
    assert read_model_meta(tmp_path / "ckpt").param_dtype == "float32"
    export_checkpoint(tmp_path / "ckpt", tmp_path / "out", dtype="float32", progress=False)
    exported = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    for name, tensor in safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors").items():
        assert exported[name].dtype == torch.float32 and torch.equal(exported[name], tensor.float()), name
    params, _ = load_params(tmp_path / "ckpt")
    torch_embed = model.get_input_embeddings().weight.detach().float().numpy()
    assert params["embed"].dtype == np.float32
    np.testing.assert_array_equal(params["embed"], torch_embed)
    narrow, _ = load_params(tmp_path / "ckpt", dtype="bfloat16")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(narrow)} == {"bfloat16"}
    kept, _ = load_params(tmp_path / "ckpt", keep_stored_dtype=True)  # a frozen reference: as stored
    assert {leaf.dtype.name for leaf in jax.tree.leaves(kept)} == {"bfloat16"}
    np.testing.assert_array_equal(np.asarray(kept["embed"], np.float32), torch_embed)


def test_keep_stored_dtype_never_widens_beyond_the_params_dtype(imported):
    root, _ = imported  # stored in fp32
    kept, _ = load_params(root / "ckpt", keep_stored_dtype=True)
    assert {leaf.dtype.name for leaf in jax.tree.leaves(kept)} == {"float32"}
    narrow, _ = load_params(root / "ckpt", dtype="bfloat16", keep_stored_dtype=True)
    assert {leaf.dtype.name for leaf in jax.tree.leaves(narrow)} == {"bfloat16"}


def test_fp32_source_is_stored_in_the_params_dtype(imported, tmp_path):
    root, _ = imported
    assert _stored_dtypes(root / "ckpt") == {"float32"}
    import_checkpoint(root / "hf", tmp_path / "bf16", RuntimeOptions(param_dtype="bfloat16"), progress=False)
    assert _stored_dtypes(tmp_path / "bf16") == {"bfloat16"}


@pytest.mark.parametrize(
    "sources, params, stored",
    [
        (["bfloat16"] * 2, "float32", "bfloat16"),  # widening is exact: kept
        (["float16"], "float32", "float16"),
        (["float32"], "float32", "float32"),
        (["float32"], "bfloat16", "bfloat16"),  # narrower params: the params dtype, as in memory
        (["float16"], "bfloat16", "bfloat16"),  # fp16 -> bf16 is not exact either way round
        (["bfloat16", "float16"], "float32", "float32"),  # mixed layers: what holds both
        (["int8"], "float32", "float32"),  # not a float: never the storage dtype
    ],
)
def test_storage_dtype(sources, params, stored):
    assert storage_dtype([np.dtype(d) for d in sources], np.dtype(params)) == np.dtype(stored)
