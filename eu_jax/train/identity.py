"""What a training run trains, so that a run is resumed (or reused) only under the settings it was trained with.

A run folder is resumed by running the same command again; run again with another objective weight, learning
rate, starting model or data, it would otherwise continue the old run, or (a finished run in a workflow) be
reused as it is, and its results reported under the new settings. Every checkpoint therefore keeps the run's
identity: the settings that decide the trained weights, the folder its starting params are read from (a run
started from another run's checkpoints changes when that run is trained further), and the content of its
retain and forget data. Settings that only decide how fast, where or how long it runs (the mesh, runtime,
log-prob chunks, micro-batches, logging, evaluation, checkpoint policy, `train.steps`) may change on resume.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from ml_collections import ConfigDict

from eu_jax.convert.checkpoint import RUN_CHECKPOINTS_DIR, TRAIN_STATE_ITEM, latest_step_dir, params_source
from eu_jax.data import DataSpec, content_fingerprint
from eu_jax.data.cache import digest
from eu_jax.objectives.base import KINDS as HALVES  # the batch halves are named as the terms' kinds
from eu_jax.train.checkpointing import saved_identity
from eu_jax.train.config import config_to_json, data_shards

# data.* keys that do not change what is trained: the tokenized-set cache, gradient accumulation (the same
# batch, summed in parts), and the held-out sets of the built-in evaluation.
DATA_KEYS_FREE = ("cache", "cache_dir", "microbatches", "eval_retain", "eval_forget")
SHOWN_DIFFERENCES = 4


def params_identity(checkpoint: str | Path) -> str:
    """The folder a checkpoint's params are read from now (a run's latest step), and for a run's step the
    digest of the identity it was trained with, for a params checkpoint (an import, a UniErase edit) the time
    orbax committed it: a run trained again in its folder under other settings keeps its step folders' paths,
    and a model imported again keeps its folder, so this is what tells their params apart, and what results,
    self-generated texts and runs started from them record to be made again when it changes."""
    source = Path(params_source(checkpoint))
    if source.name == TRAIN_STATE_ITEM:
        saved = saved_identity(source.parent)
        return str(source) if saved is None else f"{source}#{digest(saved)}"
    with ocp.PyTreeCheckpointer() as checkpointer:
        committed = checkpointer.metadata(source).commit_timestamp_nsecs
    return str(source) if committed is None else f"{source}@{committed}"


def _data_identity(config: ConfigDict) -> dict[str, Any]:
    """The data settings, local files identified by content (wherever they lie) and hub data by name and
    `datasets` fingerprint; the number of data shards as resolved (0 is one per process), since it decides
    the batches: a run resumed on another number of processes would otherwise change its data order."""
    data = {k: v for k, v in config_to_json(config.data).items() if k not in DATA_KEYS_FREE}
    data["shards"] = data_shards(config, jax.process_count())
    for half in HALVES:
        content = content_fingerprint(DataSpec.from_mapping(config.data[half]))
        section = dict(data[half])
        if "hub" not in content:
            section.pop("path")
        data[half] = section | {"content": content}
    return data


def run_identity(config: ConfigDict) -> dict[str, Any]:
    """The identity of the run `config` describes (a JSON-able dict, the same on every process)."""
    objective = {k: v for k, v in config_to_json(config.objective).items() if k != "chunk_tokens"}
    reference = config.model.reference_checkpoint
    return {
        "params": params_identity(config.model.checkpoint),
        "reference_params": params_identity(reference) if reference else "",
        "objective": objective,
        "optimizer": config_to_json(config.optimizer),
        "data": _data_identity(config),
        "seed": config.train.seed,
    }


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _recorded_alike(key: str, saved: Any, current: Any) -> bool:
    """Whether a saved identity's value stands for the current one, including records written before two
    values became exact (so that an upgrade neither retrains nor refuses runs that match): a params checkpoint's
    bare folder, before its commit time was added, and `data.shards` 0, before the count was resolved."""
    if saved == current:
        return True
    if key in ("params", "reference_params") and isinstance(saved, str) and isinstance(current, str):
        return bool(saved) and not {"@", "#"} & set(saved) and current.startswith(saved + "@")
    return key == "data.shards" and saved == 0


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'key: saved -> current' for each setting that differs (content fingerprints named, not shown)."""
    old, new = _flatten(saved), _flatten(current)
    out = []
    for key in sorted(set(old) | set(new)):
        if not _recorded_alike(key, old.get(key), new.get(key)):
            shown = key.rsplit(".content", 1)[0] + "'s content changed" if ".content" in key else (
                f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            )
            if shown not in out:
                out.append(shown)
    return out


def describe_differences(differences: list[str]) -> str:
    """The first few differences in one clause."""
    shown = "; ".join(differences[:SHOWN_DIFFERENCES])
    more = len(differences) - SHOWN_DIFFERENCES
    return shown + (f" and {more} more" if more > 0 else "")


def saved_run_differences(output_dir: str | Path, identity: dict[str, Any]) -> tuple[int, str] | None:
    """(step, the differences) when the newest checkpoint under `output_dir` was trained with another identity;
    None when there is no checkpoint, it matches, or it was written before identities were kept."""
    checkpoints = Path(output_dir) / RUN_CHECKPOINTS_DIR
    step_dir = latest_step_dir(checkpoints) if checkpoints.is_dir() else None
    saved = None if step_dir is None else saved_identity(step_dir)
    if saved is None:
        return None
    differences = identity_differences(saved, identity)
    return (int(step_dir.name), describe_differences(differences)) if differences else None
