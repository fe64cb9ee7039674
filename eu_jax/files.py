"""Small file helpers shared by the commands: atomic results and provenance files, Python files loaded by path,
and path settings and arguments made local paths ('~' expanded, URLs refused)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping

_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
# Config settings that name files or folders: these keys, and keys ending in _dir, _path or _checkpoint.
_PATH_KEYS = frozenset({"path", "paths", "checkpoint", "base", "output", "workdir", "phrases"})
_PATH_SUFFIXES = ("_dir", "_path", "_checkpoint")
_LIST_KEYS = frozenset({"paths"})  # comma-separated paths


def _url_refusal(text: str) -> str:
    return (
        f"'{text.strip()}' is a URL, and eu_jax reads and writes local paths only (give a folder every host mounts "
        "at the same path, e.g. a bucket through Cloud Storage FUSE or an NFS share)"
    )


def not_url(text: str) -> str:
    """An argparse type for arguments that name local data or a hub dataset ('org/name'): the text as given,
    but a URL (gs://, s3://, ...) is refused, where the data pipeline would look for a local file named after it."""
    if _URL.match(text):
        raise argparse.ArgumentTypeError(_url_refusal(text))
    return text


def local_path(text: str) -> Path:
    """An argparse type for path arguments: '~' is the home folder, and a URL (gs://, s3://, ...) is refused,
    where `Path` would silently make 'gs://bucket/run' a local folder 'gs:/bucket/run'."""
    return Path(not_url(text)).expanduser()


def localize_path_settings(config: Any, where: str = "config") -> None:
    """Make a config's path settings local paths, in place: '~' becomes the home folder (a shell leaves it as
    it is in `--config.train.output_dir=~/runs`, which would make a folder named '~'), and a URL raises
    ValueError naming the setting, so a run stops before it writes into a local folder named after a bucket."""
    for key, value in list(config.items()):
        name = f"{where}.{key}"
        if hasattr(value, "items"):  # a nested section
            localize_path_settings(value, name)
        elif isinstance(value, str) and (key in _PATH_KEYS or key.endswith(_PATH_SUFFIXES)):
            items = [item.strip() for item in value.split(",")] if key in _LIST_KEYS else [value]
            if url := next((item for item in items if _URL.match(item)), None):
                raise ValueError(f"{name}: {_url_refusal(url)}")
            local = ",".join(os.path.expanduser(item) for item in items)
            if local != value:
                config[key] = local


def preset_names(folder: Path) -> list[str]:
    """The presets a folder of config files offers: its .py files' names, `_`-prefixed helpers left out."""
    return sorted(path.stem for path in Path(folder).glob("*.py") if not path.stem.startswith("_"))


def file_in_the_way(path: Path) -> Path | None:
    """`path` or its nearest existing ancestor when that is not a folder: what stops `path` being made as a
    folder or written under (None when nothing does)."""
    path = Path(path).absolute()
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    return None if existing is None or existing.is_dir() else existing


def require_new_folder(path: Path, setting: str) -> None:
    """Refuse, before any work, an output folder that is (or lies under) a file or is a folder that is not
    empty, naming `setting`: nothing already saved there is overwritten or mixed with the new output."""
    path = Path(path)
    blocking = file_in_the_way(path)
    if blocking is not None:
        where = "is an existing file" if blocking == path.absolute() else f"lies under {blocking}, which is a file"
        raise FileExistsError(f"{setting}: {path} {where}; give a new or empty folder")
    if path.is_dir() and any(path.iterdir()):
        raise FileExistsError(f"{setting}: {path} is a folder that is not empty; give a new or empty folder, so "
                              "nothing saved there is overwritten")


def write_text_atomic(path: Path, text: str) -> Path:
    """Write text under a temporary name (this process's own), then rename: a reader never sees a half-written
    file, and a write cut short leaves the old one whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder at `path`: no stray temporary is left beside it
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> Path:
    """`write_text_atomic` of JSON."""
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")


def load_python_file(path: Path, package: str = "eu_jax_configs") -> ModuleType:
    """A Python file loaded as a module by path: config files and method presets live in configs/, which is
    not a package on sys.path when the console scripts run."""
    path = Path(path)
    name = f"{package}.{path.parent.name}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    # Registered as an import would: dataclasses (under `from __future__ import annotations`) and pickle look a
    # class's module up in sys.modules.
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
