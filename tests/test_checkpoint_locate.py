"""Where a checkpoint's params are read from: a training run is named by its output folder, its checkpoints
folder or a step folder, and all three give the latest (or that) step and the same params identity."""

from __future__ import annotations

import orbax.checkpoint as ocp
import pytest

from eu_jax.convert.checkpoint import CheckpointError, MODEL_META_FILE, TRAIN_STATE_ITEM, locate_params
from eu_jax.train.checkpointing import IDENTITY_ITEM
from eu_jax.train.identity import params_identity


@pytest.fixture()
def run_dir(tmp_path):
    """A training run's output folder as eu-train leaves it (the step folders' orbax items reduced to folders,
    and step 3's identity saved)."""
    run = tmp_path / "run"
    checkpoints = run / "checkpoints"
    for step in (1, 3):
        (checkpoints / str(step) / TRAIN_STATE_ITEM).mkdir(parents=True)
    (checkpoints / MODEL_META_FILE).write_text("{}")
    (run / "best").mkdir()
    (run / "metrics.jsonl").write_text("")
    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save((checkpoints / "3" / IDENTITY_ITEM).absolute(), {"seed": 0})
    return run


def test_a_run_output_folder_reads_its_latest_step(run_dir):
    checkpoints = run_dir / "checkpoints"
    latest = (checkpoints / "3" / TRAIN_STATE_ITEM, True, checkpoints)
    assert locate_params(run_dir) == locate_params(checkpoints) == latest
    assert locate_params(checkpoints / "1") == (checkpoints / "1" / TRAIN_STATE_ITEM, True, checkpoints)
    identity = params_identity(run_dir)
    assert identity == params_identity(checkpoints) == params_identity(checkpoints / "3")
    assert identity.startswith(f"{checkpoints / '3' / TRAIN_STATE_ITEM}#")


def test_a_folder_that_is_no_checkpoint_is_told_what_is_accepted(tmp_path):
    with pytest.raises(CheckpointError) as refused:
        locate_params(tmp_path)
    for accepted in ("params checkpoint (a 'params/' folder)", "training run's output folder (holding 'checkpoints/')",
                     "'checkpoints/' folder of step folders", "step folder (holding 'state/')"):
        assert accepted in str(refused.value)
