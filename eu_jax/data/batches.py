"""Deterministic batches: the rows of step s are a pure function of (seed, s, number of data shards).

So a resumed run sees exactly the batches an uninterrupted one would, with no iterator state to
save. Each process materialises only the rows its devices hold and assembles the global array.

Data shards split the tokenizing and the feeding across processes: record i of a set belongs to shard
i % S, and global batch s is the concatenation over shards 0..S-1 of batch_size / S rows drawn from each
shard by its own permutation stream. A process loads only the shards that fill rows its devices
hold, so the batches depend on S but not on how many processes share the work.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

def batch_indices(num_examples: int, batch_size: int, step: int, seed: int, stream: Sequence[int] = ()) -> np.ndarray:
    """Example indices of global batch `step`: epochs of fresh permutations, read in order.
    `stream` tells apart independent orders under one seed (the data shards)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(epochs):
        permutation = np.random.default_rng([seed, int(epoch), *stream]).permutation(num_examples)
        chosen = epochs == epoch
        out[chosen] = permutation[offsets[chosen]]
    return out


def process_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """The global rows this process's devices hold, sorted. One block in general, but several when the batch
    axes span processes inside (a DCN mesh axis inside an ICI one: process 0 may hold rows 0, 1, 4, 5)."""
    held = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        held.update(range(*index[0].indices(global_shape[0])))
    return np.array(sorted(held), np.int64)


def format_spans(values: Sequence[int]) -> str:
    """Sorted integers as start:stop runs, e.g. "0:2, 4:6" (rows or shards, for messages)."""
    breaks = [i for i in range(1, len(values)) if values[i] != values[i - 1] + 1]
    runs = zip([0, *breaks], [*breaks, len(values)]) if len(values) else []
    return ", ".join(f"{values[first]}:{values[last - 1] + 1}" for first, last in runs)


def _assemble(local: Mapping[str, np.ndarray], batch_size: int, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays from this process's rows in process_rows order, which is the order
    make_array_from_process_local_data maps the process's row slices to its local data."""
    return {
        name: jax.make_array_from_process_local_data(sharding, rows, (batch_size,) + rows.shape[1:])
        for name, rows in local.items()
    }


def global_batch(arrays: Mapping[str, np.ndarray], indices: np.ndarray, sharding: NamedSharding) -> dict[str, jax.Array]:
    """Global arrays [batch, ...] of a whole set every process holds, built from this process's rows only."""
    rows = indices[process_rows(sharding, (len(indices),))]
    return _assemble({name: array[rows] for name, array in arrays.items()}, len(indices), sharding)


# ---- data shards ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardLayout:
    """`count` shards of a set and of every global batch of `batch_size` rows: record i is in shard i % count,
    and shard s fills the batch rows block(s)."""

    count: int
    batch_size: int

    def __post_init__(self):
        if self.count < 1 or self.batch_size % self.count:
            raise ValueError(f"a global batch of {self.batch_size} rows cannot be split into {self.count} equal shard blocks")

    @property
    def rows_per_shard(self) -> int:
        return self.batch_size // self.count

    def block(self, shard: int) -> slice:
        """The global batch rows that `shard` fills."""
        return slice(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)

    def shards_for(self, rows: np.ndarray) -> list[int]:
        """The shards whose blocks hold any of the global batch rows `rows` (those a process must load)."""
        return sorted({int(row) // self.rows_per_shard for row in rows})

    def offsets(self, shard: int, rows: np.ndarray) -> np.ndarray:
        """Positions within the block of `shard` of those of the global batch rows `rows` that it fills."""
        block = self.block(shard)
        return rows[(rows >= block.start) & (rows < block.stop)] - block.start

    def indices(self, shard: int, shard_rows: int, step: int, seed: int) -> np.ndarray:
        """Rows of `shard` (which has `shard_rows` rows) that fill its block of batch `step`. One shard keeps
        the unsharded order exactly."""
        stream = () if self.count == 1 else (shard,)
        return batch_indices(shard_rows, self.rows_per_shard, step, seed, stream)


def row_tokens(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """Real tokens per row, counting every attention mask (a preferred-response twin too)."""
    masks = [array for name, array in arrays.items() if name.endswith("attention_mask")]
    return sum(np.asarray(mask, np.int32).sum(axis=1, dtype=np.int32) for mask in masks)


@dataclass(frozen=True)
class ShardedSet:
    """This process's shards of one set (arrays by shard), and the tokens per row of every shard, so that
    each process knows a global batch's token count without talking to the others each step."""

    layout: ShardLayout
    local: Mapping[int, Mapping[str, np.ndarray]]
    tokens_per_row: Sequence[np.ndarray]  # one array per shard, all shards

    def __post_init__(self):
        if len(self.tokens_per_row) != self.layout.count:
            raise ValueError(f"tokens_per_row has {len(self.tokens_per_row)} shards, the layout {self.layout.count}")

    @classmethod
    def from_processes(cls, layout: ShardLayout, local: Mapping[int, Mapping[str, np.ndarray]]) -> ShardedSet:
        """This process's shards, completed with every shard's tokens per row from the processes that loaded
        them. A collective: every process calls it, once, at start-up."""
        mine = sorted(local)
        tokens = [row_tokens(local[s]) for s in mine]
        owners = allgather_json([[s, len(t)] for s, t in zip(mine, tokens)])
        flat = allgather_ragged(np.concatenate(tokens) if tokens else np.zeros(0, np.int32))
        table: dict[int, np.ndarray] = {}
        for shards, values in zip(owners, flat):
            ends = np.cumsum([n for _, n in shards], dtype=np.int64)
            for (s, _), part in zip(shards, np.split(values, ends[:-1])):
                table.setdefault(s, part)
        missing = sorted(set(range(layout.count)) - set(table))
        if missing:
            raise ValueError(f"no process loaded data shards {missing} of {layout.count}")
        return cls(layout, dict(local), [table[s] for s in range(layout.count)])

    def batch(self, step: int, seed: int, sharding: NamedSharding) -> tuple[dict[str, jax.Array], int]:
        """Global batch `step` (this process feeding its rows from its shards) and its real token count."""
        layout = self.layout
        picks = [layout.indices(s, len(tokens), step, seed) for s, tokens in enumerate(self.tokens_per_row)]
        tokens = int(sum(tokens[pick].sum() for tokens, pick in zip(self.tokens_per_row, picks)))
        rows = process_rows(sharding, (layout.batch_size,))
        pieces = []
        for shard in layout.shards_for(rows):
            if shard not in self.local:
                raise ValueError(f"this process feeds batch rows {format_spans(rows)} but did not load data shard {shard}")
            chosen = picks[shard][layout.offsets(shard, rows)]
            pieces.append({name: array[chosen] for name, array in self.local[shard].items()})
        local = {name: np.concatenate([piece[name] for piece in pieces]) for name in pieces[0]}
        return _assemble(local, layout.batch_size, sharding), tokens


# ---- exchanging small things between processes at start-up ------------------------------------------


def allgather_ragged(values: np.ndarray) -> list[np.ndarray]:
    """Every process's 1-D array (lengths may differ), in process order; int32 or uint8 values."""
    lengths = multihost_utils.process_allgather(np.array([len(values)], np.int32))[:, 0]
    padded = np.zeros(max(int(lengths.max()), 1), values.dtype)
    padded[: len(values)] = values
    gathered = multihost_utils.process_allgather(padded)
    return [gathered[p, :n] for p, n in enumerate(lengths)]


def allgather_json(value: Any) -> list[Any]:
    """Every process's JSON-able value, in process order."""
    raw = np.frombuffer(json.dumps(value).encode("utf-8"), np.uint8)
    return [json.loads(part.tobytes().decode("utf-8")) for part in allgather_ragged(raw)]
