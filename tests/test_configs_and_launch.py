"""configs/ presets compose into well-typed configs the objectives accept; command-line overrides are
type-checked and name the bad key; the launch scripts parse, and their dry runs print (and only print)
the commands they would run."""

from __future__ import annotations

import itertools
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from absl import flags
from ml_collections import ConfigDict, config_flags

from eu_jax.files import load_python_file, localize_path_settings
from eu_jax.models.config import RuntimeOptions
from eu_jax.objectives.registry import Objective, available_terms, get_term
from eu_jax.parallel.mesh import MESH_AXES, resolve_mesh_shape
from eu_jax.train.config import SCHEDULES, get_default_config

# ml_collections loads config files with the deprecated load_module(); not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = ROOT / "configs" / "experiment.py"
LAUNCH = ROOT / "launch"


def _load(path: Path):
    return load_python_file(path, package="test_configs")


experiment = _load(EXPERIMENT)
MODELS, METHODS, HARDWARE = (experiment.available(kind) for kind in ("model", "method", "hardware"))


def _flatten(config: ConfigDict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, ConfigDict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ---- presets ----------------------------------------------------------------------------------------


def test_the_documented_presets_exist():
    assert MODELS == ["llama3_1_70b", "llama3_1_8b", "llama3_2_1b", "qwen2_5_7b", "smollm2_135m"]
    assert METHODS == ["eu", "ga", "graddiff", "idk_dpo", "kl_npo", "npo", "retain_only", "rmu", "simnpo", "undial"]
    assert HARDWARE == ["cpu", "gpu_1host", "tpu_v5e", "tpu_v5p"]


@pytest.mark.parametrize(
    "model, method, hardware", list(itertools.product(MODELS, METHODS, HARDWARE)), ids=lambda name: name
)
def test_every_combination_builds_a_well_typed_config(model, method, hardware):
    config = experiment.get_config(f"model={model},method={method},hardware={hardware}")
    defaults, flat = _flatten(get_default_config()), _flatten(config)
    kwargs = ("objective.retain_kwargs.", "objective.forget_kwargs.")
    assert {k for k in flat if not k.startswith(kwargs)} == set(defaults), "presets must not add or drop fields"
    for key, default in defaults.items():
        assert type(flat[key]) is type(default), f"{key}: {flat[key]!r} is not a {type(default).__name__}"
    RuntimeOptions(**config.runtime)  # raises on an unknown remat policy or dtype
    assert config.optimizer.learning_rate > 0 and config.optimizer.schedule in SCHEDULES
    assert config.data.batch_size % config.data.microbatches == 0
    for kind in ("retain", "forget"):
        assert config.objective[kind] in available_terms(kind)


@pytest.mark.parametrize("method", METHODS)
def test_method_presets_declare_every_kwarg_of_their_terms_with_its_type(method):
    """ConfigDict cannot gain keys on the command line, so a kwarg the preset leaves out cannot be set."""
    config = experiment.get_config(f"method={method}")
    objective = config.objective
    for kind in ("retain", "forget"):
        declared = dict(objective[f"{kind}_kwargs"])
        defaults = get_term(kind, objective[kind]).resolve_kwargs({})
        assert declared.keys() == defaults.keys(), f"{method}: {kind} kwargs"
        for key, value in declared.items():
            assert type(value) is type(defaults[key]), f"{method}: {kind}_kwargs.{key}={value!r}"
    retain = (objective.retain, dict(objective.retain_kwargs))
    forget = (objective.forget, dict(objective.forget_kwargs))
    Objective(*retain, *forget, objective.a, objective.g).requirements()  # the two terms' needs agree


@pytest.mark.parametrize(
    "spec, learning_rate",
    [
        ("model=llama3_1_8b,method=npo", 1e-5),
        ("model=llama3_1_8b,method=rmu", 5e-5),  # WMDP's rate at 7B
        ("model=llama3_1_70b,method=rmu", 2.5e-5),  # the 70B reference, scaled like at 7B
        ("model=llama3_2_1b,method=undial", 2e-4),
        ("model=smollm2_135m,method=eu", 5e-5),
    ],
)
def test_methods_scale_the_models_reference_learning_rate(spec, learning_rate):
    assert experiment.get_config(spec).optimizer.learning_rate == pytest.approx(learning_rate)


@pytest.mark.parametrize("hardware, devices", [("cpu", 8), ("gpu_1host", 8)])
def test_single_host_meshes_fit_and_split_every_models_batch(hardware, devices):
    for model in MODELS:
        config = experiment.get_config(f"model={model},hardware={hardware}")
        assert all(config.mesh[f"dcn_{axis}"] == 1 for axis in MESH_AXES)
        data, fsdp, _ = resolve_mesh_shape({axis: config.mesh[axis] for axis in MESH_AXES}, devices)
        assert (config.data.batch_size // config.data.microbatches) % (data * fsdp) == 0, model


def test_default_spec_is_smollm2_eu_cpu():
    explicit = experiment.get_config("model=smollm2_135m,method=eu,hardware=cpu").to_dict()
    assert experiment.get_config().to_dict() == explicit
    assert experiment.get_config("method=eu").to_dict() == explicit


@pytest.mark.parametrize(
    "spec, message",
    [
        ("method=nope", r"unknown method preset 'nope'; available method presets: eu, ga, graddiff"),
        ("model=gpt5", r"available model presets: llama3_1_70b, .*smollm2_135m"),
        ("hardware=tpu_v9", r"available hardware presets: cpu, gpu_1host, tpu_v5e, tpu_v5p"),
        ("modle=llama3_1_8b", r"'modle=llama3_1_8b' is not one of model=..., method=..., hardware=..."),
        ("llama3_1_8b", r"'llama3_1_8b' is not one of"),
    ],
)
def test_unknown_presets_fail_listing_the_available_ones(spec, message):
    with pytest.raises(ValueError, match=message):
        experiment.get_config(spec)


# ---- command-line overrides ---------------------------------------------------------------------------


def _parse(*args: str) -> ConfigDict:
    """What eu-train's `--config` flag makes of a command line (the same flag definition)."""
    argv = ["eu-train", *args]
    flag_values = flags.FlagValues()
    # sys_argv: the flag reads its --config.* overrides from this argv rather than from sys.argv.
    config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
    return flag_values.config


def test_overrides_reach_nested_fields_and_method_kwargs():
    config = _parse(
        f"--config={EXPERIMENT}:model=llama3_1_8b,method=simnpo,hardware=gpu_1host",
        "--config.objective.forget_kwargs.beta=4.5",
        "--config.objective.g=0.125",
        "--config.optimizer.learning_rate=3e-6",
        "--config.distributed.local_device_ids=0,1,2,3",
        "--config.train.tensorboard=false",
    )
    assert config.objective.forget == "simnpo" and config.objective.forget_kwargs.beta == 4.5
    assert config.objective.g == 0.125 and config.optimizer.learning_rate == 3e-6
    assert config.distributed.local_device_ids == "0,1,2,3" and config.train.tensorboard is False
    assert config.runtime.dtype == "bfloat16" and config.mesh.fsdp == 8


@pytest.mark.parametrize(
    "override, key",
    [
        ("--config.optimizer.learning_rate=abc", "learning_rate"),
        ("--config.train.steps=1.5", "steps"),
        ("--config.optimizer.lerning_rate=1e-5", "lerning_rate"),
        ("--config.objective.forget_kwargs.gamma=1.0", "gamma"),  # eu's uniform_kl has no kwargs
        ("--config.model.nonexistent=1", "nonexistent"),
    ],
)
def test_unknown_keys_and_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises((flags.IllegalFlagValueError, AttributeError)) as raised:
        _parse(f"--config={EXPERIMENT}", override)
    assert key in str(raised.value) and "Unknown command line flag" not in str(raised.value)


@pytest.mark.parametrize(
    "override, key",
    [("--config.optimizer.learning_rate=abc", "learning_rate"), ("--config.data.batchsize=4", "batchsize")],
)
def test_eu_train_itself_rejects_bad_overrides_before_any_work(override, key):
    result = subprocess.run(
        [sys.executable, "-m", "eu_jax.train.cli", f"--config={EXPERIMENT}:method=npo", override],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )
    assert result.returncode != 0 and key in result.stderr
    assert "error: config.model.checkpoint" not in result.stderr  # stopped at the flags, not in training


def test_path_settings_holding_urls_are_refused_naming_the_setting():
    settings = {
        "model": {"checkpoint": "/shared/ckpt", "name": "gs://not-a-path"},  # only settings that name files
        "data": {"preferred_response": "https://example.org knows", "retain": {"path": "data/r.jsonl"}},
        "retained": {"paths": "a.jsonl, gs://bucket/b.jsonl"},
    }
    with pytest.raises(ValueError, match=r"^config\.retained\.paths: 'gs://bucket/b\.jsonl' is a URL"):
        localize_path_settings(settings)
    settings["retained"]["paths"] = "a.jsonl,b.jsonl"
    localize_path_settings(settings)
    for key, value in [("output_dir", "s3://b/run"), ("reference_checkpoint", "hf://x/y"), ("workdir", " gs://b")]:
        with pytest.raises(ValueError, match=f"^config\\.x\\.{key}: "):
            localize_path_settings({"x": {key: value}})


def test_path_settings_expand_the_home_folder_in_place(monkeypatch, tmp_path):
    """A shell leaves '~' as it is after '--config.train.output_dir=', which would make a folder named '~'."""
    monkeypatch.setenv("HOME", str(tmp_path))
    config = ConfigDict({
        "train": {"output_dir": "~/runs/a", "steps": 3},
        "retained": {"paths": "~/a.jsonl, b.jsonl"},
        "data": {"preferred_response": "~/not a path", "retain": {"path": ""}},
    })
    config.lock()
    localize_path_settings(config)
    assert config.train.output_dir == f"{tmp_path}/runs/a" and config.train.steps == 3
    assert config.retained.paths == f"{tmp_path}/a.jsonl,b.jsonl"
    assert config.data.preferred_response == "~/not a path" and config.data.retain.path == ""


@pytest.mark.parametrize("module, program", [("eu_jax.train.cli", "eu-train"), ("eu_jax.eval.cli", "eu-eval")])
def test_config_commands_stop_at_a_url_before_writing_anything(tmp_path, module, program):
    """pathlib reads 'gs://bucket/run' as the local folder 'gs:/bucket/run': a pod run would have written its
    checkpoints onto each worker's own disk. The commands stop in one line instead, having written nothing."""
    config = EXPERIMENT if program == "eu-train" else ROOT / "configs" / "eval.py"
    setting = "train.output_dir" if program == "eu-train" else "output"
    result = subprocess.run(
        [sys.executable, "-m", module, f"--config={config}", f"--config.{setting}=gs://bucket/run"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"{program}: error: config.{setting}: 'gs://bucket/run' is a URL, and eu_jax reads and writes local paths "
        "only (give a folder every host mounts at the same path, e.g. a bucket through Cloud Storage FUSE or an NFS share)"
    ]
    assert list(tmp_path.iterdir()) == []


# ---- launch scripts -------------------------------------------------------------------------------------

SCRIPTS = sorted(LAUNCH.rglob("*.sh"))
ENTRY_SCRIPTS = [p for p in SCRIPTS if p.name != "common.sh"]
CONFIG = "--config=configs/experiment.py:model=llama3_1_8b,method=eu,hardware=tpu_v5p"


@pytest.fixture
def shell(tmp_path):
    """Runs a launch script with a clean environment whose gcloud/sbatch/srun/eu-train/tar are traps:
    a dry run that executes any of them fails the test."""
    trap_bin, tripped = tmp_path / "bin", tmp_path / "tripped"
    trap_bin.mkdir()
    for tool in ("gcloud", "sbatch", "srun", "eu-train", "tar"):
        (trap_bin / tool).write_text(f"#!/bin/sh\necho {tool} >> {tripped}\nexit 1\n")
        (trap_bin / tool).chmod(0o755)

    def run(script: str, *args: str, **env: str) -> subprocess.CompletedProcess:
        base = {"PATH": f"{trap_bin}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}
        command = ["bash", str(LAUNCH / script), *args]
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, env={**base, **env})
        assert not tripped.exists(), f"{script} ran {tripped.read_text()!r}"
        return result

    return run


def _only_line(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    return shlex.split(lines[0])


def _option(words: list[str], name: str) -> str:
    return next(w.split("=", 1)[1] for w in words if w.startswith(f"{name}="))


def test_launch_scripts_exist_and_parse():
    assert {p.relative_to(LAUNCH).as_posix() for p in SCRIPTS} >= {
        "common.sh", "tpu/pod.sh", "gpu/single_host.sh", "gpu/slurm.sh"
    }
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"
        assert "set -euo pipefail" in script.read_text() or script.name == "common.sh"


@pytest.mark.parametrize("script", [p.relative_to(LAUNCH).as_posix() for p in ENTRY_SCRIPTS])
def test_help_exits_zero_with_usage(shell, script):
    result = shell(script, "-h")
    assert result.returncode == 0 and result.stdout.startswith("Usage: launch/")
    assert os.access(LAUNCH / script, os.X_OK)


def test_pod_run_starts_the_same_eu_train_on_every_worker(shell):
    args = [CONFIG, "--config.train.output_dir=/mnt/shared/run", "--config.data.preferred_response=I don't know."]
    options = ["--dry-run", "--name=eu-test", "--zone=us-east5-a", "--project=proj"]
    words = _only_line(shell("tpu/pod.sh", *options, "run", *args))
    assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "eu-test"]
    assert {"--zone=us-east5-a", "--project=proj", "--worker=all"} <= set(words)
    remote = shlex.split(_option(words, "--command"))
    assert remote[:3] == ["cd", "eu_jax", "&&"]
    assert remote[remote.index("eu-train"):] == ["eu-train", *args]  # every argument arrives intact
    assert remote[remote.index("eu-train") - 1] == "&&"  # no environment unless asked

    settings = ["--env=JAX_COMPILATION_CACHE_DIR=/mnt/shared/xla", "--env=XLA_FLAGS=--a=1 --b=2"]
    words = _only_line(shell("tpu/pod.sh", *options, *settings, "run", *args))
    remote = shlex.split(_option(words, "--command"))
    assert remote[remote.index("env"):] == [
        "env", "JAX_COMPILATION_CACHE_DIR=/mnt/shared/xla", "XLA_FLAGS=--a=1 --b=2", "eu-train", *args
    ]


def test_pod_lifecycle_commands(shell):
    env = {"NAME": "from-env", "ZONE": "us-west4-a", "ACCELERATOR": "v5litepod-16"}
    create = _only_line(shell("tpu/pod.sh", "--dry-run", "create", "--spot", **env))
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "from-env"]
    expected = {"--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite", "--spot"}
    assert expected <= set(create)
    assert not any(w.startswith("--project") for w in create)  # gcloud's own default

    install = shell("tpu/pod.sh", "--dry-run", "--accelerator=v5p-32", "install", **env)
    assert install.returncode == 0, install.stderr
    lines = install.stdout.splitlines()
    assert lines[0].startswith("tar -czf ") and "--exclude=.venv" in lines[0]
    assert lines[1].startswith("gcloud compute tpus tpu-vm scp ") and "--worker=all" in lines[1]
    assert "--worker=all" in lines[-1] and "pip install -e '.[tpu]'" in shlex.split(lines[-1])[-1]
    cloned = shell("tpu/pod.sh", "--dry-run", "install", REPO_URL="https://example.com/eu_jax.git", **env)
    assert "git clone https://example.com/eu_jax.git eu_jax" in cloned.stdout and "tar " not in cloned.stdout

    logs = _only_line(shell("tpu/pod.sh", "--dry-run", "logs", "runs/exp1", "out", **env))
    assert logs[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse"]
    assert "from-env:eu_jax/runs/exp1" in logs and "--worker=0" in logs and "out" in logs
    bucket = _only_line(shell("tpu/pod.sh", "--dry-run", "logs", "gs://bucket/run", **env))
    assert bucket == ["gcloud", "storage", "cp", "--recursive", "gs://bucket/run", "."]

    delete = _only_line(shell("tpu/pod.sh", "--dry-run", "delete", **env))
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "from-env"] and "--quiet" in delete


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dry-run", "run", CONFIG], "zone is required"),
        (["--dry-run", "--zone=z", "launch"], "unknown command 'launch'"),
        (["--dry-run", "--zone=z", "run"], "run needs eu-train arguments"),
        (["--dry-run", "--zone=z", "--accelerator=v6e-8", "create"], "--runtime-version"),
        (["--zone=z", "--dry-run", "--bogus", "create"], "unknown option '--bogus'"),
        (["--dry-run", "--zone=z", "--env=2FAST=1", "run", CONFIG], "--env takes NAME=VALUE, not '2FAST=1'"),
    ],
)
def test_pod_errors_say_what_is_missing(shell, args, message):
    result = shell("tpu/pod.sh", *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""


def test_single_host_puts_its_mesh_override_between_config_and_the_users(shell):
    words = _only_line(
        shell("gpu/single_host.sh", "--dry-run", "--config.train.steps=10", CONFIG, "--config.mesh.fsdp=4")
    )
    assert words == [
        "env", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9", "eu-train",
        CONFIG, "--config.mesh.fsdp=-1", "--config.train.steps=10", "--config.mesh.fsdp=4",
    ]
    with_venv = _only_line(shell("gpu/single_host.sh", "--dry-run", CONFIG, EU_TRAIN=".venv/bin/eu-train"))
    assert ".venv/bin/eu-train" in with_venv
    missing = shell("gpu/single_host.sh", "--dry-run", "--config.train.steps=10")
    assert missing.returncode == 2 and "--config=path/to/config.py" in missing.stderr


def test_slurm_submits_one_task_per_node_with_all_its_gpus(shell):
    words = _only_line(shell("gpu/slurm.sh", "--dry-run", "--nodes=3", CONFIG, "--config.train.steps=5"))
    assert words[0] == "sbatch"
    assert {"--nodes=3", "--ntasks-per-node=1", "--gpus-per-node=8", "--exclusive"} <= set(words)
    srun = shlex.split(_option(words, "--wrap"))
    assert srun[0] == "srun" and "--ntasks-per-node=1" in srun
    train = srun[srun.index("eu-train"):]
    assert train == [
        "eu-train", CONFIG, "--config.mesh.fsdp=-1", "--config.mesh.dcn_fsdp=3",
        "--config.distributed.local_device_ids=0,1,2,3,4,5,6,7", "--config.train.steps=5",
    ]


def test_slurm_inside_an_allocation_runs_srun_over_its_nodes(shell):
    allocation = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "2"}
    words = _only_line(shell("gpu/slurm.sh", "--dry-run", "--dcn=data", "--gpus-per-node=4", CONFIG, **allocation))
    assert words[0] == "srun" and "eu-train" in words
    expected = {"--config.mesh.dcn_data=2", "--config.distributed.local_device_ids=0,1,2,3", "--gpus-per-node=4"}
    assert expected <= set(words)
    bad = shell("gpu/slurm.sh", "--dry-run", "--dcn=tensor", CONFIG)
    assert bad.returncode == 2 and "--dcn must be fsdp or data" in bad.stderr
