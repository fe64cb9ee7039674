"""The persistent compilation cache of eu_jax's commands: `eu-generate` run twice in fresh processes, the
second loading its sampler from disk (jax's own cache-hit log line) and printing the same answer; the
folder it uses by default, `JAX_COMPILATION_CACHE_DIR` moving it or turning it off, and the folders it
refuses (writable by others, or impossible to make) without stopping the command."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from eu_jax.convert.hf_import import import_checkpoint
from tests.tiny_models import save_char_tokenizer, save_hf_model

SAMPLER = "jit__generate_loop"
# What XLA:CPU logs where it refuses executables compiled on this very host (LLVM tuning flags taken for ISA).
REJECTED_BY_XLA_CPU = "Machine type used for XLA:CPU compilation doesn't match"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compile_cache")
    save_hf_model("llama", root / "hf")
    save_char_tokenizer(root / "hf", CHAT_TEMPLATE)
    return import_checkpoint(root / "hf", root / "ckpt", progress=False)


def command_env(eu_jax_cache: Path, **settings: str) -> dict[str, str]:
    """This process's environment with the cache left to eu_jax (the tests turn it off), tiny programs
    cached too (jax skips those compiled in under a second), and jax's compiler logging its cache hits."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(
        EU_JAX_CACHE=str(eu_jax_cache), PYTHONPATH=os.getcwd(), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_DEBUG_LOG_MODULES="jax._src.compiler", **settings,
    )
    return env


def generate(checkpoint: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eu_jax.generate_cli", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "6"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def cached_programs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*-cache")) if folder.is_dir() else []


def test_second_run_loads_the_sampler_from_the_cache_and_answers_the_same(checkpoint, tmp_path):
    env = command_env(tmp_path / "eu_jax_cache")
    first = generate(checkpoint, env)
    programs = cached_programs(tmp_path / "eu_jax_cache" / "xla")
    assert any(name.startswith(SAMPLER) for name in programs), programs
    assert f"Persistent compilation cache hit for '{SAMPLER}'" not in first.stderr
    second = generate(checkpoint, env)
    if REJECTED_BY_XLA_CPU in second.stderr:
        pytest.skip("XLA:CPU refuses every cached executable on this CPU (jax-ml/jax#38445): nothing to load")
    assert f"Persistent compilation cache hit for '{SAMPLER}'" in second.stderr
    assert second.stdout == first.stdout and first.stdout.strip()
    assert cached_programs(tmp_path / "eu_jax_cache" / "xla") == programs  # nothing compiled again


def enable_in_fresh_process(env: dict[str, str]) -> subprocess.CompletedProcess:
    """What `enable_compilation_cache` returns, then the cache bound jax holds, printed by a new process."""
    code = "from eu_jax.compile_cache import enable_compilation_cache as e; import jax; print(e(), jax.config.jax_compilation_cache_max_size)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


def default_folder(env: dict[str, str]) -> str:
    return enable_in_fresh_process(env).stdout.strip()


def test_jax_compilation_cache_dir_moves_the_cache_or_turns_it_off(tmp_path):
    cache = tmp_path / "eu_jax_cache"
    assert default_folder(command_env(cache)) == f"{cache / 'xla'} {4 * 2**30}"
    assert default_folder(command_env(cache, JAX_COMPILATION_CACHE_MAX_SIZE="1000")) == f"{cache / 'xla'} 1000"
    assert default_folder(command_env(cache, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "mine"))) == f"{tmp_path / 'mine'} -1"
    assert default_folder(command_env(cache, JAX_COMPILATION_CACHE_DIR="")) == "None -1"


def test_turned_off_the_cache_writes_nothing(checkpoint, tmp_path):
    generate(checkpoint, command_env(tmp_path / "eu_jax_cache", JAX_COMPILATION_CACHE_DIR=""))
    assert not (tmp_path / "eu_jax_cache" / "xla").exists()


def test_a_folder_others_may_write_to_is_not_used(tmp_path):
    cache = tmp_path / "eu_jax_cache"
    (cache / "xla").mkdir(parents=True)
    (cache / "xla").chmod(0o777)
    result = enable_in_fresh_process(command_env(cache))
    assert result.stdout.strip() == "None -1", result.stderr[-2000:]
    assert f"not using the compilation cache {cache / 'xla'}: other users may write to it" in result.stderr
    (cache / "xla").chmod(0o755)
    assert default_folder(command_env(cache)).startswith(f"{cache / 'xla'} ")


def test_a_cache_folder_that_cannot_be_made_leaves_the_command_running(tmp_path):
    blocker = tmp_path / "eu_jax_cache"
    blocker.mkdir()
    (blocker / "xla").write_text("a file where the folder would go")
    result = enable_in_fresh_process(command_env(blocker))
    assert result.stdout.strip() == "None -1", result.stderr[-2000:]
    assert "eu_jax: no compilation cache:" in result.stderr and str(blocker / "xla") in result.stderr
