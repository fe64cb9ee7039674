"""Small file helpers shared by the commands that write results and provenance."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> Path:
    """Write JSON under a temporary name, then rename: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
    return path
