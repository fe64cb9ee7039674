"""Loading retain/forget records through `datasets`: every local format gives the same records, and bad data
stops with a message that names the file and the row (rows are 1-based; raw-text faults name the line)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import pandas as pd
import pytest

from eu_jax.data.sources import DataError, DataSpec, Record, content_fingerprint, load_records, resolve, with_response

PAIRS = [{"prompt": f"Question {i}?", "response": f"Answer {i}, with a comma and \"quotes\"."} for i in range(5)]
PAIRS[2]["response"] = "42"  # numeric-looking text stays text in every format (CSV included)
PAIRS[3]["response"] = ""  # an empty cell stays an empty string
CHATS = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
]


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep `datasets`' own arrow cache inside the test's folder."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets_cache")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def expected_pairs(rows=PAIRS) -> list[Record]:
    return [Record("", prompt=r["prompt"], response=r["response"]) for r in rows]


def test_every_local_format_gives_the_same_records(tmp_path):
    frame = pd.DataFrame(PAIRS)
    paths = {
        "jsonl": write_jsonl(tmp_path / "d.jsonl", PAIRS),
        "json": tmp_path / "d.json",
        "csv": tmp_path / "d.csv",
        "parquet": tmp_path / "d.parquet",
    }
    paths["json"].write_text(json.dumps(PAIRS), encoding="utf-8")
    frame.to_csv(paths["csv"], index=False)
    frame.to_parquet(paths["parquet"])
    datasets.Dataset.from_list(PAIRS).save_to_disk(tmp_path / "saved")
    paths["saved"] = tmp_path / "saved"
    paths["arrow"] = next((tmp_path / "saved").glob("*.arrow"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(PAIRS), "test": datasets.Dataset.from_list(PAIRS[:1])}).save_to_disk(
        tmp_path / "saved_dict"
    )
    paths["saved_dict"] = tmp_path / "saved_dict"
    expected = expected_pairs()
    for name, path in paths.items():
        records = load_records(DataSpec(str(path)))
        assert records == expected, name
        assert all(r.format == "pairs" for r in records)
    assert load_records(DataSpec(str(tmp_path / "saved_dict"), split="test")) == expected[:1]
    with pytest.raises(DataError, match=r"saved_dict: no split 'validation' \(splits found: \['test', 'train'\]\)"):
        load_records(DataSpec(str(tmp_path / "saved_dict"), split="validation"))


def test_folders_globs_and_splits(tmp_path):
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    write_jsonl(folder / "train-00000-of-00002.jsonl", PAIRS[:2])
    pd.DataFrame(PAIRS[2:]).to_parquet(folder / "train-00001-of-00002.parquet")
    write_jsonl(folder / "test-00000-of-00001.jsonl", PAIRS[:1])
    records = load_records(DataSpec(str(tmp_path / "repo")))
    assert records == expected_pairs()
    assert records[3].where == f"{folder / 'train-00001-of-00002.parquet'}, row 2"  # rows count within their file
    assert load_records(DataSpec(str(tmp_path / "repo"), split="test")) == expected_pairs(PAIRS[:1])
    with pytest.raises(DataError, match=r"repo: no split 'dev' \(splits found: \['test', 'train'\]\)"):
        load_records(DataSpec(str(tmp_path / "repo"), split="dev"))
    assert load_records(DataSpec(str(folder / "train-*"))) == expected_pairs()
    assert load_records(DataSpec(str(folder / "train-*"), max_examples=3)) == expected_pairs()[:3]


def test_messages_text_and_field_mapping(tmp_path):
    chats = load_records(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", CHATS))))
    assert [r.format for r in chats] == ["messages", "messages"]
    assert chats[1].messages == (("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2"))
    pd.DataFrame(CHATS).to_parquet(tmp_path / "c.parquet")  # nested lists of structs
    assert load_records(DataSpec(str(tmp_path / "c.parquet"))) == chats

    texts = load_records(DataSpec(str(write_jsonl(tmp_path / "t.jsonl", [{"text": "a b"}, {"text": "c"}]))))
    assert texts == [Record("", text="a b"), Record("", text="c")]

    renamed = [{"question": r["prompt"], "answer": r["response"], "text": "ignored"} for r in PAIRS]
    spec = DataSpec(str(write_jsonl(tmp_path / "q.jsonl", renamed)), prompt_field="question", response_field="answer")
    assert load_records(spec) == expected_pairs()  # pairs win over text in "auto"
    text_spec = DataSpec(spec.path, format="text")
    assert load_records(text_spec)[0] == Record("", text="ignored")


def test_with_response_keeps_prompts(tmp_path):
    pairs = with_response(expected_pairs()[:2], "I don't know.")
    assert [(r.prompt, r.response) for r in pairs] == [("Question 0?", "I don't know."), ("Question 1?", "I don't know.")]
    chats = load_records(DataSpec(str(write_jsonl(tmp_path / "c.jsonl", CHATS))))
    assert with_response(chats, "No.")[1].messages == (("system", "s"), ("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "No."))
    with pytest.raises(DataError, match="row 1: a text record has no prompt"):
        with_response([Record("t.jsonl, row 1", text="x")], "No.")


# ---- bad data ---------------------------------------------------------------------------------------


def _fails(spec_or_path, pattern: str, **spec_kwargs):
    spec = spec_or_path if isinstance(spec_or_path, DataSpec) else DataSpec(str(spec_or_path), **spec_kwargs)
    with pytest.raises(DataError, match=pattern):
        load_records(spec)


def test_empty_sets(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    _fails(tmp_path / "empty.jsonl", r"empty.jsonl: is empty \(no examples\)")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    _fails(tmp_path / "blank.jsonl", r"blank.jsonl: has no examples")
    (tmp_path / "header.csv").write_text("prompt,response\n")
    _fails(tmp_path / "header.csv", r"header.csv: has no examples")
    pd.DataFrame({"prompt": [], "response": []}).to_parquet(tmp_path / "none.parquet")
    _fails(tmp_path / "none.parquet", r"none.parquet: has no examples")


def test_missing_column(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "answer": "a"}])
    _fails(path, r"d.jsonl: no column 'response' for format 'pairs' \(columns: \['prompt', 'answer'\]\)", format="pairs")
    _fails(path, r"d.jsonl: cannot tell the format from the columns \['prompt', 'answer'\]")
    _fails(path, r"d.jsonl: no column 'messages' for format 'messages'", format="messages")


def test_wrong_types_and_nulls_name_the_row(tmp_path):
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": "r"}, {"prompt": "p", "response": 5}]
    _fails(write_jsonl(tmp_path / "a.jsonl", rows), r"a.jsonl, row 3: 'response' must be a string, not int")
    rows = [{"prompt": "p", "response": "r"}, {"prompt": "p"}]
    _fails(write_jsonl(tmp_path / "b.jsonl", rows), r"b.jsonl, row 2: 'response' is missing \(null\)")
    pd.DataFrame({"prompt": ["a", None], "response": ["b", "c"]}).to_parquet(tmp_path / "c.parquet")
    _fails(tmp_path / "c.parquet", r"c.parquet, row 2: 'prompt' is missing \(null\)")
    _fails(write_jsonl(tmp_path / "d.jsonl", [{"text": ["a", "b"]}]), r"d.jsonl, row 1: 'text' must be a string, not list")


def test_a_column_of_mixed_types_names_the_row_and_value_the_file_has(tmp_path):
    """`datasets` reads a JSON column whose rows mix strings and numbers as numbers ("000" becomes 0), so the
    rows are checked as the file writes them."""
    rows = [{"prompt": "p", "response": f"{i:03d}"} for i in range(5)]
    rows[2]["response"] = 5
    _fails(write_jsonl(tmp_path / "a.jsonl", rows), r"a.jsonl, row 3: 'response' must be a string, not int \(5\)$")
    (tmp_path / "b.json").write_text(json.dumps(rows))
    _fails(tmp_path / "b.json", r"b.json, row 3: 'response' must be a string, not int \(5\)$")
    chats = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": c}]} for c in ("000", "002", 7)]
    _fails(write_jsonl(tmp_path / "c.jsonl", chats), r"c.jsonl, row 3: 'messages\[2\].content' must be a string, not int \(7\)$")
    other_column_mixed = [{"prompt": "p", "response": "000", "id": 1}, {"prompt": "q", "response": "002", "id": "x"}]
    assert [r.response for r in load_records(DataSpec(str(write_jsonl(tmp_path / "d.jsonl", other_column_mixed))))] == ["000", "002"]


def test_bad_conversations_name_the_row(tmp_path):
    no_assistant = CHATS[:1] + [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}]
    _fails(write_jsonl(tmp_path / "a.jsonl", no_assistant), r"a.jsonl, row 2: the conversation has no assistant turn \(roles: system, user\)")
    _fails(write_jsonl(tmp_path / "b.jsonl", CHATS[:1] + [{"messages": "hello"}]), r"b.jsonl, row 2: 'messages' must be a list")
    missing = [{"messages": [{"role": "user", "content": "u"}, {"role": "assistant"}]}]
    _fails(write_jsonl(tmp_path / "c.jsonl", missing), r"c.jsonl, row 1: 'messages\[2\].content' is missing \(null\)")
    _fails(write_jsonl(tmp_path / "d.jsonl", [{"messages": []}]), r"d.jsonl, row 1: 'messages' is an empty conversation")
    _fails(write_jsonl(tmp_path / "e.jsonl", [{"messages": ["hi"]}]), r"e.jsonl, row 1: message 1 of 'messages' must be a \{role, content\} object")


def test_undecodable_text_names_the_line(tmp_path):
    good = json.dumps(PAIRS[0]).encode()
    (tmp_path / "a.jsonl").write_bytes(good + b"\n" + good + b"\n" + b'{"prompt": "caf\xe9", "response": "x"}\n')
    _fails(tmp_path / "a.jsonl", r"a.jsonl, line 3: undecodable text \(byte 0xe9 at column 16 is not UTF-8\)")
    (tmp_path / "b.csv").write_bytes(b"prompt,response\na,b\n" + b"x,y\n" * 5000 + b"c\xff,d\n")  # past the first read chunk
    _fails(tmp_path / "b.csv", r"b.csv, line 5003: undecodable text \(byte 0xff at column 2 is not UTF-8\)")
    (tmp_path / "c.jsonl").write_text('{"prompt": "\\ud800", "response": "x"}\n')  # a lone surrogate escape
    _fails(tmp_path / "c.jsonl", r"c.jsonl, line 1: undecodable text \(invalid Unicode: '\\ud800'\)")
    pd.DataFrame({"prompt": [b"ok", b"\xff\xfe"], "response": [b"a", b"b"]}).to_parquet(tmp_path / "d.parquet")
    _fails(tmp_path / "d.parquet", r"d.parquet, row 2: 'prompt' is undecodable text \(byte 0xff at offset 0 is not UTF-8\)")


def test_invalid_json_names_the_line(tmp_path):
    good = json.dumps(PAIRS[0])
    (tmp_path / "a.jsonl").write_text(f"{good}\n{good}\n{{\"prompt\": \"a\", broken\n")
    _fails(tmp_path / "a.jsonl", r"a.jsonl, line 3: not valid JSON")
    (tmp_path / "b.json").write_text(f"[\n{good},\n{good}\n{good}\n]")
    _fails(tmp_path / "b.json", r"b.json, line 4: not valid JSON")


def test_invalid_json_is_the_only_line_shown(tmp_path, capfd, caplog):
    """`datasets` logs its own error ("Failed to load JSON from file ...", shown again by absl's handler under
    the commands) before the one line naming the file and line."""
    good = json.dumps(PAIRS[0])
    (tmp_path / "a.jsonl").write_text(f"{good}\n{good}\n{{\"prompt\": \"x\" \"response\": \"y\"}}\n")
    with caplog.at_level(logging.DEBUG):
        _fails(tmp_path / "a.jsonl", r"a.jsonl, line 3: not valid JSON")
    assert "Failed to load JSON" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records if r.name.startswith("datasets") and r.levelno >= logging.ERROR] == []


def test_bad_paths(tmp_path):
    _fails(tmp_path / "missing.jsonl", r"missing.jsonl: no such file or folder")
    (tmp_path / "data.txt").write_text("x")
    _fails(tmp_path / "data.txt", r"data.txt: unsupported data file extension '.txt'")
    _fails(str(tmp_path / "*.parquet"), r"the pattern matches no data file")
    with pytest.raises(DataError, match=r"data format 'chat' is not one of"):
        DataSpec("x.jsonl", format="chat")
    with pytest.raises(DataError, match=r"unknown data fields \['prompt_column'\]"):
        DataSpec.from_mapping({"path": "x.jsonl", "prompt_column": "q"})
    assert DataSpec.from_mapping({"path": "x.jsonl", "split": "test", "overflow": "drop", "pack": True}) == DataSpec("x.jsonl", split="test")
    assert DataSpec.from_mapping({"format": "text"}, path="y.csv") == DataSpec("y.csv", format="text")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert resolve(DataSpec("someone/some-dataset")).kind == "hub"
    _fails(DataSpec("someone/some-dataset"), r"someone/some-dataset: not a local file or folder, and the Hugging Face hub could not provide it")


def test_content_fingerprint_follows_the_bytes_wherever_the_file_lies(tmp_path, monkeypatch):
    """Files are hashed once per process while their size and modification time stay: a rewrite of the same
    length (a later modification time) is hashed again, and a copy elsewhere has the same fingerprint."""
    import hashlib
    import os
    import shutil

    data = tmp_path / "a.jsonl"
    data.write_text('{"text": "one"}\n')
    first = content_fingerprint(DataSpec(str(data)))
    assert first == {"files": [hashlib.sha256(data.read_bytes()).hexdigest()]}
    hashed = []
    monkeypatch.setattr(hashlib, "file_digest", lambda *args: hashed.append(args) or pytest.fail("hashed again"))
    assert content_fingerprint(DataSpec(str(data))) == first and not hashed  # unchanged: not read again
    monkeypatch.undo()
    (tmp_path / "copy").mkdir()
    assert content_fingerprint(DataSpec(str(shutil.copy(data, tmp_path / "copy" / "b.jsonl")))) == first
    before = data.stat().st_mtime_ns
    data.write_text('{"text": "two"}\n')
    os.utime(data, ns=(before + 1, before + 1))
    assert content_fingerprint(DataSpec(str(data))) == {"files": [hashlib.sha256(data.read_bytes()).hexdigest()]} != first
