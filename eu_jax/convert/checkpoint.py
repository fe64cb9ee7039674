"""eu_jax model checkpoints: orbax params plus what it takes to rebuild and export the model.

Layout of a params checkpoint directory:
    params/                 orbax PyTree of the params pure dict
    eu_jax_model.json       ModelConfig, the original Hugging Face config, the params dtype
    hf_files/               tokenizer files, chat template, generation_config.json (copied on export)

A training run keeps the same two side files at the root of its checkpoint directory (`checkpoints/` in
its output folder) and one orbax step folder per save, whose `state` item holds {"params": ..., "opt_state":
..., ...}; `load_params` accepts either (a run by its output folder, its checkpoints folder or one step
folder), so export works on both.

An array may be stored narrower than the params dtype: an import keeps bf16 or fp16 weights as they came
(widening them is exact, so storing fp32 would only double the bytes written and read), and `load_params`
widens them to the params dtype as it restores.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from eu_jax.files import require_new_folder
from eu_jax.models.config import ModelConfig
from eu_jax.models.state import Params, abstract_params
from eu_jax.tree_paths import get_path, set_path

MODEL_META_FILE = "eu_jax_model.json"
PARAMS_ITEM = "params"
TRAIN_STATE_ITEM = "state"
HF_FILES_DIR = "hf_files"
RUN_CHECKPOINTS_DIR = "checkpoints"  # a training run's step folders, inside its output folder
FORMAT_VERSION = 1
# Params a ParamReader restores ahead of the one asked for (see ParamReader).
READ_AHEAD = 1


class CheckpointError(ValueError):
    """A path that is not a usable eu_jax checkpoint."""


@dataclass(frozen=True)
class ModelMeta:
    config: ModelConfig
    hf_config: dict[str, Any]
    param_dtype: str = "float32"

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "model_config": self.config.to_dict(),
            "hf_config": self.hf_config,
            "param_dtype": self.param_dtype,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelMeta":
        return cls(ModelConfig.from_dict(data["model_config"]), data["hf_config"], data["param_dtype"])


def write_model_meta(directory: Path, meta: ModelMeta) -> None:
    (Path(directory) / MODEL_META_FILE).write_text(json.dumps(meta.to_json(), indent=2, sort_keys=True))


def read_model_meta(directory: Path) -> ModelMeta:
    path = Path(directory) / MODEL_META_FILE
    try:
        return ModelMeta.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise CheckpointError(f"{directory} is not an eu_jax checkpoint: {MODEL_META_FILE} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path} is damaged: {err}") from None


def ensure_new_output(out: Path) -> None:
    """Refuse to write into a non-empty directory (or over a file), so nothing already saved is overwritten."""
    require_new_folder(out, "output directory")


def save_params_checkpoint(out: Path, params: Params, meta: ModelMeta, hf_files: Path | None = None) -> Path:
    """Write params (sharded jax arrays are saved in place by every process), meta and HF files."""
    out = Path(out).absolute()
    ensure_new_output(out)
    out.mkdir(parents=True, exist_ok=True)
    # Weights barely compress, and zstd tripled the save time of a 1B model (bench/convert.py).
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)) as checkpointer:
        checkpointer.save(out / PARAMS_ITEM, params)
    if jax.process_index() == 0:
        write_model_meta(out, meta)
        if hf_files is not None:
            shutil.copytree(hf_files, out / HF_FILES_DIR)
    return out


def latest_step_dir(run_dir: Path) -> Path | None:
    """The newest step folder of a run's checkpoints folder (orbax's unfinished temporaries are not steps)."""
    steps = [p for p in run_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps, key=lambda p: int(p.name)) if steps else None


def locate_params(ckpt: Path) -> tuple[Path, bool, Path]:
    """(orbax directory, whether params sit inside a train state, directory holding the meta) of a params
    checkpoint, a training run (its output folder or its checkpoints folder: the latest step) or a step folder."""
    ckpt = Path(ckpt).absolute()
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist or is not a directory")
    if (ckpt / PARAMS_ITEM).is_dir():
        return ckpt / PARAMS_ITEM, False, ckpt
    if (ckpt / TRAIN_STATE_ITEM).is_dir():  # one step folder of a run
        return ckpt / TRAIN_STATE_ITEM, True, ckpt.parent
    step = latest_step_dir(ckpt)
    if step is not None and (step / TRAIN_STATE_ITEM).is_dir():
        return step / TRAIN_STATE_ITEM, True, ckpt
    if (ckpt / RUN_CHECKPOINTS_DIR).is_dir():  # a training run's output folder
        return locate_params(ckpt / RUN_CHECKPOINTS_DIR)
    raise CheckpointError(
        f"{ckpt} is not an eu_jax checkpoint: expected a params checkpoint (a '{PARAMS_ITEM}/' folder), a "
        f"training run's output folder (holding '{RUN_CHECKPOINTS_DIR}/'), its '{RUN_CHECKPOINTS_DIR}/' folder of "
        f"step folders, or one step folder (holding '{TRAIN_STATE_ITEM}/')"
    )


def params_source(ckpt: Path) -> str:
    """The folder a checkpoint's params are read from now (a training run's: its latest step's). Saved
    results record it, so a run trained further since (resumed, more steps) is evaluated again."""
    return str(locate_params(ckpt)[0])


def load_model_meta(ckpt: Path) -> ModelMeta:
    """The ModelMeta of a params or train-state checkpoint, without reading any array."""
    return read_model_meta(locate_params(ckpt)[2])


def _restore(orbax_dir: Path, in_train_state: bool, item: Any, restore_args: Any) -> Any:
    """Restore the subtree `item` of the params (partial restore reads nothing else)."""
    if in_train_state:
        item, restore_args = {PARAMS_ITEM: item}, {PARAMS_ITEM: restore_args}
    with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
            orbax_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
        )
    return restored[PARAMS_ITEM] if in_train_state else restored


def storage_dtype(source_dtypes: list[np.dtype], param_dtype: np.dtype) -> np.dtype:
    """The narrowest dtype that holds a parameter's source tensors exactly, if the params dtype can widen
    it exactly too (bf16 or fp16 weights under fp32 params), else the params dtype."""
    source = jnp.result_type(*source_dtypes)
    if jnp.issubdtype(source, jnp.floating) and jnp.promote_types(source, param_dtype) == param_dtype:
        return np.dtype(source)
    return np.dtype(param_dtype)


def _stored_dtypes(orbax_dir: Path, in_train_state: bool) -> Params:
    """The dtype each parameter is stored in (an import keeps bf16 sources as bf16), from the metadata alone."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        tree = checkpointer.metadata(orbax_dir).item_metadata.tree
    params = tree[PARAMS_ITEM] if in_train_state else tree
    return jax.tree.map(lambda leaf: np.dtype(leaf.dtype), params)


def load_params(
    ckpt: Path, shardings: Params | None = None, dtype: str | None = None, keep_stored_dtype: bool = False
) -> tuple[Params, ModelMeta]:
    """Restore params from a params checkpoint or a train-state checkpoint, as `dtype` (default: the
    checkpoint's params dtype, whatever narrower dtype an array is stored in).

    With `shardings` each array is restored straight into its sharding; without, as host numpy
    arrays. Only the params are read from a train state. `keep_stored_dtype`: an array stored in a
    narrower dtype that `dtype` widens exactly (`storage_dtype`) stays in it, e.g. a frozen reference
    model imported from bf16 weights: the same values, cast to the compute dtype where the model uses them
    (half the memory under bf16 compute; under fp32 compute XLA:CPU widens the stacked layers whole).
    """
    orbax_dir, in_train_state, meta_dir = locate_params(ckpt)
    meta = read_model_meta(meta_dir)
    target = abstract_params(meta.config)
    dtype = np.dtype(dtype or meta.param_dtype)
    if keep_stored_dtype:
        dtypes = jax.tree.map(lambda stored: storage_dtype([stored], dtype), _stored_dtypes(orbax_dir, in_train_state))
    else:
        dtypes = jax.tree.map(lambda _: dtype, target)
    if shardings is None:
        restore_args = jax.tree.map(lambda d: ocp.RestoreArgs(restore_type=np.ndarray, dtype=d), dtypes)
    else:
        restore_args = jax.tree.map(lambda d, s: ocp.ArrayRestoreArgs(sharding=s, dtype=d), dtypes, shardings)
    item = jax.tree.map(lambda x: np.zeros((), x.dtype), target)
    return _restore(orbax_dir, in_train_state, item, restore_args), meta


class ParamReader:
    """Reads one parameter at a time as a host array in the dtype it is stored in: what a streaming export needs.

    Given the `order` the params will be asked for, it restores the next `READ_AHEAD` of them on a thread
    while the one asked for is converted and written. Orbax reads an array on one thread, mostly in the
    kernel (faulting in its buffers), so that read and the conversion use different cores: exporting a 1B
    model to bf16 took 3.4-3.9 s against 4.5-5.4 s reading one param at a time on 2 cores (BENCHMARKS.md,
    conversion findings; reading two ahead gained nothing more there). Peak memory: the param in use, the
    one before it while threads still convert its last layers, and the one read ahead, i.e. a few stacked
    params, not the model. Thread-safe; close it (or use it as a context manager) to drop queued reads."""

    def __init__(self, ckpt: Path, order: Sequence[tuple[str, ...]] = ()):
        self.orbax_dir, self.in_train_state, _ = locate_params(ckpt)
        self._order = list(order)
        self._current: tuple[tuple[str, ...], np.ndarray] | None = None
        self._pending: dict[tuple[str, ...], Future] = {}
        self._pool = ThreadPoolExecutor(READ_AHEAD + 1, thread_name_prefix="param-read")
        self._lock = threading.Lock()

    def __enter__(self) -> "ParamReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        self._pending.clear()

    def __call__(self, path: tuple[str, ...]) -> np.ndarray:
        with self._lock:
            if self._current is None or self._current[0] != path:
                self._current = None  # release the previous array before reading the next
                for upcoming in self._upcoming(path):
                    if upcoming not in self._pending:
                        self._pending[upcoming] = self._pool.submit(self._restore_one, upcoming)
                self._current = (path, self._pending.pop(path).result())
            return self._current[1]

    def _upcoming(self, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        """`path` and the READ_AHEAD params after it in the order given."""
        if path not in self._order:
            return [path]
        start = self._order.index(path)
        return self._order[start : start + 1 + READ_AHEAD]

    def _restore_one(self, path: tuple[str, ...]) -> np.ndarray:
        item, restore_args = {}, {}
        set_path(item, path, np.zeros((), np.float32))
        set_path(restore_args, path, ocp.RestoreArgs(restore_type=np.ndarray))
        return get_path(_restore(self.orbax_dir, self.in_train_state, item, restore_args), path)
