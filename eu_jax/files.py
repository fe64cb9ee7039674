"""Small file helpers shared by the commands: atomic results and provenance files, Python files loaded by path."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Any, Mapping


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> Path:
    """Write JSON under a temporary name, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
    return path


def load_python_file(path: Path, package: str = "eu_jax_configs") -> ModuleType:
    """A Python file loaded as a module by path: config files and method presets live in configs/, which is
    not a package on sys.path when the console scripts run."""
    path = Path(path)
    spec = importlib.util.spec_from_file_location(f"{package}.{path.parent.name}.{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
