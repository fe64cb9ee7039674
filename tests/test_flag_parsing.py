"""The config-file commands' shared front (`eu_jax.flag_parsing`): a config file that gives no config ends in
one line naming the file and the reason, exit 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TRAIN_DEFAULTS = "from eu_jax.train.config import get_default_config\n"


def run_command(module: str, config: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, f"--config={config}"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )


@pytest.mark.parametrize(
    "source, spec, reason",
    [
        ("def get_config(:\n    pass\n", "", "line 1: invalid syntax"),
        ("x = 1\n", "", "defines no get_config() function"),
        (
            TRAIN_DEFAULTS + "def get_config():\n    c = get_default_config()\n    c.train.steps = 'three'\n    return c\n",
            "",
            "Could not override field 'steps' (reference). three is of original type <class 'str'> and cannot be "
            "casted to type <class 'int'>",
        ),
        ("def get_config(spec):\n    raise ValueError(f'unknown preset {spec!r}')\n", ":foo", "unknown preset 'foo'"),
    ],
    ids=["syntax error", "no get_config", "wrong type", "error in get_config"],
)
def test_a_config_file_that_fails_is_named_in_one_line(tmp_path, source, spec, reason):
    config = tmp_path / "config.py"
    config.write_text(source)
    result = run_command("eu_jax.train.cli", f"{config}{spec}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"eu-train: error: {config}: {reason}"


def test_a_missing_config_file_is_named_in_one_line(tmp_path):
    result = run_command("eu_jax.train.cli", str(tmp_path / "missing.py"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"eu-train: error: {tmp_path / 'missing.py'}: no such file"


def test_an_unknown_experiment_preset_is_named_in_one_line():
    result = run_command("eu_jax.train.cli", f"{CONFIGS / 'experiment.py'}:model=foo")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"eu-train: error: {CONFIGS / 'experiment.py'}: unknown model preset 'foo'; available")
    assert "\n" not in result.stderr.strip()


def test_a_syntax_error_in_a_file_the_config_loads_names_that_file(tmp_path):
    """Every config-file command shares the front: eu-eval reports as eu-train does."""
    (tmp_path / "preset.py").write_text("x = (\n")
    config = tmp_path / "config.py"
    config.write_text(f"from eu_jax.files import load_python_file\n\ndef get_config():\n    return load_python_file({str(tmp_path / 'preset.py')!r})\n")
    result = run_command("eu_jax.eval.cli", str(config))
    assert result.returncode == 2
    assert result.stderr.strip() == f"eu-eval: error: {config}: {tmp_path / 'preset.py'}, line 1: '(' was never closed"
