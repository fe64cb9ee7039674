"""Safetensors reading and writing without mmap or torch, plus a view over a Hugging Face weight directory.

Reads one tensor at a time (positional reads, so several threads may read at once) into a fresh numpy
buffer and writes stream one tensor at a time, so peak memory stays near the largest tensors rather than the
whole model (mmap'd pages would count in RSS, which is what gets a conversion job killed).
"""

from __future__ import annotations

import abc
import collections
import json
import math
import os
import re
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import ml_dtypes
import numpy as np
from tqdm import tqdm

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
# Looked for in this order: safetensors first, and a single file before an index, as transformers does.
_CANDIDATES = (SAFE_WEIGHTS, SAFE_INDEX, PICKLE_WEIGHTS, PICKLE_INDEX)
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I16": np.dtype(np.int16),
    "I32": np.dtype(np.int32),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
}
_NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in _DTYPES.items()}


class WeightFormatError(ValueError):
    """A weight file or directory is missing, corrupt, unsupported or refused; the message names the file."""


def safetensors_dtype_name(dtype: np.dtype) -> str:
    """The safetensors dtype string ("BF16", "F32", ...) for a numpy dtype."""
    name = _NAMES.get(np.dtype(dtype))
    if name is None:
        raise WeightFormatError(f"dtype {np.dtype(dtype)} cannot be stored in safetensors (supported: {_supported()})")
    return name


def dtype_from_safetensors_name(name: str) -> np.dtype:
    """The numpy dtype for a safetensors dtype string; the inverse of `safetensors_dtype_name`."""
    if name not in _DTYPES:
        raise WeightFormatError(f"Unknown safetensors dtype {name!r} (supported: {_supported()})")
    return _DTYPES[name]


def _supported() -> str:
    return ", ".join(_DTYPES)


# ----------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: np.dtype
    start: int = 0  # absolute byte offset of the data in a safetensors file
    array: np.ndarray | None = None  # pickled checkpoints: torch.load gives the whole file at once

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class WeightReader(abc.ABC):
    """What the importer reads weights through (safetensors, opt-in pickles, GGUF): Hugging Face tensor
    names, one tensor at a time; a context manager that closes its files."""

    @abc.abstractmethod
    def names(self) -> list[str]: ...

    @abc.abstractmethod
    def shape(self, name: str) -> tuple[int, ...]: ...

    @abc.abstractmethod
    def dtype(self, name: str) -> np.dtype:
        """The dtype `read` returns for this tensor."""

    @abc.abstractmethod
    def read(self, name: str) -> np.ndarray:
        """A fresh array of this tensor; safe to call from several threads at once (the import does)."""

    @abc.abstractmethod
    def file_of(self, name: str) -> Path: ...

    @abc.abstractmethod
    def __contains__(self, name: str) -> bool: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> "WeightReader":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HFWeights(WeightReader):
    """Read-only view over a model directory's weights; `read` loads one tensor at a time. Use `open_hf_weights`."""

    def __init__(self, model_dir: Path, entries: dict[str, _Entry], handles: dict[Path, BinaryIO]):
        self.model_dir = model_dir
        self._entries = entries
        self._handles = handles

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entry(name).shape

    def dtype(self, name: str) -> np.dtype:
        return self._entry(name).dtype

    def file_of(self, name: str) -> Path:
        return self._entry(name).file

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors."""
        return sum(entry.nbytes for entry in self._entries.values())

    def read(self, name: str) -> np.ndarray:
        """A fresh array in the file's dtype; only this tensor's bytes are read."""
        entry = self._entry(name)
        if entry.array is not None:
            return entry.array.copy()
        buffer = np.empty(entry.nbytes, dtype=np.uint8)
        descriptor = self._handles[entry.file].fileno()
        view = memoryview(buffer)  # bfloat16 has no buffer format, so read as bytes and reinterpret
        done = 0
        while done < entry.nbytes:  # raw reads may return less than asked (about 2 GiB at most on Linux)
            # Positional reads share no file offset, so threads may read tensors of one file at once.
            count = os.preadv(descriptor, [view[done:]], entry.start + done)
            if not count:
                raise WeightFormatError(f"{entry.file} is truncated: tensor {name!r} ended early while reading")
            done += count
        return buffer.view(entry.dtype).reshape(entry.shape)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise WeightFormatError(f"Tensor {name!r} is not in the weights of {self.model_dir}")
        return entry


def open_hf_weights(model_dir: str | Path, allow_pickle: bool = False) -> HFWeights:
    """Open a Hugging Face model directory's weights, validating every header up front (no tensor data is read).

    Pickled ``pytorch_model.bin`` weights are refused unless ``allow_pickle``, because unpickling can run code.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightFormatError(f"{model_dir} is not a directory")
    path = next((model_dir / name for name in _CANDIDATES if (model_dir / name).is_file()), None)
    if path is None:
        raise WeightFormatError(f"No weights found in {model_dir} (looked for {', '.join(_CANDIDATES)})")
    pickled = path.name in (PICKLE_WEIGHTS, PICKLE_INDEX)
    if pickled and not allow_pickle:
        raise WeightFormatError(
            f"{path} is a pickle, and loading a pickle can run arbitrary code, so pass --allow-pickle "
            "(allow_pickle=True) to opt in or convert the checkpoint to safetensors"
        )
    weight_map = _read_index(path) if path.name.endswith(".index.json") else None
    files = sorted(set(weight_map.values())) if weight_map is not None else [path]
    handles: dict[Path, BinaryIO] = {}
    try:
        per_file: dict[Path, dict[str, _Entry]] = {}
        for file in files:
            if pickled:
                per_file[file] = _read_pickle(file)
            else:
                handles[file] = open(file, "rb", buffering=0)  # unbuffered: reads go straight to numpy
                per_file[file] = _read_header(file, handles[file])
        entries = per_file[path] if weight_map is None else _select(path, weight_map, per_file)
    except BaseException:
        for handle in handles.values():
            handle.close()
        raise
    return HFWeights(model_dir, entries, handles)


def _read_index(index: Path) -> dict[str, Path]:
    """An index's weight_map as tensor name -> existing shard path."""
    try:
        weight_map = json.loads(index.read_bytes())["weight_map"]
        valid = isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values())
    except (ValueError, KeyError, TypeError):
        valid = False
    if not valid:
        raise WeightFormatError(f'{index} is not a valid weight index (it needs a JSON "weight_map" of name -> file)')
    shards = {name: index.parent / shard for name, shard in weight_map.items()}
    for name, shard in shards.items():
        if not shard.is_file():
            raise WeightFormatError(f"{index} lists shard {shard.name} (holding {name!r}), but {shard} does not exist")
    return shards


def _select(index: Path, weight_map: dict[str, Path], per_file: dict[Path, dict[str, _Entry]]) -> dict[str, _Entry]:
    entries = {}
    for name, file in weight_map.items():
        if name not in per_file[file]:
            raise WeightFormatError(f"{index} puts tensor {name!r} in {file.name}, which does not contain it")
        entries[name] = per_file[file][name]
    return entries


def _read_header(path: Path, handle: BinaryIO) -> dict[str, _Entry]:
    """Parse and check a safetensors header: u64 little-endian length, JSON, then the data section."""
    size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise WeightFormatError(f"{path} is not a valid safetensors file (header: the file has only {size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > _MAX_HEADER_BYTES:
        raise WeightFormatError(
            f"{path} is not a valid safetensors file (header length {header_len} is over the 100 MB limit)"
        )
    if 8 + header_len > size:
        raise WeightFormatError(
            f"{path} is not a valid safetensors file (header length {header_len} but the file has only {size} bytes)"
        )
    try:
        header = json.loads(handle.read(header_len))
    except ValueError as error:  # JSONDecodeError or UnicodeDecodeError
        raise WeightFormatError(f"{path} is corrupt: its header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise WeightFormatError(f"{path} is corrupt: its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + header_len
    entries = {name: _parse_entry(path, name, info, data_start, size - data_start) for name, info in header.items()}
    _check_disjoint(path, entries)
    return entries


def _check_disjoint(path: Path, entries: dict[str, _Entry]) -> None:
    """Refuse tensors whose bytes overlap, as the reference reader does: a writer never shares bytes between
    tensors, so an overlap means a corrupt or crafted header (two weights would read each other's data)."""
    ordered = sorted((entry.start, entry.start + entry.nbytes, name) for name, entry in entries.items())
    for (_, end, name), (start, _, next_name) in zip(ordered, ordered[1:]):
        if start < end:
            raise WeightFormatError(f"{path} is corrupt: the data of tensors {name!r} and {next_name!r} overlap")


def _parse_entry(path: Path, name: str, info: object, data_start: int, data_size: int) -> _Entry:
    if not (
        isinstance(info, dict)
        and isinstance(info.get("dtype"), str)
        and _is_sizes(info.get("shape"))
        and _is_sizes(info.get("data_offsets"), length=2)
    ):
        raise WeightFormatError(f"{path} is corrupt: tensor {name!r} lacks a valid dtype, shape or data_offsets")
    dtype = _DTYPES.get(info["dtype"])
    if dtype is None:
        raise WeightFormatError(
            f"{path} has tensor {name!r} with unsupported dtype {info['dtype']!r} (supported: {_supported()})"
        )
    shape = tuple(info["shape"])
    begin, end = info["data_offsets"]
    needed = math.prod(shape) * dtype.itemsize
    if end - begin != needed:
        raise WeightFormatError(
            f"{path} is corrupt: tensor {name!r} has data_offsets [{begin}, {end}] but shape {list(shape)} "
            f"of {info['dtype']} needs {needed} bytes"
        )
    if end > data_size:
        raise WeightFormatError(
            f"{path} is truncated: tensor {name!r} needs bytes up to {end} but the data section has only {data_size}"
        )
    return _Entry(path, shape, dtype, start=data_start + begin)


def _is_sizes(value: object, length: int | None = None) -> bool:
    """A list of non-negative ints (bool is an int in Python, so it is excluded)."""
    return (
        isinstance(value, list)
        and (length is None or len(value) == length)
        and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    )


def _read_pickle(path: Path) -> dict[str, _Entry]:
    import torch  # only pickled checkpoints need torch

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise WeightFormatError(f"{path} could not be loaded as PyTorch weights ({error})") from error
    if not isinstance(state_dict, dict):
        raise WeightFormatError(f"{path} does not hold a state dict of tensors")
    entries = {}
    for name, tensor in state_dict.items():
        array = _torch_to_numpy(path, name, tensor)
        entries[name] = _Entry(path, array.shape, array.dtype, array=array)
    return entries


def _torch_to_numpy(path: Path, name: str, tensor: object) -> np.ndarray:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise WeightFormatError(f"{path} holds {type(tensor).__name__} under {name!r}, not a tensor")
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits, keeping them exact
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        array = tensor.numpy()
    except TypeError:  # float8 and other dtypes numpy cannot represent
        array = None
    if array is None or array.dtype not in _NAMES:
        raise WeightFormatError(f"{path} has tensor {name!r} with unsupported dtype {tensor.dtype}")
    return array


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorToWrite:
    """A tensor to export: its layout is known up front, and `load` makes its data only when it is written."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    load: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def write_safetensors_shards(
    tensors: Sequence[TensorToWrite],
    out_dir: str | Path,
    max_shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
    progress: bool = False,
    load_threads: int = 1,
) -> list[Path]:
    """Write `tensors` as safetensors shards, holding one tensor in memory at a time; returns the files written.

    One shard is ``model.safetensors``; several are ``model-0000i-of-0000n.safetensors`` plus
    ``model.safetensors.index.json``, as transformers names them. Each file appears under its final name only
    once complete, and weight files left in `out_dir` by an earlier export are removed so none can shadow these.
    With `load_threads` > 1, that many threads run the next tensors' `load` (which must then be thread-safe)
    while one is written, so up to `load_threads` + 1 tensors are in memory.
    """
    out_dir = Path(out_dir)
    metadata = {"format": "pt"} if metadata is None else dict(metadata)  # transformers refuses files without it
    _check_request(tensors, out_dir, metadata)
    shards = _plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        paths = [out_dir / SAFE_WEIGHTS]
    else:
        paths = [out_dir / f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    out_dir.mkdir(parents=True, exist_ok=True)
    # An index from an earlier export would vouch for a mix of old and new shards if this one is interrupted.
    (out_dir / SAFE_INDEX).unlink(missing_ok=True)
    total = sum(t.nbytes for t in tensors)
    with (tqdm(total=total, unit="B", unit_scale=True, desc=f"Writing {out_dir}", disable=not progress) as bar,
          ThreadPoolExecutor(load_threads) as pool):
        try:
            arrays = _loads_ahead(pool, [(t, path) for path, shard in zip(paths, shards) for t in shard], load_threads)
            for path, shard in zip(paths, shards):
                _write_shard(path, shard, metadata, bar, arrays)
        finally:
            pool.shutdown(cancel_futures=True)  # a failed write leaves no loads queued behind it
    if len(shards) > 1:
        weight_map = {t.name: path.name for path, shard in zip(paths, shards) for t in shard}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"  # as transformers writes it
        _write_atomically(out_dir / SAFE_INDEX, lambda f: f.write(text.encode()))
        paths.append(out_dir / SAFE_INDEX)
    _remove_stale_weights(out_dir, keep={path.name for path in paths})
    return paths


def _check_request(tensors: Sequence[TensorToWrite], out_dir: Path, metadata: dict[str, str]) -> None:
    if not tensors:
        raise WeightFormatError(f"No tensors given to write to {out_dir}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise WeightFormatError(f"Safetensors metadata for {out_dir} must map str to str, got {metadata!r}")
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen or t.name == "__metadata__":
            raise WeightFormatError(f"Tensor name {t.name!r} is repeated or reserved in the export to {out_dir}")
        seen.add(t.name)
        if np.dtype(t.dtype) not in _NAMES:
            raise WeightFormatError(
                f"Tensor {t.name!r} for {out_dir} has dtype {np.dtype(t.dtype)}, which safetensors cannot store"
            )


def _plan_shards(tensors: Sequence[TensorToWrite], max_shard_bytes: int) -> list[list[TensorToWrite]]:
    """Greedy in order, like transformers: a tensor over the limit gets a shard of its own."""
    shards: list[list[TensorToWrite]] = []
    size = 0
    for t in tensors:
        if not shards or size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(shard: list[TensorToWrite], metadata: dict[str, str]) -> bytes:
    """The JSON header, computable from shapes alone, padded with spaces to 8 bytes as the reference writer does."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in shard:
        header[t.name] = {
            "dtype": safetensors_dtype_name(t.dtype),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)


def _loads_ahead(pool: ThreadPoolExecutor, jobs: list[tuple[TensorToWrite, Path]], ahead: int) -> Iterator[np.ndarray]:
    """Each tensor's checked `load()` in order, with the next `ahead` loads running on `pool` meanwhile."""
    pending: collections.deque[Future[np.ndarray]] = collections.deque()
    for t, path in jobs:
        pending.append(pool.submit(_load_checked, t, path))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def _write_shard(path: Path, shard: list[TensorToWrite], metadata: dict[str, str], bar: tqdm,
                 arrays: Iterator[np.ndarray]) -> None:
    def write(f: BinaryIO) -> None:
        header = _header_bytes(shard, metadata)
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for t in shard:
            # A flat uint8 view (bfloat16 arrays cannot be handed to write() directly), dropped before the next
            # array is taken so that only the ones loading ahead are alive beside it.
            f.write(np.ascontiguousarray(next(arrays)).reshape(-1).view(np.uint8))
            bar.update(t.nbytes)

    _write_atomically(path, write)


def _load_checked(t: TensorToWrite, path: Path) -> np.ndarray:
    array = t.load()
    if not isinstance(array, np.ndarray) or array.shape != tuple(t.shape) or array.dtype != np.dtype(t.dtype):
        got = f"{array.dtype} {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        raise WeightFormatError(
            f"Tensor {t.name!r} for {path} loaded as {got}, but {np.dtype(t.dtype)} {tuple(t.shape)} was declared"
        )
    return array


def _write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write under a temporary name and rename, so an interrupted write never leaves a complete-looking file."""
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            write(f)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _remove_stale_weights(out_dir: Path, keep: set[str]) -> None:
    for path in out_dir.iterdir():
        stale = path.name in (SAFE_WEIGHTS, SAFE_INDEX) or _SHARD_NAME.fullmatch(path.name)
        if stale and path.name not in keep:
            path.unlink()
