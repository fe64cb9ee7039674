"""Records to fixed-length training rows: length policy, optional packing, a report, and the cached loader.

`load_set(spec, tokenizer, policy)` is the entry point: it resolves the data, returns the cached rows when
nothing that decides them has changed, and otherwise loads, validates, encodes, applies the length policy,
packs if asked, and caches. Rows are in a fixed order; shuffling is `batches.batch_indices` (a pure function
of seed and step), which works on packed rows unchanged.

Multi-host: a set splits into data shards (record i in shard i % shards, see `batches.ShardLayout`); each
process reads the records but tokenizes, packs and caches only the shards it feeds, so that work divides
across processes. `DataReport.total` sums the shards' reports. A cache folder on a shared file system is
safe to use from all processes at once (each shard is its own entry).
"""

from __future__ import annotations

import bisect
import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from eu_jax.data.cache import CACHE_VERSION, TokenCache, digest, tokenizer_fingerprint
from eu_jax.data.chat import Encoded, Encoder
from eu_jax.data.sources import DataError, DataSpec, Record, load_records, resolve, with_response

OVERFLOW = ("truncate", "drop")
_FIELDS = ("input_ids", "attention_mask", "loss_mask", "segment_ids")


@dataclass(frozen=True)
class TokenizedSet:
    input_ids: np.ndarray  # [N, max_length] int32, right-padded
    attention_mask: np.ndarray  # [N, max_length] int32
    loss_mask: np.ndarray  # [N, max_length] int32: 1 on tokens to score
    truncated: int  # examples cut to max_length
    segment_ids: np.ndarray | None = None  # [N, max_length] int32 for packed rows: 1, 2, ... per example, 0 padding
    dropped: int = 0  # examples left out for being longer than max_length

    def __len__(self) -> int:
        return len(self.input_ids)

    def arrays(self, prefix: str = "") -> dict[str, np.ndarray]:
        """The batch fields, named as the train step reads them (optionally prefixed, e.g. "preferred_")."""
        out = {
            prefix + "input_ids": self.input_ids,
            prefix + "attention_mask": self.attention_mask,
            prefix + "loss_mask": self.loss_mask,
        }
        if self.segment_ids is not None:
            out[prefix + "segment_ids"] = self.segment_ids
        return out


@dataclass(frozen=True)
class LengthPolicy:
    """max_length: tokens per row. overflow: "truncate" longer examples (cut at the end, counted) or "drop"
    them (counted). pack: put several whole examples in one row (greedy best-fit, longest first), each
    with its own segment id, so attention and positions stay inside each example."""

    max_length: int
    overflow: str = "truncate"
    pack: bool = False

    def __post_init__(self):
        if self.max_length < 2:
            raise DataError(f"max_length must be at least 2, not {self.max_length}")
        if self.overflow not in OVERFLOW:
            raise DataError(f"overflow '{self.overflow}' is not one of {OVERFLOW}")


@dataclass(frozen=True)
class DataReport:
    """What became of a set: counts to log once at start-up."""

    source: str
    format: str
    examples: int  # records read
    kept: int  # examples in the rows
    rows: int
    max_length: int
    truncated: int
    dropped: int
    unscored: int  # kept examples with no token left to score (their response lies beyond max_length)
    tokens: int  # real tokens in the rows
    loss_tokens: int  # tokens scored
    longest: int  # longest example before the policy, in tokens
    packed: bool
    fill: float  # tokens / (rows * max_length): packing efficiency (or padding waste, unpacked)
    cache_key: str = ""
    cache_hit: bool = False  # in a total over shards: every shard was a hit
    shards: int = 1  # data shards summed in this report

    def summary(self, name: str = "") -> str:
        head = f"{name}: " if name else ""
        layout = "packed " if self.packed else ""
        split = f" in {self.shards} shards" if self.shards > 1 else ""
        cache = f" [cache {'hit' if self.cache_hit else 'miss'} {self.cache_key[:12]}]" if self.cache_key else ""
        return (
            f"{head}{self.examples:,} {self.format} examples from {self.source}{split} -> {self.rows:,} {layout}rows of "
            f"{self.max_length} tokens, {100 * self.fill:.1f}% filled; {self.truncated:,} truncated, "
            f"{self.dropped:,} dropped, {self.unscored:,} with nothing to score; longest {self.longest:,} tokens; "
            f"{self.tokens:,} tokens, {self.loss_tokens:,} scored{cache}"
        )

    @classmethod
    def total(cls, shards: Sequence[DataReport]) -> DataReport:
        """One report for a whole set from its shards' reports (in shard order). Its cache key digests the
        shards' keys; it is a hit when every shard was."""
        if len(shards) == 1:
            return shards[0]
        counts = ("examples", "kept", "rows", "truncated", "dropped", "unscored", "tokens", "loss_tokens", "shards")
        sums = {name: sum(getattr(r, name) for r in shards) for name in counts}
        keys = [r.cache_key for r in shards]
        return dataclasses.replace(
            shards[0],
            **sums,
            longest=max(r.longest for r in shards),
            fill=sums["tokens"] / (sums["rows"] * shards[0].max_length),
            cache_key=digest(keys) if all(keys) else "",
            cache_hit=all(r.cache_hit for r in shards),
        )


@dataclass(frozen=True)
class LoadedSet:
    """A set's rows, its preferred-response twin (row for row, for DPO-style terms) if asked, and its report."""

    data: TokenizedSet
    report: DataReport
    preferred: TokenizedSet | None = None

    def __len__(self) -> int:
        return len(self.data)

    def arrays(self) -> dict[str, np.ndarray]:
        out = self.data.arrays()
        if self.preferred is not None:
            out.update(self.preferred.arrays("preferred_"))
        return out


# ---- encoding and rows ---------------------------------------------------------------------------


def tokenize_records(
    tokenizer: Any,
    records: Sequence[Record],
    policy: LengthPolicy,
    preferred: Sequence[Record] | None = None,
    source: str = "",
) -> LoadedSet:
    """Encode records, apply the length policy, lay out rows (packed or one example per row).

    With `preferred` (the same records answered differently, see `sources.with_response`), both sets keep
    the same examples in the same rows: an example is dropped when either version overflows. Packing is
    refused then, as rows must pair example for example.
    """
    if not records:
        raise DataError(f"{source or 'the data'}: has no examples")
    if preferred is not None and policy.pack:
        raise DataError("packing cannot be used with a preferred-response twin set (its rows must pair example for example)")
    encoder = Encoder(tokenizer)
    encoded = _encode(encoder, records)
    twins = None if preferred is None else _encode(encoder, preferred)
    limit = policy.max_length
    longest = max(len(e) for e in encoded)
    over = [len(e) > limit or (twins is not None and len(twins[i]) > limit) for i, e in enumerate(encoded)]
    if policy.overflow == "drop":
        keep = [i for i, o in enumerate(over) if not o]
        if not keep:
            raise DataError(
                f"{source or 'the data'}: all {len(records)} examples are longer than max_length={limit} "
                f"(longest {longest} tokens); raise max_length or use overflow='truncate'"
            )
        truncated = twin_truncated = 0
    else:
        keep = list(range(len(encoded)))
        truncated = sum(len(e) > limit for e in encoded)
        twin_truncated = 0 if twins is None else sum(len(e) > limit for e in twins)
    dropped = len(encoded) - len(keep)
    chosen = [_cut(encoded[i], limit) for i in keep]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if policy.pack:
        data = _rows(chosen, pack_examples([len(e) for e in chosen], limit), limit, pad_id, truncated, dropped, segments=True)
    else:
        data = _rows(chosen, [[i] for i in range(len(chosen))], limit, pad_id, truncated, dropped, segments=False)
    twin = None
    if twins is not None:
        twin = _rows([_cut(twins[i], limit) for i in keep], [[i] for i in range(len(keep))], limit, pad_id, twin_truncated, dropped, segments=False)
    scored = int(_scored(data).sum())
    if scored == 0:
        raise DataError(
            f"{source or 'the data'}: no token is left to score: every response lies beyond max_length={limit} "
            f"(longest example {longest} tokens)"
        )
    tokens = int(data.attention_mask.sum())
    report = DataReport(
        source=source,
        format=records[0].format,
        examples=len(records),
        kept=len(keep),
        rows=len(data),
        max_length=limit,
        truncated=truncated,
        dropped=dropped,
        unscored=sum(int(e.loss.sum() == 0) for e in chosen),
        tokens=tokens,
        loss_tokens=scored,
        longest=longest,
        packed=policy.pack,
        fill=tokens / (len(data) * limit),
    )
    return LoadedSet(data, report, twin)


def _encode(encoder: Encoder, records: Sequence[Record]) -> list[Encoded]:
    encoded = encoder.encode_many(records)
    for record, e in zip(records, encoded):
        if len(e) == 0:
            raise DataError(f"{record.where}: encodes to no tokens")
    return encoded


def _cut(encoded: Encoded, limit: int) -> Encoded:
    return encoded if len(encoded) <= limit else Encoded(encoded.ids[:limit], encoded.loss[:limit])


def _scored(data: TokenizedSet) -> np.ndarray:
    """Tokens the train step scores: loss-masked targets, never the first token of a row or a segment."""
    mask = data.loss_mask[:, 1:] * data.attention_mask[:, 1:]
    if data.segment_ids is not None:
        mask = mask * (data.segment_ids[:, 1:] == data.segment_ids[:, :-1])
    return mask


def pack_examples(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Rows of example indices, each row's lengths summing to at most max_length.

    Best-fit decreasing: examples longest first (ties by index), each into the fullest row it still fits,
    else a new row. Deterministic; O(n log n) plus list inserts.
    """
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row) of rows with room
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        size = lengths[i]
        if not 0 < size <= max_length:
            raise ValueError(f"example {i} has length {size}, outside 1..{max_length}")
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            row, room = len(rows), max_length - size
            rows.append([i])
        else:
            room, row = free.pop(at)
            room -= size
            rows[row].append(i)
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def _rows(examples: list[Encoded], layout: list[list[int]], limit: int, pad_id: int, truncated: int, dropped: int,
          segments: bool) -> TokenizedSet:
    n = len(layout)
    ids = np.full((n, limit), pad_id, np.int32)
    attention = np.zeros((n, limit), np.int32)
    loss = np.zeros((n, limit), np.int32)
    segment = np.zeros((n, limit), np.int32) if segments else None
    for r, members in enumerate(layout):
        at = 0
        for s, i in enumerate(members, start=1):
            e = examples[i]
            ids[r, at : at + len(e)] = e.ids
            attention[r, at : at + len(e)] = 1
            loss[r, at : at + len(e)] = e.loss
            if segment is not None:
                segment[r, at : at + len(e)] = s
            at += len(e)
    return TokenizedSet(ids, attention, loss, truncated, segment, dropped)


# ---- the cached loader ----------------------------------------------------------------------------


def load_set(
    spec: DataSpec,
    tokenizer: Any,
    policy: LengthPolicy,
    preferred_response: str | None = None,
    cache: TokenCache | bool = True,
    shard: int = 0,
    shards: int = 1,
) -> LoadedSet:
    """The rows of data shard `shard` of `shards` (records i with i % shards == shard; all by default) of the set
    `spec` names, from the cache when data, spec, tokenizer (and its chat template), policy, preferred
    response and shard are all unchanged. cache: a TokenCache, True (the default folder), or False."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of the {shards} data shards")
    if cache is True:
        cache = TokenCache()
    source = resolve(spec)
    label = source.label if shards == 1 else f"{source.label} (shard {shard} of {shards})"
    key = ""
    if cache:
        spec_part = dataclasses.asdict(spec)
        if source.kind != "hub":  # local data is identified by content, wherever it lives
            spec_part.pop("path")
        key = digest(
            {
                "version": CACHE_VERSION,
                "data": source.fingerprint(spec),
                "spec": spec_part,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "policy": dataclasses.asdict(policy),
                "preferred_response": preferred_response,
                "shard": [shard, shards],
            }
        )
        hit = cache.load(key)
        if hit is not None:
            return _from_cache(*hit, key=key, source=source.label)
    records = load_records(spec, source)
    if len(records) < shards:
        raise DataError(f"{source.label}: {len(records)} examples cannot fill {shards} data shards (one would be empty); use fewer data.shards")
    records = records[shard::shards]
    preferred = None if preferred_response is None else with_response(records, preferred_response)
    loaded = tokenize_records(tokenizer, records, policy, preferred, source=label)
    loaded = dataclasses.replace(loaded, report=dataclasses.replace(loaded.report, source=source.label))
    if not cache:
        return loaded
    report = dataclasses.replace(loaded.report, cache_key=key)
    arrays = loaded.arrays()
    counts = {"truncated": loaded.data.truncated, "dropped": loaded.data.dropped}
    if loaded.preferred is not None:
        counts["preferred_truncated"] = loaded.preferred.truncated
    cache.store(key, arrays, {"report": dataclasses.asdict(report), "counts": counts})
    return dataclasses.replace(loaded, report=report)


def _from_cache(arrays: dict[str, np.ndarray], meta: dict[str, Any], key: str, source: str) -> LoadedSet:
    counts = meta["counts"]

    def tokenized(prefix: str, truncated: int) -> TokenizedSet:
        get = lambda name: arrays.get(prefix + name)  # noqa: E731
        return TokenizedSet(get("input_ids"), get("attention_mask"), get("loss_mask"), truncated, get("segment_ids"), counts["dropped"])

    preferred = tokenized("preferred_", counts["preferred_truncated"]) if "preferred_input_ids" in arrays else None
    report = DataReport(**{**meta["report"], "source": source, "cache_key": key, "cache_hit": True})
    return LoadedSet(tokenized("", counts["truncated"]), report, preferred)
