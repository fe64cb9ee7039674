"""Run checkpoints with orbax: async saves, keep-N, best-on-a-metric, fallback past damaged steps.

Layout under the run's output directory:
    checkpoints/<step>/state/    the full TrainState ({"params", "opt_state", "step", "rng"})
    checkpoints/<step>/config/   the resolved run config (JSON)
    checkpoints/<step>/identity/ what the run trains (`identity.run_identity`), checked before a resume
    checkpoints/<step>/progress/ the keep-best and early-stopping state at that step, restored with it
    checkpoints/eu_jax_model.json, checkpoints/hf_files/   what `eu-convert export` needs
    best/<step>/state/           params only, of the best evaluation so far (only with train.best_metric)
Both folders export directly: `eu-convert export OUTPUT/checkpoints hf_out`.
"""

from __future__ import annotations

import logging
import secrets
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from eu_jax.convert.checkpoint import HF_FILES_DIR, RUN_CHECKPOINTS_DIR, ModelMeta, write_model_meta
from eu_jax.data.batches import allgather_json
from eu_jax.train.config import ConfigError
from eu_jax.train.state import TrainState

log = logging.getLogger(__name__)

STATE_ITEM, CONFIG_ITEM, IDENTITY_ITEM, PROGRESS_ITEM = "state", "config", "identity", "progress"
JSON_ITEMS = (CONFIG_ITEM, IDENTITY_ITEM, PROGRESS_ITEM)


def require_shared_folder(folder: Path, setting: str) -> None:
    """Every process of a multi-process run writes its own shards of each checkpoint under `folder`, and
    process 0 finalises the checkpoint there: were `folder` each host's own disk (a relative path, a local
    one), every checkpoint would be split over the hosts, restorable nowhere, and nothing would say so until
    a restore. So process 0 leaves a fresh token in the folder and every process must read it back."""
    if jax.process_count() == 1:
        return
    marker = Path(folder) / ".eu_jax_shared_folder_check"
    token = None
    if jax.process_index() == 0:
        marker.parent.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(16)
        marker.write_text(token)
    token = allgather_json(token)[0]  # every process waits here until process 0 has written it
    try:
        seen = marker.read_text() == token
    except OSError:
        seen = False
    seen_by = allgather_json(seen)  # and here until every process has looked
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    blind = [process for process, ok in enumerate(seen_by) if not ok]
    if blind:
        raise ConfigError(
            f"{setting}: '{folder}' is not one folder for all {len(seen_by)} processes (process "
            f"{', '.join(map(str, blind))} cannot read what process 0 wrote there), so every checkpoint would be split "
            "over the hosts' own disks; give a folder every host mounts at the same path (NFS, Cloud Storage FUSE)"
        )


def _write_side_files(directory: Path, meta: ModelMeta, hf_files: Path | None) -> None:
    if jax.process_index() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    write_model_meta(directory, meta)
    if hf_files is not None and hf_files.is_dir() and not (directory / HF_FILES_DIR).exists():
        shutil.copytree(hf_files, directory / HF_FILES_DIR)


def read_json_item(step_dir: Path, item: str) -> dict[str, Any] | None:
    """One JSON item of a step's checkpoint (None where the checkpoint was written before the item was kept)."""
    folder = Path(step_dir) / item
    if not folder.is_dir():
        return None
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(folder.absolute())


def saved_identity(step_dir: Path) -> dict[str, Any] | None:
    """The run identity kept with one step's checkpoint."""
    return read_json_item(step_dir, IDENTITY_ITEM)


class RunCheckpoints:
    """The checkpoints of one training run."""

    def __init__(
        self, output_dir: Path, meta: ModelMeta, hf_files: Path | None, keep: int, use_async: bool, keep_best: bool
    ):
        """`keep_best` (train.best_metric set) makes best/: without it the folder would hold no params, and
        `eu-convert export` would refuse it as no checkpoint."""
        self.directory = Path(output_dir).absolute() / RUN_CHECKPOINTS_DIR
        self.unrestorable: set[int] = set()  # steps restore_latest skipped as damaged
        self.best_directory = Path(output_dir).absolute() / "best"
        self.manager = self._manager(self.directory, meta, hf_files, (STATE_ITEM, *JSON_ITEMS), keep, use_async)
        self.best: ocp.CheckpointManager | None = (
            self._manager(self.best_directory, meta, hf_files, (STATE_ITEM,), 1, use_async) if keep_best else None
        )

    @staticmethod
    def _manager(
        directory: Path, meta: ModelMeta, hf_files: Path | None, items: tuple[str, ...], keep: int, use_async: bool
    ) -> ocp.CheckpointManager:
        """The orbax manager of one exportable folder, its side files written first."""
        _write_side_files(directory, meta, hf_files)
        return ocp.CheckpointManager(
            directory,
            item_names=items,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True),
        )

    def save(self, step: int, state: TrainState, json_items: dict[str, dict[str, Any]]) -> None:
        """The state and the JSON_ITEMS of `step`. A step already saved is kept, unless it failed to restore
        at the start of this run: the step trained again takes its place."""
        if step in self.manager.all_steps():
            if step not in self.unrestorable:
                return
            self.manager.delete(step)
            self.unrestorable.discard(step)
        items = {STATE_ITEM: ocp.args.StandardSave(state.to_dict())}
        items.update({name: ocp.args.JsonSave(json_items[name]) for name in JSON_ITEMS})
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def save_best(self, step: int, state: TrainState) -> None:
        """A step already there is kept: a run killed after saving it and resumed from an earlier checkpoint
        reaches the same step with the same params again."""
        if step in self.best.all_steps():
            return
        self.best.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave({"params": state.params})}), force=True)

    def progress(self, step: int) -> dict[str, Any] | None:
        """The PROGRESS_ITEM saved with `step`."""
        return read_json_item(self.directory / str(step), PROGRESS_ITEM)

    def restore_latest(self, abstract_state: TrainState, shardings: TrainState) -> TrainState | None:
        """The newest checkpoint that restores cleanly; a damaged one is skipped with a warning."""
        target = jax.tree.map(
            lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
            abstract_state.to_dict(),
            shardings.to_dict(),
        )
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
                )
            except Exception as err:  # orbax raises many types for damaged files
                log.warning("checkpoint step %d in %s cannot be restored (%s); trying the one before", step, self.directory, err)
                self.unrestorable.add(step)
                continue
            return TrainState.from_dict(restored[STATE_ITEM])
        return None

    def saving(self) -> bool:
        return self.manager.is_saving_in_progress()

    def reached_preemption(self, step: int) -> bool:
        return self.manager.reached_preemption(step)

    def close(self) -> None:
        for manager in filter(None, (self.manager, self.best)):
            manager.wait_until_finished()
            manager.close()
