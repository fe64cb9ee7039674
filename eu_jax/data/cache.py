"""On-disk cache of tokenized sets, keyed by everything that decides their content.

The key hashes the data's content (file SHA-256s, or hub name + revision + `datasets` fingerprint), the
DataSpec, the tokenizer (its full serialisation, special tokens, chat template, and the ids it gives a probe
text), the LengthPolicy, any preferred response, the data shard (index and count), and CACHE_VERSION (bumped
whenever the encoding code changes what it produces). A changed input gives a new key; stale entries are
never read, only left behind (delete the folder freely).

An entry is a folder of .npy arrays plus meta.json, written and fsynced under a temporary name and renamed
into place, so a reader never sees half an entry; processes that race to build the same entry write
identical data and the first rename wins. An entry that fails to load all the same (damaged on disk) is a
miss: it is rebuilt in place. Entries are read memory-mapped: processes on one host share the pages.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np

CACHE_VERSION = 1


def digest(value: Any) -> str:
    """SHA-256 of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


# Ordinary text around each special token: spaces either side, so that stripping settings show too.
PROBE_TEXT = " Hello, world! 42 + 7 = 49.\n\tünïcödé 漢字 "


def encoding_probe(tokenizer: Any) -> list[list[int]]:
    """The ids of every special and added token between ordinary text, encoded in a batch as the pipeline
    encodes (without, and with, the automatic special tokens): settings that live only on the Python object
    (split_special_tokens and the like) change these ids but nothing serialised."""
    specials = set(getattr(tokenizer, "all_special_tokens", []))
    specials.update(str(t.content) for t in getattr(tokenizer, "added_tokens_decoder", {}).values())
    texts = [PROBE_TEXT + token + PROBE_TEXT for token in sorted(specials)] or [PROBE_TEXT]
    return [list(ids) for automatic in (False, True) for ids in tokenizer(texts, add_special_tokens=automatic)["input_ids"]]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """What decides how a tokenizer encodes: its serialised model, special tokens, chat template, and the
    ids it gives a probe text (for settings nothing else shows)."""
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "chat_template": getattr(tokenizer, "chat_template", None),
        "special": {
            name: [getattr(tokenizer, f"{name}_token", None), getattr(tokenizer, f"{name}_token_id", None)]
            for name in ("bos", "eos", "pad", "unk")
        },
        "added": sorted(
            [int(i), str(t.content), bool(getattr(t, "special", False))]
            for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
        ),
        "flags": {k: getattr(tokenizer, k, None) for k in ("add_bos_token", "add_eos_token")},
        "probe": digest(encoding_probe(tokenizer)),
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        parts["backend"] = hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
    else:
        parts["vocab"] = digest(sorted(tokenizer.get_vocab().items()))
    return digest(parts)


class TokenCache:
    """Tokenized sets under `root` (default: eu_jax.assets.cache_dir() / "tokenized"); counts hits and misses."""

    def __init__(self, root: str | Path | None = None):
        if root is None:
            from eu_jax.assets import cache_dir

            root = cache_dir() / "tokenized"
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, key: str) -> Path:
        return self.root / key

    def load(self, key: str) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The entry's arrays (memory-mapped, read-only) and metadata, or None (a miss)."""
        entry = self.path(key)
        try:
            meta = json.loads((entry / "meta.json").read_text(encoding="utf-8"))
            arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in meta["arrays"]}
        except Exception:  # missing, empty or truncated files (EOFError, ValueError, OSError...): rebuild
            if entry.exists():
                shutil.rmtree(entry, ignore_errors=True)
            self.misses += 1
            return None
        self.hits += 1
        return arrays, meta

    def store(self, key: str, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> Path:
        """Write an entry atomically (temporary folder, then rename); returns its folder."""
        self.root.mkdir(parents=True, exist_ok=True)
        entry = self.path(key)
        temp = self.root / f".{key}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        temp.mkdir()
        try:
            for name, array in arrays.items():
                with _synced_file(temp / f"{name}.npy") as file:
                    np.save(file, np.ascontiguousarray(array))
            with _synced_file(temp / "meta.json") as file:
                file.write(json.dumps({**meta, "arrays": sorted(arrays)}, sort_keys=True).encode("utf-8"))
            _fsync(temp)  # the folder's names too, so that the renamed entry is whole after a crash
            try:
                os.rename(temp, entry)
            except OSError:
                if not (entry / "meta.json").is_file():  # not a lost race with an identical writer
                    raise
        finally:
            if temp.exists():
                shutil.rmtree(temp, ignore_errors=True)
        return entry


@contextmanager
def _synced_file(path: Path) -> Iterator[IO[bytes]]:
    """A file to write, fsynced once written: an entry renamed into place must not hold empty files after a crash."""
    with open(path, "wb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


def _fsync(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
