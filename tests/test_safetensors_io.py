"""safetensors_io against independent references: files written, and read back, by `safetensors` and transformers."""

import json
import re
import struct
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
import transformers

from eu_jax.convert.safetensors_io import (
    HFWeights,
    TensorToWrite,
    WeightFormatError,
    dtype_from_safetensors_name,
    open_hf_weights,
    safetensors_dtype_name,
    write_safetensors_shards,
)


def _bits(array: np.ndarray) -> tuple:
    """Everything that must match for two arrays to be bit-identical (NaN payloads and -0.0 included)."""
    return array.dtype, array.shape, array.tobytes()


def _torch_to_numpy(tensor: torch.Tensor) -> np.ndarray:
    """The reference conversion: bf16 bits reinterpreted, everything else through torch's own .numpy()."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


def _mixed_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 5)).astype(np.float32)
    f32[0, :3] = [np.nan, -0.0, np.inf]
    return {
        "f32": f32,
        "f16": rng.standard_normal((4, 2)).astype(np.float16),
        "f64": rng.standard_normal(7),
        "i64": rng.integers(-(2**62), 2**62, size=(2, 3), dtype=np.int64),
        "i32": rng.integers(-1000, 1000, size=5, dtype=np.int32),
        "i8": rng.integers(-128, 127, size=6, dtype=np.int8),
        "u8": rng.integers(0, 255, size=(2, 2), dtype=np.uint8),
        "bool": rng.random((3, 3)) > 0.5,
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def tiny_llama() -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms start at exactly 1.0; make them distinguishable
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param))
    return model


def _raw_safetensors(path, header: bytes | dict, data: bytes = b"") -> None:
    header_bytes = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)


# ----------------------------------------------------------------------------------------------- reading


def test_reads_every_dtype_bit_exact_from_safetensors_numpy(tmp_path):
    arrays = _mixed_arrays()
    safetensors.numpy.save_file(arrays, tmp_path / "model.safetensors", metadata={"format": "np"})
    with open_hf_weights(tmp_path) as weights:
        assert weights.names() == sorted(arrays)
        assert weights.nbytes == sum(a.nbytes for a in arrays.values())
        for name, expected in arrays.items():
            assert name in weights
            assert weights.shape(name) == expected.shape
            assert weights.dtype(name) == expected.dtype
            assert weights.file_of(name) == tmp_path / "model.safetensors"
            assert _bits(weights.read(name)) == _bits(expected)
        assert "nope" not in weights
        first = weights.read("f32")
        first[...] = 0  # read() hands out a fresh array each time
        assert _bits(weights.read("f32")) == _bits(arrays["f32"])


def test_reads_bf16_written_by_safetensors_torch(tmp_path):
    tensors = {
        "bf16": torch.randn(6, 10, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
        "f32": torch.randn(3, generator=torch.Generator().manual_seed(2)),
    }
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors")
    with open_hf_weights(tmp_path) as weights:
        assert weights.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
        for name, tensor in tensors.items():
            assert _bits(weights.read(name)) == _bits(_torch_to_numpy(tensor))


def test_reads_sharded_checkpoint_saved_by_transformers(tmp_path, tiny_llama):
    tiny_llama.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    state_dict = tiny_llama.state_dict()
    with open_hf_weights(tmp_path) as weights:
        assert weights.names() == sorted(state_dict)
        for name, tensor in state_dict.items():
            assert _bits(weights.read(name)) == _bits(_torch_to_numpy(tensor))
            assert weights.file_of(name) == tmp_path / index["weight_map"][name]
        assert weights.nbytes == index["metadata"]["total_size"]


def test_prefers_safetensors_when_a_pickle_is_also_present(tmp_path):
    torch.save({"w": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    safetensors.numpy.save_file({"w": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
    with open_hf_weights(tmp_path) as weights:
        assert weights.file_of("w").name == "model.safetensors"
        np.testing.assert_array_equal(weights.read("w"), np.ones(2, np.float32))


def test_pickle_loads_bit_exact_with_opt_in(tmp_path):
    state_dict = {
        "bf16": torch.randn(4, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16),
        "f32": torch.tensor([1.5, float("nan"), -0.0]),
        "i64": torch.arange(-3, 3, dtype=torch.int64).reshape(2, 3),
        "bool": torch.tensor([True, False, True]),
    }
    torch.save(state_dict, tmp_path / "pytorch_model.bin")
    with open_hf_weights(tmp_path, allow_pickle=True) as weights:
        assert weights.names() == sorted(state_dict)
        assert weights.dtype("bf16") == np.dtype(ml_dtypes.bfloat16)
        for name, tensor in state_dict.items():
            assert _bits(weights.read(name)) == _bits(_torch_to_numpy(tensor))


def test_sharded_pickle_loads_with_opt_in(tmp_path):
    shards = {"a.bin": {"x": torch.arange(4.0)}, "b.bin": {"y": torch.ones(2, 2, dtype=torch.float16)}}
    for file, part in shards.items():
        torch.save(part, tmp_path / file)
    weight_map = {"x": "a.bin", "y": "b.bin"}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with open_hf_weights(tmp_path, allow_pickle=True) as weights:
        assert weights.names() == ["x", "y"]
        assert weights.file_of("y") == tmp_path / "b.bin"
        for part in shards.values():
            for name, tensor in part.items():
                assert _bits(weights.read(name)) == _bits(tensor.numpy())


def test_dtype_names_round_trip():
    for name in ["BOOL", "U8", "I8", "I16", "I32", "I64", "F16", "BF16", "F32", "F64"]:
        assert safetensors_dtype_name(dtype_from_safetensors_name(name)) == name
    assert safetensors_dtype_name(ml_dtypes.bfloat16) == "BF16"
    with pytest.raises(WeightFormatError, match="complex64 cannot be stored"):
        safetensors_dtype_name(np.complex64)
    with pytest.raises(WeightFormatError, match="Unknown safetensors dtype 'Q4'"):
        dtype_from_safetensors_name("Q4")


# ----------------------------------------------------------------------------------------------- read errors


def test_truncated_file(tmp_path):
    path = tmp_path / "model.safetensors"
    safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, path)
    path.write_bytes(path.read_bytes()[:-5])
    message = rf"{re.escape(str(path))} is truncated: tensor 'w' needs bytes up to 64 but the data section has only 59"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_garbage_file_has_absurd_header_length(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    message = rf"{re.escape(str(path))} is not a valid safetensors file \(header length \d+ is over the 100 MB limit"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_header_length_beyond_end_of_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    message = r"is not a valid safetensors file \(header length 1000 but the file has only 10 bytes"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_header_not_json(tmp_path):
    path = tmp_path / "model.safetensors"
    _raw_safetensors(path, b"{this is \xfe not json}   ")
    with pytest.raises(WeightFormatError, match=rf"{re.escape(str(path))} is corrupt: its header is not valid JSON"):
        open_hf_weights(tmp_path)


def test_offsets_not_matching_shape(tmp_path):
    header = {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}
    _raw_safetensors(tmp_path / "model.safetensors", header, bytes(16))
    message = r"is corrupt: tensor 'w' has data_offsets \[0, 12\] but shape \[2, 2\] of F32 needs 16 bytes"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_overlapping_tensors(tmp_path):
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    _raw_safetensors(tmp_path / "model.safetensors", header, bytes(16))
    with pytest.raises(safetensors.SafetensorError):  # the reference reader refuses it too
        safetensors.numpy.load_file(tmp_path / "model.safetensors")
    with pytest.raises(WeightFormatError, match=r"is corrupt: the data of tensors 'a' and 'b' overlap"):
        open_hf_weights(tmp_path)


def test_unknown_dtype(tmp_path):
    header = {"w": {"dtype": "F8_E4M3", "shape": [4], "data_offsets": [0, 4]}}
    _raw_safetensors(tmp_path / "model.safetensors", header, bytes(4))
    with pytest.raises(WeightFormatError, match=r"has tensor 'w' with unsupported dtype 'F8_E4M3'"):
        open_hf_weights(tmp_path)


def test_index_lists_missing_shard(tmp_path):
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, tmp_path / "model-00001-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    missing = r"model-00002-of-00002\.safetensors"
    message = rf"{re.escape(str(index))} lists shard {missing} \(holding 'b'\), but .*{missing} does not exist"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_index_tensor_absent_from_its_shard(tmp_path):
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, tmp_path / "shard.safetensors")
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "shard.safetensors", "b": "shard.safetensors"}}))
    with pytest.raises(WeightFormatError, match=r"puts tensor 'b' in shard.safetensors, which does not contain it"):
        open_hf_weights(tmp_path)


@pytest.mark.parametrize("content", ["{not json", '{"metadata": {}}', '{"weight_map": ["a"]}'])
def test_invalid_index(tmp_path, content):
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(content)
    with pytest.raises(WeightFormatError, match=rf"{re.escape(str(index))} is not a valid weight index"):
        open_hf_weights(tmp_path)


def test_missing_tensor_name(tmp_path):
    safetensors.numpy.save_file({"a": np.ones(2, np.float32)}, tmp_path / "model.safetensors")
    with open_hf_weights(tmp_path) as weights:
        message = rf"Tensor 'nope' is not in the weights of {re.escape(str(tmp_path))}"
        with pytest.raises(WeightFormatError, match=message):
            weights.read("nope")
        with pytest.raises(WeightFormatError, match="'nope'"):
            weights.shape("nope")


def test_pickle_refused_without_opt_in(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"w": torch.ones(3)}, path)
    message = rf"{re.escape(str(path))} is a pickle, .*can run arbitrary code.*--allow-pickle"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


def test_empty_directory(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    looked_for = "model.safetensors, model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json"
    message = rf"No weights found in {re.escape(str(tmp_path))} \(looked for {re.escape(looked_for)}\)"
    with pytest.raises(WeightFormatError, match=message):
        open_hf_weights(tmp_path)


# ----------------------------------------------------------------------------------------------- writing


def _to_write(arrays: dict[str, np.ndarray], loaded: list[str] | None = None) -> list[TensorToWrite]:
    def loader(name):
        def load():
            if loaded is not None:
                loaded.append(name)
            return arrays[name]

        return load

    return [TensorToWrite(name, a.shape, a.dtype, loader(name)) for name, a in arrays.items()]


def test_writer_shards_read_back_by_safetensors_numpy(tmp_path):
    arrays = _mixed_arrays()
    loaded: list[str] = []
    paths = write_safetensors_shards(_to_write(arrays, loaded), tmp_path, max_shard_bytes=64)
    assert loaded == list(arrays)  # each load() called once, in order

    index_path = tmp_path / "model.safetensors.index.json"
    shards = paths[:-1]
    assert paths[-1] == index_path
    n = len(shards)
    assert n > 2
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)

    index = json.loads(index_path.read_text())
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in arrays.values())}
    read_back = {}
    for shard in shards:
        part = safetensors.numpy.load_file(shard)
        assert all(index["weight_map"][name] == shard.name for name in part)
        read_back.update(part)
        with safetensors.safe_open(shard, framework="np") as f:
            assert f.metadata() == {"format": "pt"}
    assert set(read_back) == set(arrays) == set(index["weight_map"])
    for name, expected in arrays.items():
        assert _bits(read_back[name]) == _bits(expected)


def test_writer_output_loads_in_transformers_bit_exact(tmp_path, tiny_llama):
    state_dict = {name: t.detach().to(torch.bfloat16) for name, t in tiny_llama.state_dict().items()}
    tiny_llama.config.save_pretrained(tmp_path)
    arrays = {name: _torch_to_numpy(t) for name, t in state_dict.items()}
    paths = write_safetensors_shards(_to_write(arrays), tmp_path, max_shard_bytes=20_000, progress=True)
    assert len(paths) > 2

    loaded, info = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.bfloat16, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded_state = loaded.state_dict()
    assert set(loaded_state) == set(state_dict)
    for name, tensor in state_dict.items():
        assert loaded_state[name].dtype == torch.bfloat16
        assert torch.equal(loaded_state[name].view(torch.int16), tensor.view(torch.int16)), name

    for shard in paths[:-1]:  # and the bf16 shards read back by safetensors' torch backend
        for name, tensor in safetensors.torch.load_file(shard).items():
            assert torch.equal(tensor.view(torch.int16), state_dict[name].view(torch.int16))


def test_writer_single_shard_replaces_an_earlier_sharded_export(tmp_path):
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, ml_dtypes.bfloat16)}
    write_safetensors_shards(_to_write(arrays), tmp_path, max_shard_bytes=8)
    assert (tmp_path / "model.safetensors.index.json").exists()

    paths = write_safetensors_shards(_to_write(arrays), tmp_path, metadata={"format": "pt", "source": "test"})
    assert paths == [tmp_path / "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    with safetensors.safe_open(paths[0], framework="pt") as f:
        assert f.metadata() == {"format": "pt", "source": "test"}
        assert torch.equal(f.get_tensor("a"), torch.from_numpy(arrays["a"]))
        assert f.get_tensor("b").dtype == torch.bfloat16
        assert torch.equal(f.get_tensor("b"), torch.ones(4, dtype=torch.bfloat16))
    header_len = struct.unpack("<Q", paths[0].read_bytes()[:8])[0]
    assert header_len % 8 == 0


def test_writer_gives_an_oversized_tensor_its_own_shard(tmp_path):
    sizes = {"small1": 2, "big": 100, "small2": 2, "small3": 2}
    arrays = {name: np.zeros(size, np.float32) for name, size in sizes.items()}
    write_safetensors_shards(_to_write(arrays), tmp_path, max_shard_bytes=20)
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    assert weight_map == {
        "small1": "model-00001-of-00003.safetensors",
        "big": "model-00002-of-00003.safetensors",
        "small2": "model-00003-of-00003.safetensors",
        "small3": "model-00003-of-00003.safetensors",
    }


@pytest.mark.parametrize(
    "returned, got",
    [
        (np.zeros(3, np.float32), r"float32 \(3,\)"),
        (np.zeros((2, 2), np.float16), r"float16 \(2, 2\)"),
        ([0.0] * 4, "list"),
    ],
)
def test_writer_rejects_a_load_that_does_not_match_its_declaration(tmp_path, returned, got):
    tensors = [
        TensorToWrite("a", (2,), np.dtype(np.float32), lambda: np.zeros(2, np.float32)),
        TensorToWrite("b", (2, 2), np.dtype(np.float32), lambda: returned),
    ]
    message = rf"Tensor 'b' for .*model.safetensors loaded as {got}, but float32 \(2, 2\) was declared"
    with pytest.raises(WeightFormatError, match=message):
        write_safetensors_shards(tensors, tmp_path)
    assert list(tmp_path.iterdir()) == []  # no half-written file left behind, under any name


def test_writer_rejects_bad_requests(tmp_path):
    a = TensorToWrite("a", (1,), np.dtype(np.float32), lambda: np.zeros(1, np.float32))
    with pytest.raises(WeightFormatError, match="'a' is repeated"):
        write_safetensors_shards([a, a], tmp_path)
    with pytest.raises(WeightFormatError, match="has dtype complex64"):
        write_safetensors_shards([TensorToWrite("c", (1,), np.dtype(np.complex64), lambda: None)], tmp_path)
    with pytest.raises(WeightFormatError, match="No tensors"):
        write_safetensors_shards([], tmp_path)


def test_writer_loads_ahead_on_threads_holding_a_bounded_number_of_tensors(tmp_path):
    arrays = {f"t{i:02d}": np.full((16, 4), i, np.float32) for i in range(24)}
    next_two_loaded = {name: threading.Event() for name in ("t01", "t02")}
    lock = threading.Lock()
    alive, most_alive = [0], [0]

    def released() -> None:
        with lock:
            alive[0] -= 1

    def loader(name):
        def load():
            if name == "t00":  # finishes only once two other threads have loaded the next two tensors
                assert all(event.wait(timeout=60) for event in next_two_loaded.values())
            with lock:
                alive[0] += 1
                most_alive[0] = max(most_alive[0], alive[0])
            array = arrays[name].copy()
            weakref.finalize(array, released)
            if name in next_two_loaded:
                next_two_loaded[name].set()
            return array

        return load

    tensors = [TensorToWrite(name, a.shape, a.dtype, loader(name)) for name, a in arrays.items()]
    paths = write_safetensors_shards(tensors, tmp_path, max_shard_bytes=1000, load_threads=3)
    assert len(paths) > 3
    read_back = {name: a for shard in paths[:-1] for name, a in safetensors.numpy.load_file(shard).items()}
    assert {name: _bits(a) for name, a in read_back.items()} == {name: _bits(a) for name, a in arrays.items()}
    assert 3 <= most_alive[0] <= 4  # 3 loading ahead + the one being written, never the whole model
    assert alive[0] == 0


def test_writer_stops_loading_after_a_failed_load(tmp_path):
    started: list[str] = []

    def loader(index):
        def load():
            started.append(f"t{index}")
            if index == 5:
                raise WeightFormatError("tensor t5 could not be converted")
            return np.zeros(4, np.float32)

        return load

    tensors = [TensorToWrite(f"t{i}", (4,), np.dtype(np.float32), loader(i)) for i in range(40)]
    with pytest.raises(WeightFormatError, match="t5 could not be converted"):
        write_safetensors_shards(tensors, tmp_path, max_shard_bytes=32, load_threads=2)
    assert len(started) <= 5 + 1 + 2 + 1  # the loads before it, itself, and those queued behind it
    names = {p.name for p in tmp_path.iterdir()}  # the shards completed before it, and no index vouching for them
    assert names == {f"model-{i:05d}-of-00020.safetensors" for i in range(1, len(names) + 1)} and len(names) <= 2


def test_reads_from_many_threads_at_once_are_bit_exact(tmp_path):
    """The import reads tensors of one file on several threads: reads must not share a file position."""
    rng = np.random.default_rng(0)
    arrays = {f"w{i:02d}": rng.standard_normal((64, 48)).astype(np.float32) for i in range(48)}
    safetensors.numpy.save_file(arrays, tmp_path / "model.safetensors")
    with open_hf_weights(tmp_path) as weights, ThreadPoolExecutor(8) as pool:
        for _ in range(5):
            read = dict(zip(arrays, pool.map(weights.read, arrays)))
            assert {n: _bits(a) for n, a in read.items()} == {n: _bits(a) for n, a in arrays.items()}


def test_read_back_after_write_is_a_faithful_hfweights(tmp_path):
    arrays = _mixed_arrays()
    write_safetensors_shards(_to_write(arrays), tmp_path, max_shard_bytes=100)
    with open_hf_weights(tmp_path) as weights:
        assert isinstance(weights, HFWeights)
        assert weights.names() == sorted(arrays)
        for name, expected in arrays.items():
            assert _bits(weights.read(name)) == _bits(expected)
