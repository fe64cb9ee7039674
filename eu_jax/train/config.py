"""The training run's configuration: one ml_collections ConfigDict, type-checked, validated at start-up.

Config files under configs/ start from `get_default_config()` and change fields; the command line
overrides them with `--config.section.key=value`. ConfigDict refuses unknown keys and wrong
types on assignment; `validate` checks the values (names, ranges, paths) before any work starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ml_collections import ConfigDict

from eu_jax.files import file_in_the_way

SCHEDULES = ("cosine", "linear", "constant")


def data_source() -> ConfigDict:
    """One dataset: a local file/folder/glob or a hub name, its split, format and field names."""
    return ConfigDict(
        {
            "path": "",
            "split": "train",
            "format": "auto",  # auto | pairs (prompt/response) | messages (chat) | text
            "prompt_field": "prompt",
            "response_field": "response",
            "messages_field": "messages",
            "text_field": "text",
            "max_examples": 0,  # 0: all
            "subset": "",
            "revision": "",  # pin hub data so cached tokenizations stay valid
            "overflow": "truncate",  # or "drop": examples longer than data.max_length
            "pack": False,  # pack short examples into rows (attention stays inside each)
        }
    )


def get_default_config() -> ConfigDict:
    from eu_jax.models.config import RuntimeOptions  # lazily, like validate's: jax loads only when a config is built

    config = ConfigDict()
    config.model = ConfigDict(
        {
            "checkpoint": "",  # eu_jax params checkpoint (see `eu-convert import`)
            "reference_checkpoint": "",  # frozen reference model; default: the same weights
        }
    )
    config.runtime = ConfigDict(dataclasses.asdict(RuntimeOptions()))  # every field, at its default
    # Mesh axes within a slice (ICI) and across slices (DCN); -1 takes the remaining devices.
    config.mesh = ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1})
    config.distributed = ConfigDict(
        {"coordinator_address": "", "num_processes": 0, "process_id": -1, "local_device_ids": ""}
    )
    config.objective = ConfigDict(
        {
            "retain": "nll",
            "retain_kwargs": ConfigDict(),
            "forget": "ga",  # nll retain + ga forget = GradDiff
            "forget_kwargs": ConfigDict(),
            "a": 1.0,
            "g": 1.0,
            "chunk_tokens": 1024,  # tokens per chunk of full-vocabulary logits in the loss (at least 1)
        }
    )
    config.optimizer = ConfigDict(
        {
            "learning_rate": 1e-5,
            "schedule": "cosine",
            "warmup_steps": 0,
            "end_lr_ratio": 0.1,  # in [0, 1]: the learning rate the cosine/linear decay ends at, times the peak
            "weight_decay": 0.01,  # as TOFU, NPO and SimNPO
            "b1": 0.9,  # b1, b2 in [0, 1)
            "b2": 0.999,
            "eps": 1e-8,
            "grad_clip_norm": 1.0,  # the global gradient norm to clip to: positive (0 would zero every update)
        }
    )
    config.data = ConfigDict(
        {
            "retain": data_source(),
            "forget": data_source(),
            "eval_retain": data_source(),  # held-out sets for the built-in NLL evaluation (train.eval_every)
            "eval_forget": data_source(),
            "chat_template": "",  # "": the tokenizer's own; "none"; Jinja text; or a template file
            "cache": True,  # tokenized sets cached on disk, keyed by data, tokenizer, template, length policy
            "cache_dir": "",  # default: $EU_JAX_CACHE/tokenized
            "preferred_response": "I don't know.",  # the answer DPO-style terms prefer
            "max_length": 256,
            "batch_size": 8,  # global, per half (retain and forget)
            "microbatches": 1,  # gradient accumulation steps inside one train step
            "seed": 0,
            # Data shards: record i goes to shard i % shards and each global batch takes batch_size / shards
            # rows from every shard; a process tokenizes and feeds only the shards of its batch rows. The data
            # order depends on (seed, step, shards), never on the process count. 0: one shard per process;
            # otherwise a multiple of the process count that divides batch_size. Set it to resume a run on
            # another number of processes with the same data order.
            "shards": 0,
        }
    )
    config.train = ConfigDict(
        {
            "steps": 100,
            "seed": 0,
            "output_dir": "",
            "log_every": 10,
            "eval_every": 0,
            "save_every": 0,  # 0: only at the end (and on SIGTERM)
            "keep_checkpoints": 3,
            "async_checkpointing": True,
            "best_metric": "",  # an eval metric to keep the best checkpoint on
            "best_mode": "min",
            "early_stopping_patience": 0,  # evals without improvement before stopping; 0: never
            "peak_flops_per_device": 0.0,  # for MFU; 0: the device kind's peak from a table (CPUs: none, no MFU)
            "tensorboard": True,
        }
    )
    return config


class ConfigError(ValueError):
    """A configuration value that cannot work, named by its key."""


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"config.{key}: {message}")


def validate(config: ConfigDict) -> None:
    """Check values that types alone cannot: names, ranges, files. Fails on the first bad key."""
    from eu_jax.models import fused_attention
    from eu_jax.models.config import RuntimeOptions

    _validate_keys(config)
    _require(bool(config.model.checkpoint), "model.checkpoint", "is required (an eu_jax checkpoint from eu-convert import)")
    for key in ("model.checkpoint", "model.reference_checkpoint"):
        value = config[key.split(".")[0]][key.split(".")[1]]
        _require(not value or Path(value).exists(), key, f"'{value}' does not exist")
    try:
        RuntimeOptions(**config.runtime)
    except ValueError as err:  # its messages start with the field's name
        raise ConfigError(f"config.runtime.{err}") from None
    _validate_objective(config)
    _validate_optimizer(config)
    _validate_data(config)
    _require(config.data.batch_size >= 1, "data.batch_size", f"must be at least 1, not {config.data.batch_size}")
    for key in ("data.seed", "train.seed"):  # numpy's and JAX's generators take non-negative seeds
        section, name = key.split(".")
        _require(config[section][name] >= 0, key, f"must be 0 or more, not {config[section][name]}")
    _require(config.data.max_length >= 2, "data.max_length", "must be at least 2")
    _validate_against_model(config)
    kernel = config.runtime.attention
    _require(
        kernel == "xla" or fused_attention.uses_kernel(kernel, config.data.max_length),
        "data.max_length",
        f"runtime.attention='{kernel}' takes rows of a multiple of {fused_attention.LENGTH_MULTIPLES.get(kernel)} "
        f"tokens, not {config.data.max_length}; change the length, or use attention 'xla'",
    )
    _require(config.data.microbatches >= 1, "data.microbatches", "must be at least 1")
    _require(config.data.batch_size % config.data.microbatches == 0, "data.batch_size", "must be divisible by data.microbatches")
    _require(config.data.shards >= 0, "data.shards", "must be 0 (one shard per process) or a positive number of shards")
    if config.data.shards:  # the batch split now; the split over processes once they are known
        data_shards(config, 1)
    _validate_mesh(config)
    _validate_train(config)


# Mappings whose keys are not fields of the defaults: a term's own arguments (the term checks them), and the
# sections the workflow commands add to the training config they build on (demo/compare's, the TOFU benchmark's).
_FREE_FORM_KEYS = ("objective.retain_kwargs", "objective.forget_kwargs", "workflow", "tofu")


def _validate_keys(config: ConfigDict) -> None:
    """A key a config file set that the defaults lack: it would be saved with the run and read by nothing, so a
    typo would go unnoticed (the command line's unknown keys are refused by ConfigDict itself)."""
    for key, known in _extra_keys(config, get_default_config()):
        close = difflib.get_close_matches(key.rpartition(".")[2], known, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys here: {', '.join(known)}"
        raise ConfigError(f"config.{key}: unknown key{hint}")


def _extra_keys(config: ConfigDict, defaults: ConfigDict, prefix: str = "") -> Iterator[tuple[str, list[str]]]:
    """(dotted key, the keys its section knows) for each key of `config` that `defaults` lacks, at any depth."""
    for key, value in config.items():
        path = prefix + key
        if path in _FREE_FORM_KEYS:
            continue
        if key not in defaults:
            yield path, list(defaults.keys())
        elif isinstance(value, ConfigDict) and isinstance(defaults[key], ConfigDict):
            yield from _extra_keys(value, defaults[key], f"{path}.")


def _validate_objective(config: ConfigDict) -> None:
    """Term names and arguments, finite weights: a nan or inf only shows as a non-finite loss at step 1."""
    from eu_jax.objectives.registry import available_terms, get_term

    objective = config.objective
    for kind in ("retain", "forget"):
        name = objective[kind]
        _require(name in available_terms(kind), f"objective.{kind}", f"'{name}' is not one of {available_terms(kind)}")
        try:
            arguments = get_term(kind, name).resolve_kwargs(dict(objective[f"{kind}_kwargs"]))
        except ValueError as err:
            raise ConfigError(f"config.objective.{kind}_kwargs: {err}") from None
        for argument, value in arguments.items():
            finite = not isinstance(value, float) or math.isfinite(value)
            _require(finite, f"objective.{kind}_kwargs.{argument}", f"must be finite, not {value}")
    for key in ("a", "g"):
        _require(math.isfinite(objective[key]), f"objective.{key}", f"must be a finite weight, not {objective[key]}")
    _require(objective.chunk_tokens >= 1, "objective.chunk_tokens", f"must be at least 1, not {objective.chunk_tokens}")


def _validate_optimizer(config: ConfigDict) -> None:
    """AdamW's settings within their ranges: outside them a run still trains to the end, on nan, zero or
    reversed updates (a negative clip norm or end ratio flips the update's sign)."""
    opt = config.optimizer
    _require(opt.schedule in SCHEDULES, "optimizer.schedule", f"must be one of {SCHEDULES}")
    _require(0 < opt.learning_rate < math.inf, "optimizer.learning_rate", f"must be positive and finite, not {opt.learning_rate}")
    _require(0 <= opt.warmup_steps <= config.train.steps, "optimizer.warmup_steps", "must be within [0, train.steps]")
    _require(
        0 <= opt.end_lr_ratio <= 1,
        "optimizer.end_lr_ratio",
        f"must be within [0, 1] (the final learning rate as a fraction of the peak), not {opt.end_lr_ratio}",
    )
    for key in ("b1", "b2"):
        _require(0 <= opt[key] < 1, f"optimizer.{key}", f"must be within [0, 1) (a moving average's decay), not {opt[key]}")
    _require(0 < opt.eps < math.inf, "optimizer.eps", f"must be positive and finite, not {opt.eps}")
    _require(0 <= opt.weight_decay < math.inf, "optimizer.weight_decay", f"must be 0 (off) or positive and finite, not {opt.weight_decay}")
    # optax clips to this norm: 0 would zero every update, a negative norm would reverse it.
    _require(opt.grad_clip_norm > 0, "optimizer.grad_clip_norm", f"must be positive, not {opt.grad_clip_norm}")


def _validate_against_model(config: ConfigDict) -> None:
    """Settings the model bounds (the row length, a term's hidden layer), read from the checkpoint's metadata
    (no arrays): past the model's positions a run would fail on memory or attend to untrained positions."""
    from eu_jax.convert.checkpoint import CheckpointError, load_model_meta
    from eu_jax.objectives.registry import get_term

    terms = {kind: get_term(kind, config.objective[kind]) for kind in ("retain", "forget")}
    try:
        model = load_model_meta(Path(config.model.checkpoint)).config
    except CheckpointError as err:
        _require(all(term.layer_arg is None for term in terms.values()), "model.checkpoint", str(err))
        return  # nothing else needs the metadata here: loading the checkpoint names what it lacks
    _require(
        config.data.max_length <= model.max_position_embeddings,
        "data.max_length",
        f"{config.data.max_length} tokens exceed the model's max_position_embeddings ({model.max_position_embeddings})",
    )
    for kind, term in terms.items():
        try:
            term.check_layers(dict(config.objective[f"{kind}_kwargs"]), model.num_layers)
        except ValueError as err:  # its message starts with the argument's name
            raise ConfigError(f"config.objective.{kind}_kwargs.{err}") from None


def _validate_train(config: ConfigDict) -> None:
    """The loop's counters and keep-best settings: a 0 divisor or a setting nothing reads fails here, not mid-run."""
    train = config.train
    _require(train.steps >= 1, "train.steps", "must be at least 1")
    _require(bool(train.output_dir), "train.output_dir", "is required")
    blocking = file_in_the_way(Path(train.output_dir))
    _require(blocking is None, "train.output_dir", f"'{blocking}' is not a folder")
    _require(train.log_every >= 1, "train.log_every", "must be at least 1 (log every this many steps)")
    for key in ("eval_every", "save_every"):
        _require(train[key] >= 0, f"train.{key}", "must be 0 (off) or a positive number of steps")
    # orbax keeps the newest N checkpoints: 0 would delete every one, the final one too.
    _require(train.keep_checkpoints >= 1, "train.keep_checkpoints", "must be at least 1 (the final checkpoint is one of them)")
    _require(train.best_mode in ("min", "max"), "train.best_mode", "must be 'min' or 'max'")
    _require(
        train.early_stopping_patience >= 0,
        "train.early_stopping_patience",
        "must be 0 (never stop early) or a positive number of evaluations",
    )
    _require(
        bool(not train.early_stopping_patience or train.best_metric),
        "train.early_stopping_patience",
        "needs train.best_metric, the evaluation metric whose lack of improvement stops the run",
    )
    for key in ("best_metric", "early_stopping_patience"):
        _require(
            bool(not train[key] or train.eval_every),
            f"train.{key}",
            "needs train.eval_every > 0: it acts on evaluations, and without them it would be ignored",
        )


def _validate_mesh(config: ConfigDict) -> None:
    """Mesh sizes: positive, or -1 (the remaining devices) on at most one axis per level; DCN sizes positive."""
    from eu_jax.parallel.mesh import MESH_AXES

    for axis in MESH_AXES:
        size = config.mesh[axis]
        _require(size >= 1 or size == -1, f"mesh.{axis}", f"must be a positive size or -1 (the remaining devices), not {size}")
        size = config.mesh[f"dcn_{axis}"]
        _require(size >= 1, f"mesh.dcn_{axis}", f"must be a positive number of slices, not {size}")
    fills = [f"mesh.{axis}" for axis in MESH_AXES if config.mesh[axis] == -1]
    _require(len(fills) <= 1, fills[-1] if fills else "mesh", f"only one of {', '.join(fills)} may be -1 (the remaining devices)")


def data_shards(config: ConfigDict, process_count: int) -> int:
    """The number of data shards for a run of `process_count` processes (data.shards, 0: one per process)."""
    shards = config.data.shards or process_count
    _require(
        shards % process_count == 0,
        "data.shards",
        f"{shards} shards cannot be shared evenly by {process_count} processes (use a multiple of {process_count}, or 0 for one per process)",
    )
    _require(
        config.data.batch_size % shards == 0,
        "data.shards",
        f"{shards} shards do not divide data.batch_size={config.data.batch_size} (each shard fills an equal block of every batch)",
    )
    return shards


# Terms that sum log-probs per row: a packed row would merge several examples into one "sequence".
_SEQUENCE_LEVEL_TERMS = ("npo", "simnpo", "dpo", "idk_dpo")


def _validate_data(config: ConfigDict) -> None:
    from eu_jax.data import DataError, DataSpec, LengthPolicy, resolve

    for name in ("retain", "forget", "eval_retain", "eval_forget"):
        section = config.data[name]
        if not section.path:
            _require(name.startswith("eval_"), f"data.{name}.path", "is required")
            continue
        try:
            resolve(DataSpec.from_mapping(section))
            LengthPolicy(config.data.max_length, section.overflow, section.pack)
        except (DataError, ValueError) as err:
            raise ConfigError(f"config.data.{name}: {err}") from None
        _require(not (name.startswith("eval_") and section.pack), f"data.{name}.pack", "evaluation sets are not packed")
    _require(
        not (config.data.forget.pack and config.objective.forget in _SEQUENCE_LEVEL_TERMS),
        "data.forget.pack",
        f"the sequence-level term '{config.objective.forget}' needs one example per row",
    )


def config_to_json(config: ConfigDict) -> dict[str, Any]:
    return json.loads(config.to_json_best_effort())
