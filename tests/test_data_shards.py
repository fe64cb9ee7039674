"""Data shards: which records a shard tokenizes, how global batches are composed from the shards (checked
against a NumPy construction), the unchanged one-shard order, report totals, and the config key."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eu_jax.data import chat
from eu_jax.data.batches import ShardedSet, ShardLayout, batch_indices, format_spans, global_batch, process_rows
from eu_jax.data.cache import TokenCache
from eu_jax.data.pipeline import DataReport, LengthPolicy, load_set
from eu_jax.data.sources import DataError, DataSpec
from eu_jax.parallel.sharding import to_host
from eu_jax.train.config import ConfigError, data_shards, get_default_config, validate
from tests.test_data_chat import llama3_tokenizer


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """Character tokenizer, no template: a pair encodes as BOS prompt response EOS."""
    return llama3_tokenizer(tmp_path_factory.mktemp("plain"), template=None)


@pytest.fixture(scope="module")
def sharding():
    return NamedSharding(Mesh(np.array(jax.devices()[:8]), ("data",)), PartitionSpec("data"))


def write_pairs(path, count: int, long_every: int = 0):
    """`count` distinct pairs (row i: prompt of letter i, response of its lower case); with `long_every`,
    every such row gets a 30-character prompt."""
    rows = []
    for i in range(count):
        size = 30 if long_every and i % long_every == 0 else 1 + i % 4
        rows.append({"prompt": chr(65 + i % 26) * size + str(i), "response": chr(97 + i % 26) * (1 + i % 3)})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path, rows


def texts(loaded, tokenizer) -> list[str]:
    return [tokenizer.decode(row[mask > 0], skip_special_tokens=True) for row, mask in zip(loaded.data.input_ids, loaded.data.attention_mask)]


def test_a_shard_tokenizes_only_its_records_round_robin(plain, tmp_path, monkeypatch):
    path, rows = write_pairs(tmp_path / "d.jsonl", 10)
    encoded = []
    original = chat.Encoder.encode_many
    monkeypatch.setattr(chat.Encoder, "encode_many", lambda self, records, **kw: encoded.extend(records) or original(self, records, **kw))
    spec, policy = DataSpec(str(path)), LengthPolicy(16)
    seen = []
    for shard in range(3):
        encoded.clear()
        loaded = load_set(spec, plain, policy, cache=False, shard=shard, shards=3)
        expected = [r["prompt"] + r["response"] for i, r in enumerate(rows) if i % 3 == shard]
        assert texts(loaded, plain) == expected
        assert len(encoded) == len(expected)  # the other shards' records were never encoded
        assert (loaded.report.examples, loaded.report.source, loaded.report.shards) == (len(expected), str(path), 1)
        seen += expected
    assert sorted(seen) == sorted(r["prompt"] + r["response"] for r in rows)
    with pytest.raises(DataError, match=r"d\.jsonl: 10 examples cannot fill 11 data shards"):
        load_set(spec, plain, policy, cache=False, shard=0, shards=11)
    with pytest.raises(ValueError, match="shard 3 is not one of the 3 data shards"):
        load_set(spec, plain, policy, cache=False, shard=3, shards=3)


def test_shard_errors_name_the_shard(plain, tmp_path):
    path, _ = write_pairs(tmp_path / "d.jsonl", 8, long_every=2)  # rows 0, 2, 4, 6: all of shard 0 of 2
    policy = LengthPolicy(16, overflow="drop")
    assert len(load_set(DataSpec(str(path)), plain, policy, cache=False, shard=1, shards=2)) == 4
    with pytest.raises(DataError, match=r"d\.jsonl \(shard 0 of 2\): all 4 examples are longer than max_length=16"):
        load_set(DataSpec(str(path)), plain, policy, cache=False, shard=0, shards=2)


def test_each_shard_is_its_own_cache_entry(plain, tmp_path):
    path, _ = write_pairs(tmp_path / "d.jsonl", 10)
    cache, spec, policy = TokenCache(tmp_path / "cache"), DataSpec(str(path)), LengthPolicy(16)
    first = [load_set(spec, plain, policy, cache=cache, shard=s, shards=2) for s in range(2)]
    whole = load_set(spec, plain, policy, cache=cache)
    assert (cache.hits, cache.misses) == (0, 3)
    assert len({r.report.cache_key for r in first + [whole]}) == 3
    again = load_set(spec, plain, policy, cache=cache, shard=1, shards=2)
    assert again.report.cache_hit and again.report.cache_key == first[1].report.cache_key
    np.testing.assert_array_equal(again.data.input_ids, first[1].data.input_ids)


def test_report_totals_over_shards_equal_the_whole_set(plain, tmp_path):
    path, _ = write_pairs(tmp_path / "d.jsonl", 11, long_every=4)  # rows 0, 4, 8 too long: truncated
    spec, policy = DataSpec(str(path)), LengthPolicy(16)
    whole = load_set(spec, plain, policy, cache=False).report
    total = DataReport.total([load_set(spec, plain, policy, cache=False, shard=s, shards=3).report for s in range(3)])
    counts = ("examples", "kept", "rows", "truncated", "dropped", "unscored", "tokens", "loss_tokens", "longest")
    assert [getattr(total, c) for c in counts] == [getattr(whole, c) for c in counts]
    assert whole.truncated == 3 and total.shards == 3 and total.fill == pytest.approx(whole.fill)
    assert total.cache_key == "" and f"11 pairs examples from {path} in 3 shards -> 11 rows of 16 tokens" in total.summary("retain")


def shard_arrays(n: int, shards: int) -> dict[int, dict[str, np.ndarray]]:
    """Fake tokenized shards: record r's row is [r, r + 1000]; it attends to 1 + r % 2 tokens."""
    out = {}
    for s in range(shards):
        records = np.arange(s, n, shards)
        attention = (np.arange(2)[None, :] <= records[:, None] % 2).astype(np.int32)
        out[s] = {"input_ids": np.stack([records, records + 1000], 1).astype(np.int32), "attention_mask": attention}
    return out


def fed_batches(sharding: NamedSharding, records: int = 10, shards: int = 4, batch_size: int = 8, steps: int = 3) -> list:
    """input_ids of each step's global batch, from the data shards this process feeds (ShardedSet) and from
    the whole set (global_batch), as lists: the same for one process and for several, whatever the mesh."""
    layout = ShardLayout(shards, batch_size)
    fed = layout.shards_for(process_rows(sharding, (batch_size,)))
    data = ShardedSet.from_processes(layout, {s: arrays for s, arrays in shard_arrays(records, shards).items() if s in fed})
    whole = shard_arrays(records, 1)[0]
    return [
        [to_host(data.batch(step, 0, sharding)[0]["input_ids"]).tolist(),
         to_host(global_batch(whole, batch_indices(records, batch_size, step, 0), sharding)["input_ids"]).tolist()]
        for step in range(steps)
    ]  # fmt: skip


def epoch_stream(num: int, positions: int, seed: int, stream: tuple[int, ...]) -> np.ndarray:
    """Fresh permutations of range(num), one per epoch, laid end to end."""
    epochs = -(-positions // num)
    return np.concatenate([np.random.default_rng([seed, e, *stream]).permutation(num) for e in range(epochs)])[:positions]


def test_global_batches_are_the_shards_blocks_side_by_side(sharding):
    n, shards, batch_size, seed, steps = 23, 4, 8, 7, 9  # shards of 6, 6, 6, 5 records: epochs turn mid-run
    data = ShardedSet.from_processes(ShardLayout(shards, batch_size), shard_arrays(n, shards))
    per_shard = batch_size // shards
    orders = [np.arange(s, n, shards)[epoch_stream(len(range(s, n, shards)), steps * per_shard, seed, (s,))] for s in range(shards)]
    for step in range(steps):
        batch, tokens = data.batch(step, seed, sharding)
        records = np.concatenate([order[step * per_shard : (step + 1) * per_shard] for order in orders])
        np.testing.assert_array_equal(np.asarray(batch["input_ids"]), np.stack([records, records + 1000], 1))
        assert batch["input_ids"].sharding == sharding
        assert tokens == int((1 + records % 2).sum())
    for s, order in enumerate(orders):  # every record of a shard once per epoch, only in its shard's block
        size = len(range(s, n, shards))
        assert sorted(order[:size]) == list(range(s, n, shards)) and sorted(order[size : 2 * size]) == list(range(s, n, shards))


def test_one_shard_keeps_the_unsharded_order(sharding):
    n, seed = 21, 3
    data = ShardedSet.from_processes(ShardLayout(1, 8), shard_arrays(n, 1))
    order = epoch_stream(n, 6 * 8, seed, ())  # the order before data shards existed
    for step in range(6):
        np.testing.assert_array_equal(batch_indices(n, 8, step, seed), order[step * 8 : (step + 1) * 8])
        batch, _ = data.batch(step, seed, sharding)
        expected = global_batch(shard_arrays(n, 1)[0], batch_indices(n, 8, step, seed), sharding)
        np.testing.assert_array_equal(np.asarray(batch["input_ids"]), np.asarray(expected["input_ids"]))
        np.testing.assert_array_equal(np.asarray(batch["input_ids"])[:, 0], order[step * 8 : (step + 1) * 8])


def test_layout_blocks_and_the_shards_a_process_needs():
    layout = ShardLayout(4, 8)
    assert [layout.block(s) for s in range(4)] == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert layout.shards_for(np.arange(0, 4)) == [0, 1] and layout.shards_for(np.arange(4, 8)) == [2, 3]
    assert layout.shards_for(np.arange(3, 5)) == [1, 2] and layout.shards_for(np.arange(0, 8)) == [0, 1, 2, 3]
    interleaved = np.array([0, 1, 4, 5])  # a DCN axis inside an ICI one: the process's rows are not one block
    assert layout.shards_for(interleaved) == [0, 2] and format_spans(interleaved) == "0:2, 4:6"
    assert layout.offsets(2, interleaved).tolist() == [0, 1] and layout.offsets(1, np.array([3, 4])).tolist() == [1]
    with pytest.raises(ValueError, match="8 rows cannot be split into 3 equal shard blocks"):
        ShardLayout(3, 8)
    missing = shard_arrays(10, 4)
    del missing[3]
    with pytest.raises(ValueError, match=r"no process loaded data shards \[3\] of 4"):
        ShardedSet.from_processes(layout, missing)


def test_shards_config_key(tmp_path):
    config = get_default_config()
    assert config.data.shards == 0 and config.data.batch_size == 8
    assert data_shards(config, 1) == 1 and data_shards(config, 2) == 2
    config.data.shards = 4
    assert data_shards(config, 2) == 4
    with pytest.raises(ConfigError, match=r"config\.data\.shards: 4 shards cannot be shared evenly by 8 processes"):
        data_shards(config, 8)
    config.data.shards = 0
    with pytest.raises(ConfigError, match=r"config\.data\.shards: 3 shards do not divide data\.batch_size=8"):
        data_shards(config, 3)

    (tmp_path / "ckpt").mkdir()
    path, _ = write_pairs(tmp_path / "d.jsonl", 4)
    config.model.checkpoint, config.train.output_dir = str(tmp_path / "ckpt"), str(tmp_path / "out")
    config.data.retain.path = config.data.forget.path = str(path)
    validate(config)
    for shards, message in [(-1, "must be 0 .one shard per process. or a positive number"), (3, "3 shards do not divide")]:
        config.data.shards = shards
        with pytest.raises(ConfigError, match=rf"config\.data\.shards: {message}"):
            validate(config)
