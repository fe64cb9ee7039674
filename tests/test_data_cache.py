"""The on-disk cache of tokenized sets: a second load is a hit, and any input that decides the rows misses."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import datasets
import jax
import numpy as np
import pytest
import transformers
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eu_jax.data import sources
from eu_jax.data.batches import batch_indices, global_batch
from eu_jax.data.cache import TokenCache, tokenizer_fingerprint
from eu_jax.data.pipeline import LengthPolicy, load_set
from eu_jax.data.sources import DataSpec
from tests.test_data_chat import LLAMA3_TEMPLATE, chatml_tokenizer

ROWS = [{"prompt": f"Q{i}: what is {i} + {i}?", "response": f"{2 * i}"} for i in range(12)]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return chatml_tokenizer(tmp_path_factory.mktemp("chatml"))


def write(path, rows=ROWS):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_second_load_is_a_hit_with_identical_rows(tmp_path, tokenizer):
    cache = TokenCache(tmp_path / "cache")
    spec = DataSpec(str(write(tmp_path / "d.jsonl")))
    policy = LengthPolicy(128, pack=True)
    first = load_set(spec, tokenizer, policy, cache=cache)
    assert (cache.hits, cache.misses) == (0, 1) and not first.report.cache_hit
    second = load_set(spec, tokenizer, policy, cache=cache)
    assert (cache.hits, cache.misses) == (1, 1) and second.report.cache_hit
    assert second.report == dataclasses.replace(first.report, cache_hit=True)
    assert first.arrays().keys() == second.arrays().keys() == {"input_ids", "attention_mask", "loss_mask", "segment_ids"}
    for name, array in first.arrays().items():
        np.testing.assert_array_equal(second.arrays()[name], array)
        assert second.arrays()[name].dtype == array.dtype == np.int32
    assert (second.data.truncated, second.data.dropped) == (first.data.truncated, first.data.dropped)
    assert not second.data.input_ids.flags.writeable  # memory-mapped, read-only
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))  # and batches build from the mapped arrays as usual
    indices = batch_indices(len(second), 8, step=2, seed=0)
    batch = global_batch(second.arrays(), indices, NamedSharding(mesh, PartitionSpec("data")))
    np.testing.assert_array_equal(np.asarray(batch["segment_ids"]), first.data.segment_ids[indices])
    # One complete entry, no temporary leftovers; the same content elsewhere is the same entry.
    assert [p.name for p in cache.root.iterdir()] == [first.report.cache_key]
    shutil.copy(spec.path, tmp_path / "copy.jsonl")
    copied = load_set(DataSpec(str(tmp_path / "copy.jsonl")), tokenizer, policy, cache=cache).report
    assert copied.cache_hit and copied.source == str(tmp_path / "copy.jsonl")


def test_every_input_that_decides_the_rows_invalidates(tmp_path, tokenizer):
    cache = TokenCache(tmp_path / "cache")
    path = write(tmp_path / "d.jsonl")
    base = dict(spec=DataSpec(str(path)), policy=LengthPolicy(128), preferred_response=None)

    def load(tok=tokenizer, **changes):
        args = {**base, **changes}
        return load_set(args["spec"], tok, args["policy"], preferred_response=args["preferred_response"], cache=cache)

    keys = {load().report.cache_key}
    assert load().report.cache_hit
    variants = [
        dict(policy=LengthPolicy(120)),
        dict(policy=LengthPolicy(128, overflow="drop")),
        dict(policy=LengthPolicy(128, pack=True)),
        dict(spec=DataSpec(str(path), max_examples=5)),
        dict(spec=DataSpec(str(path), format="pairs", prompt_field="response", response_field="prompt")),
        dict(preferred_response="I don't know."),
    ]
    for changes in variants:
        loaded = load(**changes)
        assert not loaded.report.cache_hit, changes
        keys.add(loaded.report.cache_key)
    other_template = chatml_tokenizer(tmp_path / "other", template=LLAMA3_TEMPLATE)
    assert tokenizer_fingerprint(other_template) != tokenizer_fingerprint(tokenizer)
    assert not load(tok=other_template).report.cache_hit
    write(path, ROWS[:-1] + [{"prompt": "changed", "response": "row"}])  # same file, new content
    changed = load()
    assert not changed.report.cache_hit and changed.report.cache_key not in keys
    assert len(keys) == 1 + len(variants)
    assert cache.hits == 1


def test_damaged_entry_is_rebuilt_and_cache_can_be_off(tmp_path, tokenizer):
    cache = TokenCache(tmp_path / "cache")
    spec = DataSpec(str(write(tmp_path / "d.jsonl")))
    first = load_set(spec, tokenizer, LengthPolicy(128), cache=cache)
    (cache.path(first.report.cache_key) / "loss_mask.npy").unlink()
    again = load_set(spec, tokenizer, LengthPolicy(128), cache=cache)
    assert not again.report.cache_hit and (cache.hits, cache.misses) == (0, 2)
    np.testing.assert_array_equal(again.data.loss_mask, first.data.loss_mask)
    assert load_set(spec, tokenizer, LengthPolicy(128), cache=cache).report.cache_hit
    # A writer that lost the race to an identical entry does not fail.
    cache.store(first.report.cache_key, first.arrays(), {"report": {}, "counts": {}})
    uncached = load_set(spec, tokenizer, LengthPolicy(128), cache=False)
    assert uncached.report.cache_key == "" and not uncached.report.cache_hit
    np.testing.assert_array_equal(uncached.data.input_ids, first.data.input_ids)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbled meta"])
def test_an_entry_that_fails_to_load_is_rebuilt_in_place(tmp_path, tokenizer, damage):
    """A crash right after an entry's rename can leave its files empty; every later run must not fail on them."""
    cache = TokenCache(tmp_path / "cache")
    spec = DataSpec(str(write(tmp_path / "d.jsonl")))
    first = load_set(spec, tokenizer, LengthPolicy(128), cache=cache)
    entry = cache.path(first.report.cache_key)
    if damage == "empty":
        (entry / "loss_mask.npy").write_bytes(b"")
    elif damage == "truncated":
        (entry / "loss_mask.npy").write_bytes((entry / "loss_mask.npy").read_bytes()[:200])
    else:
        (entry / "meta.json").write_text('{"arrays": 3}', encoding="utf-8")
    again = load_set(spec, tokenizer, LengthPolicy(128), cache=cache)
    assert not again.report.cache_hit and (cache.hits, cache.misses) == (0, 2)
    np.testing.assert_array_equal(again.data.loss_mask, first.data.loss_mask)
    assert load_set(spec, tokenizer, LengthPolicy(128), cache=cache).report.cache_hit  # the rebuilt entry
    assert [p.name for p in cache.root.iterdir()] == [first.report.cache_key]


def test_an_entry_is_on_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    """Unsynced files can be empty after a crash even though their folder's rename survived."""
    synced, unsynced_at_rename = set(), []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(descriptor):
        fsync(descriptor)
        synced.add(os.fstat(descriptor).st_ino)

    def checking_rename(source, target):
        paths = [source, *os.scandir(source)]
        unsynced_at_rename.append(sorted(os.fspath(p) for p in paths if os.stat(p).st_ino not in synced))
        rename(source, target)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", checking_rename)
    entry = TokenCache(tmp_path / "cache").store("key", {"input_ids": np.arange(6, dtype=np.int32)}, {"counts": {}})
    assert unsynced_at_rename == [[]] and sorted(p.name for p in entry.iterdir()) == ["input_ids.npy", "meta.json"]


def test_how_the_tokenizer_encodes_special_tokens_is_part_of_the_key(tmp_path, tokenizer):
    """split_special_tokens lives on the Python object only: nothing serialised shows it, the ids do."""
    tokenizer.save_pretrained(tmp_path / "saved")
    splitting = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved", split_special_tokens=True)
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer_fingerprint(reloaded) == tokenizer_fingerprint(tokenizer)
    assert tokenizer_fingerprint(splitting) != tokenizer_fingerprint(tokenizer)
    cache = TokenCache(tmp_path / "cache")
    spec = DataSpec(str(write(tmp_path / "d.jsonl")))
    load_set(spec, tokenizer, LengthPolicy(256), cache=cache)
    split = load_set(spec, splitting, LengthPolicy(256), cache=cache)
    assert not split.report.cache_hit
    np.testing.assert_array_equal(split.data.input_ids, load_set(spec, splitting, LengthPolicy(256), cache=False).data.input_ids)


def test_hub_sets_are_keyed_by_name_revision_and_fingerprint(tmp_path, tokenizer, monkeypatch):
    loads = []

    def fake_hub(spec):  # what datasets.load_dataset(name, split=..., revision=...) returns online
        loads.append(spec.revision)
        return datasets.Dataset.from_list(ROWS[:4] if spec.revision == "v1" else ROWS)

    monkeypatch.setattr(sources, "_load_hub", fake_hub)
    cache = TokenCache(tmp_path / "cache")
    v1 = load_set(DataSpec("org/qa", revision="v1"), tokenizer, LengthPolicy(128), cache=cache)
    assert len(v1) == 4 and v1.report.source == "org/qa"
    assert load_set(DataSpec("org/qa", revision="v1"), tokenizer, LengthPolicy(128), cache=cache).report.cache_hit
    v2 = load_set(DataSpec("org/qa", revision="v2"), tokenizer, LengthPolicy(128), cache=cache)
    assert not v2.report.cache_hit and len(v2) == 12
    assert loads == ["v1", "v1", "v2"]
