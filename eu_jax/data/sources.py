"""Retain/forget records from Hugging Face `datasets`: local files and folders, saved datasets, or the hub.

A `DataSpec` names the data (a file, a folder, a glob, a `save_to_disk` folder, or a hub name), the split
and the field mapping; `load_records` returns validated `Record`s. Local data files are loaded one file at a
time with the `datasets` builder of their extension (json for .json/.jsonl, csv, parquet, arrow), so every
error names the file and the row. Rows are counted from 1 within their file (CSV: the header is not a row);
errors found while reading the raw text (undecodable bytes, invalid JSON) name the line instead. A JSON
column that `datasets` did not read as text (rows mixing strings and numbers) is taken from the file's own
rows, so a bad row is named with the value it holds.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import functools
import glob
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

FORMATS = ("auto", "pairs", "messages", "text")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
_GLOB_CHARS = set("*?[")


class DataError(ValueError):
    """Bad data or a bad data source, named by file and row."""


@dataclass(frozen=True)
class DataSpec:
    """Where a set comes from and how its columns map to records.

    path: a data file (.json, .jsonl, .csv, .parquet, .arrow), a folder of them (the split picks files named
    by the `datasets` conventions, e.g. train.jsonl or data/train-00000-of-00002.parquet), a glob, a folder
    written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or a hub dataset name.
    split: the split of a folder, a saved DatasetDict or a hub dataset (a single file or glob is the set).
    format: "pairs" (prompt/response columns), "messages" (a chat list of {role, content}), "text" (raw
    text, scored everywhere), or "auto" (from the columns: messages, then prompt+response, then text).
    max_examples: keep only the first N rows (0: all).
    """

    path: str
    split: str = "train"
    format: str = "auto"
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    text_field: str = "text"
    max_examples: int = 0
    subset: str = ""  # hub dataset configuration name
    revision: str = ""  # hub dataset revision (a tag or commit); pin it for reproducible caches

    def __post_init__(self):
        if not self.path:
            raise DataError("data path is empty: give a file, a folder, a glob or a hub dataset name")
        if self.format not in FORMATS:
            raise DataError(f"data format '{self.format}' is not one of {FORMATS}")
        if self.max_examples < 0:
            raise DataError(f"max_examples must be >= 0, not {self.max_examples}")
        for name in ("prompt_field", "response_field", "messages_field", "text_field"):
            if not getattr(self, name):
                raise DataError(f"{name} must name a column")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], **overrides: Any) -> DataSpec:
        """From a config section (a dict or ConfigDict) plus overrides; unknown keys are errors, and the
        length-policy keys that may share the section ("overflow", "pack") are ignored."""
        values = {**dict(values), **overrides}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known - {"overflow", "pack"}
        if unknown:
            raise DataError(f"unknown data fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**{k: values[k] for k in values if k in known})


@dataclass(frozen=True)
class Record:
    """One example. Exactly one of (prompt, response), messages, text is set; `where` names file and row."""

    where: str = field(compare=False)
    prompt: str | None = None
    response: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None  # ((role, content), ...)
    text: str | None = None

    @property
    def format(self) -> str:
        return "messages" if self.messages is not None else "text" if self.text is not None else "pairs"

    def chat(self) -> list[dict[str, str]]:
        """The conversation: messages as given, a pair as one user/assistant exchange."""
        if self.messages is not None:
            return [{"role": role, "content": content} for role, content in self.messages]
        if self.text is not None:
            raise DataError(f"{self.where}: a text record is not a conversation")
        return [{"role": "user", "content": self.prompt}, {"role": "assistant", "content": self.response}]


def with_response(records: Iterable[Record], response: str) -> list[Record]:
    """The same prompts answered with `response` (the reply DPO-style terms prefer).

    Pairs keep their prompt; conversations keep every turn before their last assistant turn, which gets
    `response`; later turns are dropped. Text records have no prompt and are refused.
    """
    out = []
    for record in records:
        if record.text is not None:
            raise DataError(f"{record.where}: a text record has no prompt to pair with a preferred response")
        if record.messages is not None:
            last = max(i for i, (role, _) in enumerate(record.messages) if role == "assistant")
            out.append(dataclasses.replace(record, messages=record.messages[:last] + (("assistant", response),)))
        else:
            out.append(dataclasses.replace(record, response=response))
    return out


# ---- where the data lives --------------------------------------------------------------------------


@dataclass
class Source:
    """A resolved DataSpec: local data files, a saved dataset folder, or a hub dataset."""

    kind: str  # "files" | "saved" | "hub"
    label: str
    files: list[Path] = field(default_factory=list)
    _hub: Any = None

    def fingerprint(self, spec: DataSpec) -> dict[str, Any]:
        """What identifies the data's content: the files' SHA-256s, or hub name, revision and `datasets` fingerprint."""
        if self.kind == "hub":
            dataset = self._hub_dataset(spec)
            return {"hub": spec.path, "subset": spec.subset, "split": spec.split, "revision": spec.revision,
                    "fingerprint": getattr(dataset, "_fingerprint", None)}
        # Content only, in reading order: the same data under another name or folder is the same set.
        return {self.kind: [_file_sha256(str(path), *_size_and_mtime(path)) for path in self.files]}

    def _hub_dataset(self, spec: DataSpec):
        if self._hub is None:
            self._hub = _load_hub(spec)
        return self._hub


def _size_and_mtime(path: Path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=256)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """A file's SHA-256, hashed once per process while its size and modification time stay the same: a run's
    start fingerprints its data for the token cache and for its identity (and a workflow for its results)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def content_fingerprint(spec: DataSpec) -> dict[str, Any]:
    """What identifies the content of the data `spec` names (`Source.fingerprint`)."""
    return resolve(spec).fingerprint(spec)


def resolve(spec: DataSpec) -> Source:
    """Find the data a spec names, without reading it yet."""
    text = spec.path
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        files = [p for p in matches if p.suffix.lower() in BUILDERS]
        if not files:
            raise DataError(f"{text}: the pattern matches no data file with an extension in {sorted(BUILDERS)}")
        return Source("files", text, files)
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() not in BUILDERS:
            raise DataError(f"{path}: unsupported data file extension '{path.suffix}' (use one of {sorted(BUILDERS)})")
        return Source("files", str(path), [path])
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return Source("saved", str(path), sorted(p for p in path.rglob("*") if p.is_file()))
        return Source("files", str(path), _folder_files(path, spec.split))
    if path.is_absolute() or text.startswith(".") or path.suffix.lower() in BUILDERS or text.count("/") > 1:
        raise DataError(f"{text}: no such file or folder")
    return Source("hub", text)


def _folder_files(folder: Path, split: str) -> list[Path]:
    """The folder's data files of `split`, by the `datasets` naming conventions (all files: "train")."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(folder))
        by_split = DataFilesDict.from_patterns(patterns, base_path=str(folder))
    except Exception as err:  # EmptyDatasetError and friends
        raise DataError(f"{folder}: no data files found ({err})") from None
    splits = {str(k): [Path(p) for p in v if Path(p).suffix.lower() in BUILDERS] for k, v in by_split.items()}
    if split not in splits:
        raise DataError(f"{folder}: no split '{split}' (splits found: {sorted(splits)})")
    if not splits[split]:
        raise DataError(f"{folder}: split '{split}' has no file with an extension in {sorted(BUILDERS)}")
    return splits[split]


# ---- reading -----------------------------------------------------------------------------------------


def load_records(spec: DataSpec, source: Source | None = None) -> list[Record]:
    """Validated records of the set a spec names; errors name the file and row."""
    source = source or resolve(spec)
    # (label, loader, the JSON file whose raw rows settle a column `datasets` typed as other than text)
    if source.kind == "hub":
        tables = [(f"{spec.path} [{spec.split}]", lambda: source._hub_dataset(spec), None)]
    elif source.kind == "saved":
        tables = [(source.label, lambda: _load_saved(Path(source.label), spec.split), None)]
    else:
        tables = [(str(path), lambda path=path: _load_file(path), path if BUILDERS[path.suffix.lower()] == "json" else None)
                  for path in source.files]
    records: list[Record] = []
    fmt = spec.format
    for label, load, json_file in tables:
        if spec.max_examples and len(records) >= spec.max_examples:
            break  # later files are not even read
        dataset = load()
        if len(dataset) == 0:
            raise DataError(f"{label}: has no examples")
        fmt = _resolve_format(spec, fmt, label, dataset.column_names)
        take = len(dataset) if not spec.max_examples else min(len(dataset), spec.max_examples - len(records))
        records.extend(_records(spec, fmt, label, dataset, take, json_file))
    if not records:
        raise DataError(f"{source.label}: has no examples")
    return records


def _load_file(path: Path):
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{path}: is empty (no examples)")
    builder = BUILDERS[path.suffix.lower()]
    if builder in ("json", "csv"):  # text formats: their readers do not all check the encoding
        _check_utf8(path)
    kwargs: dict[str, Any] = {}
    if builder == "csv":  # every column as text: a response "42" stays a string, an empty cell stays ""
        kwargs = {"features": datasets.Features({c: datasets.Value("string") for c in _csv_header(path)}),
                  "keep_default_na": False}
    datasets.disable_progress_bars()
    try:
        with _datasets_logs_silenced():
            return datasets.load_dataset(builder, data_files=[str(path)], split="train", **kwargs)
    except Exception as err:  # datasets wraps the reader's error; find the line ourselves
        raise _diagnose(path, builder, err) from None


@contextlib.contextmanager
def _datasets_logs_silenced():
    """Keep `datasets`' own error logs (e.g. "Failed to load JSON from file ...", shown again through absl's
    handler) off the terminal while it reads a file: its exception still comes through, and `_diagnose` turns
    it into one line naming the file and line."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _check_utf8(path: Path) -> None:
    """Stream-decode the file; on a bad byte, name its line and column."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 24):
                decoder.decode(chunk)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        raw = path.read_bytes()  # only on failure: the whole file, for the byte's exact position
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise _undecodable(path, raw, err) from None
        raise


def _csv_header(path: Path) -> list[str]:
    with open(path, encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise DataError(f"{path}: has no header row")
    return header


def _undecodable(path: Path, raw: bytes, err: UnicodeDecodeError) -> DataError:
    line = raw.count(b"\n", 0, err.start) + 1
    column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
    return DataError(f"{path}, line {line}: undecodable text (byte 0x{raw[err.start]:02x} at column {column} is not UTF-8)")


def _diagnose(path: Path, builder: str, err: Exception) -> DataError:
    """A clear message for a file `datasets` could not read."""
    if builder in ("json", "csv"):
        text = path.read_text(encoding="utf-8")  # already checked to decode
        if not text.strip() or builder == "csv" and sum(1 for row in csv.reader(text.splitlines()) if row) <= 1:
            return DataError(f"{path}: has no examples")
        if builder == "json" and text.lstrip().startswith("["):  # one JSON array
            try:
                json.loads(text)
            except json.JSONDecodeError as bad:
                return DataError(f"{path}, line {bad.lineno}: not valid JSON ({bad.msg})")
            for number, row in enumerate(json.loads(text), start=1):
                if _invalid_unicode(row):
                    return DataError(f"{path}, row {number}: undecodable text (invalid Unicode: {_invalid_unicode(row)})")
        elif builder == "json":  # JSON lines
            for number, line in enumerate(text.splitlines(), start=1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as bad:
                        return DataError(f"{path}, line {number}: not valid JSON ({bad.msg})")
                    if _invalid_unicode(row):
                        return DataError(f"{path}, line {number}: undecodable text (invalid Unicode: {_invalid_unicode(row)})")
    elif _row_count(path, builder) == 0:
        return DataError(f"{path}: has no examples")
    if isinstance(err, StopIteration):
        return DataError(f"{path}: has no examples")
    cause = err.__cause__ or err.__context__ or err
    return DataError(f"{path}: cannot be read as {builder} ({type(cause).__name__}: {cause})")


def _invalid_unicode(value: Any) -> str:
    """The first string inside a JSON value that is not valid Unicode (a lone surrogate escape), as repr."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return repr(value)[:60]
        return ""
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next((bad for item in items if (bad := _invalid_unicode(item))), "")


def _row_count(path: Path, builder: str) -> int | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if builder == "parquet":
            return pq.ParquetFile(path).metadata.num_rows
        with pa.memory_map(str(path)) as source:
            return pa.ipc.open_stream(source).read_all().num_rows
    except Exception:
        return None


def _load_saved(folder: Path, split: str):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(folder))
    except Exception as err:
        raise DataError(f"{folder}: cannot be read as a saved dataset ({type(err).__name__}: {err})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{folder}: no split '{split}' (splits found: {sorted(loaded)})")
        return loaded[split]
    return loaded


def _load_hub(spec: DataSpec):
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(
            spec.path, spec.subset or None, split=spec.split, revision=spec.revision or None
        )
    except Exception as err:
        raise DataError(
            f"{spec.path}: not a local file or folder, and the Hugging Face hub could not provide it "
            f"({type(err).__name__}: {err}). Offline, give a local file or folder (json, jsonl, csv, parquet, "
            f"arrow, or a save_to_disk folder) instead."
        ) from None


def _resolve_format(spec: DataSpec, fmt: str, label: str, columns: list[str]) -> str:
    needs = {"messages": [spec.messages_field], "pairs": [spec.prompt_field, spec.response_field], "text": [spec.text_field]}
    if fmt == "auto":
        for candidate in ("messages", "pairs", "text"):
            if all(c in columns for c in needs[candidate]):
                return candidate
        raise DataError(
            f"{label}: cannot tell the format from the columns {columns}: expected '{spec.messages_field}' (messages), "
            f"'{spec.prompt_field}' and '{spec.response_field}' (pairs), or '{spec.text_field}' (text); "
            f"set the field names or the format in the data config"
        )
    for column in needs[fmt]:
        if column not in columns:
            raise DataError(f"{label}: no column '{column}' for format '{fmt}' (columns: {columns})")
    return fmt


def _records(spec: DataSpec, fmt: str, label: str, dataset, take: int, json_file: Path | None) -> list[Record]:
    fields = {"messages": [spec.messages_field], "pairs": [spec.prompt_field, spec.response_field], "text": [spec.text_field]}[fmt]
    columns = None
    if json_file is not None and not all(_text_only(dataset.features[name]) for name in fields):
        columns = _json_columns(json_file, fields, take, len(dataset))
    if columns is None:
        columns = _dataset_columns(dataset.select_columns(fields).select(range(take)), label, take)
    out = []
    for i in range(take):
        where = f"{label}, row {i + 1}"
        if fmt == "pairs":
            out.append(Record(where, prompt=_text(columns[fields[0]][i], fields[0], where),
                              response=_text(columns[fields[1]][i], fields[1], where)))
        elif fmt == "text":
            out.append(Record(where, text=_text(columns[fields[0]][i], fields[0], where)))
        else:
            out.append(Record(where, messages=_messages(columns[fields[0]][i], fields[0], where)))
    return out


def _dataset_columns(table, label: str, take: int) -> dict[str, list]:
    try:
        return table.to_dict()
    except UnicodeDecodeError:  # bytes in a string column that are not UTF-8: find the row
        for i in range(take):
            try:
                table[i]
            except UnicodeDecodeError as err:
                raise DataError(f"{label}, row {i + 1}: undecodable text (not UTF-8: {err.reason})") from None
        raise


def _text_only(feature: Any) -> bool:
    """Whether a column's `datasets` feature holds strings only (inside lists and objects too). A JSON column
    typed otherwise may mix types across rows, which `datasets` settles by converting values ("000" -> 0)."""
    if isinstance(feature, dict):
        return all(_text_only(inner) for inner in feature.values())
    if isinstance(feature, list):
        return all(_text_only(inner) for inner in feature)
    if hasattr(feature, "feature"):  # List, LargeList, Sequence
        return _text_only(feature.feature)
    return getattr(feature, "dtype", None) in ("string", "large_string")


def _json_columns(path: Path, fields: list[str], take: int, rows_loaded: int) -> dict[str, list] | None:
    """The fields' first `take` values as the JSON file has them, so a bad row is named with its own value;
    None where the file's rows are not the `rows_loaded` objects of a JSON array or of JSON lines."""
    text = path.read_text(encoding="utf-8")
    try:
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return None
    if len(rows) != rows_loaded or not all(isinstance(row, dict) for row in rows):
        return None
    return {name: [row.get(name) for row in rows[:take]] for name in fields}


def _text(value: Any, name: str, where: str) -> str:
    if value is None:
        raise DataError(f"{where}: '{name}' is missing (null)")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where}: '{name}' is undecodable text (byte 0x{value[err.start]:02x} at offset {err.start} is not UTF-8)") from None
    if not isinstance(value, str):
        raise DataError(f"{where}: '{name}' must be a string, not {type(value).__name__} ({value!r:.60})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise DataError(f"{where}: '{name}' is undecodable text (invalid Unicode {value[err.start]!r} at offset {err.start})") from None
    return value


def _messages(value: Any, name: str, where: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        raise DataError(f"{where}: '{name}' is missing (null)")
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: '{name}' must be a list of {{role, content}} messages, not {type(value).__name__}")
    if not value:
        raise DataError(f"{where}: '{name}' is an empty conversation")
    out = []
    for number, message in enumerate(value, start=1):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}: message {number} of '{name}' must be a {{role, content}} object, not {type(message).__name__}")
        role = _text(message.get("role"), f"{name}[{number}].role", where)
        content = _text(message.get("content"), f"{name}[{number}].content", where)
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        roles = ", ".join(role for role, _ in out)
        raise DataError(f"{where}: the conversation has no assistant turn (roles: {roles}), so nothing would be trained on")
    return tuple(out)
