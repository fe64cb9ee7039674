"""The training engine end to end on a tiny model: sharding, resume, preemption, failures."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
import transformers

from eu_jax.convert.checkpoint import load_params, params_source, read_model_meta
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.models.config import RuntimeOptions
from eu_jax.objectives import Objective
from eu_jax.train import loop
from eu_jax.train.config import ConfigError
from eu_jax.train.loop import TrainingDiverged, train
from eu_jax.train.optimizer import learning_rate_schedule, make_optimizer
from eu_jax.train.state import new_train_state
from eu_jax.train.step import make_reference_forward, make_train_step, with_reference_outputs
from eu_jax.workflow import TrainingPreempted, train_once
from tests.tiny_run import make_tiny_run, tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("tiny"))


def final_params(output_dir):
    return load_params(output_dir / "checkpoints")[0]


def assert_trees_close(a, b, atol):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("method", [{"forget": "ga"}, {"forget": "npo", "retain": "kl_ref"}, {"forget": "rmu", "retain": "none"}])
def test_one_step_on_8_devices_equals_one_device(tiny, tmp_path, method):
    # RMU's retain term is alpha * MSE(policy, reference) between identical weights at step 1: its
    # gradient is rounding noise times alpha (1200 by default), which differs between layouts.
    objective = dict(method, forget_kwargs={"layer": 1, "alpha": 1.0} if method["forget"] == "rmu" else {})
    # Adam's first update is about lr * g / (|g| + eps): with the default eps=1e-8 it turns float noise in
    # near-zero gradients (KL to an identical reference) into +-lr steps. A larger eps keeps it well-conditioned.
    common = dict(train={"steps": 1}, objective=objective, optimizer={"learning_rate": 1e-3, "eps": 1e-4})
    sharded = train(tiny_config(tiny, tmp_path / "sharded", mesh={"data": 2, "fsdp": 2, "tensor": 2}, **common))
    single = train(
        tiny_config(tiny, tmp_path / "single", mesh={"data": 1, "fsdp": 1, "tensor": 1}, **common), devices=jax.devices()[:1]
    )
    assert sharded.last_metrics["loss"] == pytest.approx(single.last_metrics["loss"], abs=1e-5)
    assert_trees_close(final_params(tmp_path / "sharded"), final_params(tmp_path / "single"), atol=1e-5)
    before = load_params(tiny["ckpt"])[0]
    assert not np.allclose(final_params(tmp_path / "single")["embed"], before["embed"])  # the step did train


@pytest.mark.parametrize("objective", [{"forget": "ga"}, {"forget": "npo", "retain": "kl_ref"}])
def test_gradient_accumulation_matches_one_big_batch(tiny, tmp_path, objective):
    """Answers of 1 to 12 tokens, so micro-batches hold different numbers of scored tokens: each micro-batch's
    means divide by the whole half-batch's counts, so they add up to the big batch's loss and gradients (a
    mean of per-micro-batch means would not). NPO and KL-retain read the reference's outputs, which its own
    program computes one micro-batch at a time and puts back in row order."""
    ragged = dict(tiny)
    for half, make in (("retain", lambda i: {"prompt": f"{i:02d}=", "response": "7" * (1 + i % 12)}),
                       ("forget", lambda i: {"prompt": f"Who {i:02d}?", "response": "P" * (1 + (5 * i) % 12)})):
        ragged[half] = tmp_path / f"{half}.jsonl"
        ragged[half].write_text("".join(json.dumps(make(i)) + "\n" for i in range(48)))
    base = dict(train={"steps": 2}, objective=objective, optimizer={"learning_rate": 1e-3, "eps": 1e-4})
    whole = train(tiny_config(ragged, tmp_path / "whole", data={"batch_size": 16, "microbatches": 1}, **base))
    accumulated = train(tiny_config(ragged, tmp_path / "accumulated", data={"batch_size": 16, "microbatches": 2}, **base))
    for key, value in whole.last_metrics.items():
        if "/" in key or key in ("loss", "grad_norm"):
            assert accumulated.last_metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-5), key
    assert_trees_close(final_params(tmp_path / "accumulated"), final_params(tmp_path / "whole"), atol=1e-5)


def _tiny_step(tiny, tmp_path, objective: Objective):
    """The jitted step (state donated) and reference forward on the tiny model, as `eu-train` builds them, with
    its params, optimizer and a batch of 4 + 4 rows of 16 random tokens."""
    params, meta = load_params(tiny["ckpt"])
    config = tiny_config(tiny, tmp_path)
    optimizer = make_optimizer(config.optimizer, 10)
    options = RuntimeOptions()
    step = make_train_step(meta.config, options, objective, optimizer, learning_rate_schedule(config.optimizer, 10))
    ids = np.random.default_rng(0).integers(3, meta.config.vocab_size, (2, 4, 16)).astype(np.int32)
    ones = np.ones((4, 16), np.int32)
    batch = {half: {"input_ids": ids[i], "attention_mask": ones, "loss_mask": ones} for i, half in enumerate(("retain", "forget"))}
    state = new_train_state(optimizer, params, 0)
    return jax.jit(step, donate_argnums=0), state, batch, make_reference_forward(meta.config, options, objective)


def _copied_state_leaves(hlo: str, state_leaves: int) -> list[str]:
    """The copies of non-scalar arguments among the first `state_leaves` (the state's) in an optimised HLO's
    entry computation."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    state = {m.group(1) for m in re.finditer(r"%(\S+) = \S+ parameter\((\d+)\)", entry) if int(m.group(2)) < state_leaves}
    copies = re.finditer(r"%\S+ = (\w+\[[\d,]+\])\S* copy\(%(\S+)\)", entry)
    return [f"{m.group(2)} {m.group(1)}" for m in copies if m.group(2) in state]


def test_the_step_updates_the_donated_adamw_state_without_copying_it(tiny, tmp_path):
    """The compiled step copies no array of the state it is given: a per-leaf `where(finite, new, old)` made XLA
    copy both AdamW moments (the new params read the old moments, which the new moments overwrite in place)
    and hold the copies through the whole step, 1.08 GB on SmolLM2."""
    step, state, batch, _ = _tiny_step(tiny, tmp_path, Objective(retain="nll", forget="ga"))
    hlo = step.lower(state, batch, None).compile().as_text()
    assert _copied_state_leaves(hlo, len(jax.tree.leaves(state))) == []


def test_a_non_finite_step_leaves_params_and_optimizer_state_as_they_were(tiny, tmp_path):
    """KL-retain against a reference whose final norm is NaN: the step reports not finite and returns the
    params and AdamW state it was given, bit for bit; against the true reference the same step trains."""
    step, state, batch, reference_forward = _tiny_step(tiny, tmp_path, Objective(retain="kl_ref", forget="ga"))
    reference = load_params(tiny["ckpt"])[0]
    poisoned = dict(reference, final_norm={"scale": reference["final_norm"]["scale"] * np.nan})
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    for ref, finite in ((poisoned, False), (reference, True)):
        state, metrics = step(state, with_reference_outputs(batch, reference_forward(ref, batch)), ref)
        assert bool(metrics["finite"]) is finite
        after = jax.tree.map(np.asarray, (state.params, state.opt_state))
        same = [np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True)]
        assert all(same) if not finite else not all(same)
    assert int(state.step) == 2


def test_non_finite_gradients_under_a_finite_loss_are_not_applied(tiny, tmp_path, monkeypatch):
    """A forget term whose value is finite (sqrt(0) = 0) but whose gradient is not (sqrt's slope at 0 is
    infinite, times a zero inner gradient: NaN), as an overflow in the backward pass alone would give: the step
    reports it not finite and leaves the params and AdamW state as they were."""
    from eu_jax.objectives import registry
    from eu_jax.objectives.base import Requirements, SideRequirements, Term
    from eu_jax.objectives.terms import LOGP, token_mean

    def sqrt_of_zero(forget, retain):
        return jnp.sqrt(0.0 * -token_mean(forget.stats["logp"], forget)), {}

    probe = Term("sqrt_of_zero", "forget", sqrt_of_zero, lambda: Requirements(forget=SideRequirements(token_fns=LOGP)))
    monkeypatch.setitem(registry._REGISTRY, ("forget", "sqrt_of_zero"), probe)
    step, state, batch, _ = _tiny_step(tiny, tmp_path, Objective(retain="nll", forget="sqrt_of_zero"))
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, metrics = step(state, batch, None)
    assert np.isfinite(float(metrics["loss"])) and not np.isfinite(float(metrics["grad_norm"]))
    assert not bool(metrics["finite"])
    after = jax.tree.map(np.asarray, (state.params, state.opt_state))
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True))


CONFIG_FILE = """
from tests.tiny_run import tiny_config
from pathlib import Path

def get_config():
    paths = {{"ckpt": Path("{ckpt}"), "retain": Path("{retain}"), "forget": Path("{forget}")}}
    return tiny_config(paths, Path("unset"), train={{"steps": 40, "save_every": 2, "async_checkpointing": True}})
"""


def run_cli(config_file, output_dir, *extra, stop_at=None, send=signal.SIGKILL):
    """eu-train in a subprocess; with `stop_at`, send `send` once that text appears in its output."""
    command = [sys.executable, "-m", "eu_jax.train.cli", f"--config={config_file}", f"--config.train.output_dir={output_dir}", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=os.getcwd())
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if stop_at is not None and stop_at in line:
            process.send_signal(send)
            stop_at = None
    process.wait(timeout=300)
    return process.returncode, "".join(lines)


@pytest.fixture(scope="module")
def config_file(tiny, tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny_config.py"
    path.write_text(CONFIG_FILE.format(**{k: str(v) for k, v in tiny.items()}))
    return path


def test_resume_after_sigkill_is_bit_identical(config_file, tmp_path):
    code, _ = run_cli(config_file, tmp_path / "straight")
    assert code == 0
    code, first = run_cli(config_file, tmp_path / "killed", stop_at="checkpoint step 4 committed")
    assert code == -signal.SIGKILL, first
    code, second = run_cli(config_file, tmp_path / "killed")
    assert code == 0, second
    resumed_at = int(second.split("resuming from step ")[1].split()[0])
    assert 4 <= resumed_at < 40
    straight, resumed = final_params(tmp_path / "straight"), final_params(tmp_path / "killed")
    for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(x, y)
    # The steps the killed run logged after its last checkpoint are logged once, by the run that redid them.
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("straight", "killed")]
    assert [[(r["step"], r["loss"]) for r in log] for log in logs] == [[(s, r["loss"]) for s, r in enumerate(logs[0], 1)]] * 2


def test_sigterm_saves_and_stops_cleanly(config_file, tmp_path):
    # Many steps, so the signal surely lands mid-run even on a loaded machine.
    code, output = run_cli(
        config_file, tmp_path / "run", "--config.train.steps=2000", stop_at="step 3:", send=signal.SIGTERM
    )
    assert code == 0, output
    saved = int(output.split("preemption requested: saving step ")[1].split()[0])
    assert 3 <= saved < 2000
    assert saved in ocp.CheckpointManager(tmp_path / "run" / "checkpoints").all_steps()
    assert f"stopped for preemption at step {saved} of 2000;" in output and "done:" not in output


def test_a_workflow_stops_at_a_preempted_training_and_resumes_it(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, train={"steps": 6, "eval_every": 2})

    def preempt(params, step):  # what a scheduler does mid-run: SIGTERM this process
        os.kill(os.getpid(), signal.SIGTERM)
        return {}

    with pytest.raises(TrainingPreempted, match=r"stopped for preemption \(SIGTERM\) at step 2 of 6 .*run the same command again"):
        train_once(config, eval_fn=preempt)
    checkpoints = tmp_path / "checkpoints"
    assert params_source(checkpoints) == str(checkpoints / "2" / "state")
    assert train_once(config, eval_fn=lambda params, step: {}) == checkpoints
    assert params_source(checkpoints) == str(checkpoints / "6" / "state")


def test_a_run_is_not_resumed_under_other_settings(tiny, tmp_path):
    train(tiny_config(tiny, tmp_path, train={"steps": 2}, objective={"g": 1.0}))
    with pytest.raises(ConfigError, match=r"holds a run \(checkpoint of step 2\) trained with other settings "
                                          r"\(objective\.g: 1\.0 -> 5\.0; optimizer\.learning_rate: .* -> 0\.1\)"):
        train(tiny_config(tiny, tmp_path, train={"steps": 4}, objective={"g": 5.0}, optimizer={"learning_rate": 0.1}))
    forget = tmp_path / "other_forget.jsonl"
    forget.write_text(tiny["forget"].read_text().replace("Person", "People"))
    changed_data = tiny_config(tiny, tmp_path, train={"steps": 4})
    changed_data.data.forget.path = str(forget)
    with pytest.raises(ConfigError, match=r"data\.forget's content changed"):
        train(changed_data)
    # How long, where and how fast it runs may change: more steps, other log-prob chunks, another mesh.
    resumed = train(tiny_config(tiny, tmp_path, train={"steps": 3, "log_every": 1}, objective={"chunk_tokens": 8},
                                mesh={"data": 2, "fsdp": 4, "tensor": 1}))
    assert (resumed.start_step, resumed.final_step) == (2, 3)


def test_a_workflow_trains_again_a_run_whose_settings_or_starting_model_changed(tiny, tmp_path, capsys):
    first = tiny_config(tiny, tmp_path / "unlearn", train={"steps": 2})
    train_once(first)
    before = final_params(tmp_path / "unlearn")
    assert train_once(first) == tmp_path / "unlearn" / "checkpoints" and "training it again" not in capsys.readouterr().out
    heavier = tiny_config(tiny, tmp_path / "unlearn", train={"steps": 2}, objective={"g": 5.0})
    train_once(heavier)
    assert "unlearn was trained with other settings (objective.g: 1.0 -> 5.0): training it again" in capsys.readouterr().out
    after = final_params(tmp_path / "unlearn")
    assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    # A run started from another run's checkpoints (the relearning attack) is made again once that run moves on.
    attack = tiny_config(tiny, tmp_path / "attack", train={"steps": 1})
    attack.model.checkpoint = str(tmp_path / "unlearn" / "checkpoints")
    train_once(attack)
    train_once(tiny_config(tiny, tmp_path / "unlearn", train={"steps": 3}, objective={"g": 5.0}))
    capsys.readouterr()
    train_once(attack)
    assert "attack was trained with other settings (params: " in capsys.readouterr().out


def test_a_workflow_trains_again_a_run_whose_imported_model_was_imported_again(tmp_path, capsys):
    """An imported checkpoint's folder may be replaced by a new import (another revision of the model): its
    identity is the folder and the time orbax committed it, so the run started from it is trained again."""
    own = make_tiny_run(tmp_path / "tiny")
    run = tiny_config(own, tmp_path / "run", train={"steps": 1})
    train_once(run)
    train_once(run)
    assert "training it again" not in capsys.readouterr().out
    shutil.rmtree(own["ckpt"])
    import_checkpoint(tmp_path / "tiny" / "hf", own["ckpt"], progress=False)
    train_once(run)
    assert f"run was trained with other settings (params: {own['ckpt'] / 'params'}@" in capsys.readouterr().out


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny, tmp_path, caplog):
    train(tiny_config(tiny, tmp_path, train={"steps": 4, "save_every": 2}))
    for path in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if path.is_file() and path.stat().st_size > 64:
            path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        result = train(tiny_config(tiny, tmp_path, train={"steps": 6, "save_every": 2}))
    assert result.start_step == 2 and result.final_step == 6
    assert "checkpoint step 4" in caplog.text and "cannot be restored" in caplog.text
    load_params(tmp_path / "checkpoints" / "4")  # the step trained again took the damaged one's place


def test_keep_best_and_early_stopping_survive_preemption_and_kill(tiny, tmp_path):
    scripted = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 0.5, 6: 0.1}  # best at 2; patience 2 stops the run at 4

    def evaluate(params, step):
        if step == 3 and not (tmp_path / "run" / "checkpoints" / "3").exists():
            os.kill(os.getpid(), signal.SIGTERM)  # preempted once, after step 3's evaluation
        return {"eval/score": scripted[step]}

    train_section = {"steps": 6, "eval_every": 1, "best_metric": "eval/score", "early_stopping_patience": 2}
    config = tiny_config(tiny, tmp_path / "run", train=train_section)
    assert train(config, eval_fn=evaluate).preempted
    resumed = train(config, eval_fn=evaluate)  # remembers step 2's best: step 4 is no better, and the patience is spent
    assert (resumed.start_step, resumed.final_step, resumed.stopped_early) == (3, 4, True)
    assert ocp.CheckpointManager(tmp_path / "run" / "best").all_steps() == [2]
    again = train(config, eval_fn=evaluate)  # an early-stopped run stays stopped
    assert (again.start_step, again.final_step, again.stopped_early) == (4, 4, True)
    # A kill after a best save but before the next checkpoint: the resumed run reaches that best step again.
    kill = tiny_config(tiny, tmp_path / "kill", train={"steps": 3, "save_every": 2, "eval_every": 1, "best_metric": "eval/score"})
    train(kill, eval_fn=lambda params, step: {"eval/score": -step})
    shutil.rmtree(tmp_path / "kill" / "checkpoints" / "3")
    assert train(kill, eval_fn=lambda params, step: {"eval/score": -step}).final_step == 3
    assert ocp.CheckpointManager(tmp_path / "kill" / "best").all_steps() == [3]


def test_nan_loss_stops_naming_step_and_term_and_keeps_the_checkpoint(tiny, tmp_path):
    """KL-retain against a reference that goes bad between two sessions of the run (its arrays replaced in its
    folder, orbax's commit record kept, so the run's identity is unchanged): the resumed run stops at its first
    step, keeping step 2."""
    reference = tmp_path / "ref"
    shutil.copytree(tiny["ckpt"], reference)
    config = tiny_config(tiny, tmp_path / "run", train={"steps": 2}, model={"reference_checkpoint": str(reference)},
                         objective={"retain": "kl_ref"})
    train(config)
    good = final_params(tmp_path / "run")
    poisoned = jax.tree.map(np.asarray, load_params(tiny["ckpt"])[0])
    poisoned["final_norm"]["scale"] = poisoned["final_norm"]["scale"] * np.nan
    committed = (reference / "params" / "_CHECKPOINT_METADATA").read_bytes()
    shutil.rmtree(reference / "params")
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(reference / "params", poisoned)
    (reference / "params" / "_CHECKPOINT_METADATA").write_bytes(committed)
    config.train.steps = 4
    with pytest.raises(TrainingDiverged, match=r"not finite at step 3 \(.*retain/kl_ref=nan.*the last checkpoint \(step 2\) is kept"):
        train(config)
    for x, y in zip(jax.tree.leaves(good), jax.tree.leaves(final_params(tmp_path / "run")), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("objective", "forget", "forget_everything", r"config\.objective\.forget: 'forget_everything' is not one of"),
        ("optimizer", "schedule", "exponential", r"config\.optimizer\.schedule: must be one of"),
        ("data", "retain", {"path": "/nonexistent.jsonl"}, r"config\.data\.retain: .*/nonexistent\.jsonl"),
        ("data", "batch_size", 4, r"config\.data\.batch_size: .* 8 data-parallel devices"),
        ("runtime", "attention_block", -1, r"config\.runtime\.attention_block: must be 0 \(off\)"),
        ("runtime", "attention", "flash", r"config\.runtime\.attention: 'flash' is not one of xla, splash, cudnn"),
        ("runtime", "attention", "splash", r"config\.data\.max_length: runtime\.attention='splash' takes rows of a multiple of 128 tokens, not 24;"),
    ],
)
def test_bad_config_values_stop_at_start_naming_the_key(tiny, tmp_path, section, key, value, message):
    with pytest.raises(ConfigError, match=message):
        train(tiny_config(tiny, tmp_path, **{section: {key: value}}))


def test_unknown_term_kwarg_is_named(tiny, tmp_path):
    config = tiny_config(tiny, tmp_path, objective={"forget": "npo"})
    config.objective.forget_kwargs = {"betta": 0.1}
    with pytest.raises(ConfigError, match=r"forget_kwargs: .*unknown argument 'betta'"):
        train(config)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.train.stepz=3", 'unknown config key stepz. Did you mean "steps"'),
        ("--config.train.steps=abc", "flag --config.train.steps=abc: invalid literal for int()"),
    ],
)
def test_cli_rejects_bad_overrides_in_one_line(override, message):
    result = subprocess.run(
        [sys.executable, "-m", "eu_jax.train.cli", "--config=configs/base.py", override],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("eu-train: error: ") and message in result.stderr


def test_cli_reports_an_os_error_of_the_run_in_one_line():
    """A folder the run may not write (here a stand-in for training) ends in one line, not a traceback."""
    refuse_to_train = (
        "from eu_jax.train import cli, loop\n"
        "def refuse(config):\n"
        "    raise PermissionError(13, 'Permission denied', config.train.output_dir)\n"
        "loop.train = refuse\n"
        "cli.main()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", refuse_to_train, "--config=configs/base.py", "--config.train.output_dir=/denied"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "eu-train: error: [Errno 13] Permission denied: '/denied'"


def test_a_run_without_best_metric_makes_no_best_folder(tiny, tmp_path):
    """best/ would hold the metadata but no params, and `eu-convert export` would refuse it as no checkpoint."""
    train(tiny_config(tiny, tmp_path / "run", train={"steps": 1}))
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()
    assert not (tmp_path / "run" / "best").exists()


def test_keep_best_early_stopping_keep_n_tensorboard_and_export(tiny, tmp_path):
    """A scripted evaluation metric improves at steps 1 and 2, then gets worse: the best params are those
    of step 2, patience 2 stops the run at step 4, and only the newest 2 checkpoints are kept."""
    scripted = {1: 3.0, 2: 1.0, 3: 2.0, 4: 5.0, 5: 0.5}
    snapshots = {}

    def evaluate(params, step):
        snapshots[step] = np.asarray(params["final_norm"]["scale"])
        return {"eval/score": scripted[step]}

    config = tiny_config(
        tiny,
        tmp_path / "run",
        train={"steps": 5, "eval_every": 1, "save_every": 1, "keep_checkpoints": 2, "best_metric": "eval/score",
               "early_stopping_patience": 2, "tensorboard": True, "peak_flops_per_device": 1e11},
        runtime={"dtype": "bfloat16"},  # bf16 compute, fp32 master weights
    )
    result = train(config, eval_fn=evaluate)
    assert result.stopped_early and result.final_step == 4
    assert ocp.CheckpointManager(tmp_path / "run" / "checkpoints").all_steps() == [3, 4]
    assert ocp.CheckpointManager(tmp_path / "run" / "best").all_steps() == [2]
    best = load_params(tmp_path / "run" / "best")[0]
    assert best["final_norm"]["scale"].dtype == np.float32
    np.testing.assert_array_equal(best["final_norm"]["scale"], snapshots[2])
    assert np.isfinite(result.last_metrics["loss"])
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "retain/nll", "forget/ga", "grad_norm", "learning_rate"} <= set(logged[0])
    throughput = [record for record in logged if "mfu" in record]  # CPUs have no peak: MFU needs the override
    assert throughput and all(r["tokens_per_s"] > 0 for r in throughput)
    assert all(r["mfu"] == pytest.approx(r["tflops_per_device"] * 1e12 / 1e11) for r in throughput)

    from eu_jax.convert.export import export_checkpoint

    export_checkpoint(tmp_path / "run" / "best", tmp_path / "hf", progress=False)
    import transformers

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    np.testing.assert_array_equal(reloaded.model.norm.weight.detach().numpy(), snapshots[2])


def test_a_bf16_params_run_saves_bf16_params_and_says_so(tiny, tmp_path):
    """The source checkpoint loads as the run's params dtype, and the run's meta records that dtype."""
    config = tiny_config(tiny, tmp_path / "run", train={"steps": 1, "save_every": 1}, runtime={"param_dtype": "bfloat16"})
    train(config)
    ckpt = tmp_path / "run" / "checkpoints"
    assert read_model_meta(ckpt).param_dtype == "bfloat16"
    params, _ = load_params(ckpt)
    assert {leaf.dtype.name for leaf in jax.tree.leaves(params)} == {"bfloat16"}


def test_reference_of_bf16_weights_is_held_in_bf16_and_trains_alike(tiny, tmp_path, monkeypatch):
    """A frozen reference imported from bf16 weights stays bf16 (half the memory); the values are the same,
    so an NPO run equals one whose checkpoint stores the same weights widened to fp32."""
    hf_dir = tiny["ckpt"].parent / "hf"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).to(torch.bfloat16)
    checkpoints = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        shutil.copytree(hf_dir, tmp_path / f"{name}_hf")
        model.to(dtype).save_pretrained(tmp_path / f"{name}_hf")
        checkpoints[name] = import_checkpoint(tmp_path / f"{name}_hf", tmp_path / f"{name}_ckpt", progress=False)

    held = {}

    def spying_load_params(ckpt, *args, **kwargs):
        params, meta = load_params(ckpt, *args, **kwargs)
        if kwargs.get("keep_stored_dtype"):
            held[ckpt] = {leaf.dtype.name for leaf in jax.tree.leaves(params)}
        return params, meta

    monkeypatch.setattr(loop, "load_params", spying_load_params)
    common = dict(train={"steps": 2}, objective={"forget": "npo", "retain": "kl_ref"})
    runs = {
        name: train(tiny_config(tiny, tmp_path / name, model={"checkpoint": str(ckpt)}, **common))
        for name, ckpt in checkpoints.items()
    }
    assert held == {checkpoints["bf16"]: {"bfloat16"}, checkpoints["fp32"]: {"float32"}}
    assert runs["bf16"].last_metrics["loss"] == pytest.approx(runs["fp32"].last_metrics["loss"], rel=1e-6)
    assert_trees_close(final_params(tmp_path / "bf16"), final_params(tmp_path / "fp32"), atol=1e-6)
