"""The shared file helpers: an atomic write that fails leaves nothing behind, URLs are refused by name, and an
output folder that would overwrite or mix with what is saved is refused naming the setting."""

from __future__ import annotations

import argparse

import pytest

from eu_jax.files import file_in_the_way, local_path, not_url, require_new_folder, write_text_atomic


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "kept.json").write_text("{}")
    with pytest.raises(IsADirectoryError):
        write_text_atomic(tmp_path / "results", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]
    assert [p.name for p in (tmp_path / "results").iterdir()] == ["kept.json"]


def test_urls_are_refused_and_other_text_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for argument_type in (local_path, not_url):
        with pytest.raises(argparse.ArgumentTypeError, match=r"'gs://b/r.jsonl' is a URL"):
            argument_type("gs://b/r.jsonl")
    assert not_url("org/dataset") == "org/dataset" and local_path("~/data") == tmp_path / "data"


def test_an_output_folder_must_be_new_or_empty_and_not_under_a_file(tmp_path):
    (tmp_path / "file").write_text("kept")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "kept.txt").write_text("kept")
    (tmp_path / "empty").mkdir()
    refused = {
        tmp_path / "file": f"out: {tmp_path / 'file'} is an existing file; give a new or empty folder",
        tmp_path / "file" / "run": f"out: {tmp_path / 'file' / 'run'} lies under {tmp_path / 'file'}, which is a file",
        tmp_path / "full": f"out: {tmp_path / 'full'} is a folder that is not empty",
    }
    for path, message in refused.items():
        with pytest.raises(FileExistsError, match=f"^{message}"):
            require_new_folder(path, "out")
    for path in (tmp_path / "empty", tmp_path / "new" / "run"):
        require_new_folder(path, "out")
        assert file_in_the_way(path) is None
    assert file_in_the_way(tmp_path / "file" / "a" / "b") == tmp_path / "file"
    assert (tmp_path / "file").read_text() == "kept" and (tmp_path / "full" / "kept.txt").read_text() == "kept"
