"""The shared file helpers: an atomic write that fails leaves nothing behind, and URLs are refused by name."""

from __future__ import annotations

import argparse

import pytest

from eu_jax.files import local_path, not_url, write_text_atomic


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
