"""Out-of-domain probes: short questions outside the retain domain, to measure how broadly a model forgot.

The shipped set (probe_data/general_knowledge.jsonl, written for this project) has three categories that a
135M chat model answers in part before unlearning: "world_facts" (capitals, people, science basics),
"reading" (a short passage plus a question answered by a word of it) and "coding" (Python one-liners and
keywords). It holds no math: math is the demo's retain domain. Answers are scored by `eu_jax.eval.answers`.

A probe file is JSON lines, one object per probe: id, category, prompt, answer, kind ("text" or "number"),
and optionally aliases (other accepted answers) and check (a Python expression that evaluates to the
answer, so the tests can verify coding probes by running them).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from eu_jax.eval.answers import ANSWER_KINDS, AnswerKind, extract_number, is_correct, normalize_text

SHIPPED_PROBES = "probe_data/general_knowledge.jsonl"
_REQUIRED = ("id", "category", "prompt", "answer", "kind")
_OPTIONAL = ("aliases", "check")


class ProbeError(ValueError):
    """A bad probe file, named by file and line."""


@dataclass(frozen=True)
class Probe:
    """One question with its expected answer and how to compare replies with it."""

    id: str
    category: str
    prompt: str
    answer: str
    kind: AnswerKind
    aliases: tuple[str, ...] = ()
    check: str | None = None

    def is_correct(self, response: str) -> bool:
        """Whether a reply answers this probe (see `eu_jax.eval.answers.is_correct`)."""
        return is_correct(response, self.answer, self.kind, self.aliases)


def load_probes(path: str | Path | None = None, categories: Iterable[str] | None = None) -> list[Probe]:
    """The probes of a JSON-lines file (default: the shipped set), in file order, optionally only some
    categories; every problem is a ProbeError naming the file and line."""
    if path is None:
        source = resources.files("eu_jax.eval").joinpath(SHIPPED_PROBES)
        label = str(source)
    else:
        source, label = Path(path), str(path)
    try:
        text = source.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ProbeError(f"{label}: cannot read the probe file ({err})") from None
    probes: list[Probe] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label}, line {number}"
        probe = _parse(line, where)
        if probe.id in first_line:
            raise ProbeError(f"{where}: duplicate id '{probe.id}' (first on line {first_line[probe.id]})")
        first_line[probe.id] = number
        probes.append(probe)
    if not probes:
        raise ProbeError(f"{label}: has no probes")
    if categories is None:
        return probes
    wanted = list(categories)
    present = sorted({p.category for p in probes})
    missing = sorted(set(wanted) - set(present))
    if missing:
        raise ProbeError(f"{label}: no probes of categories {missing} (categories present: {present})")
    return [p for p in probes if p.category in wanted]


def _parse(line: str, where: str) -> Probe:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ProbeError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ProbeError(f"{where}: a probe must be a JSON object, not {type(row).__name__}")
    missing = [name for name in _REQUIRED if name not in row]
    if missing:
        raise ProbeError(f"{where}: missing field(s) {missing}")
    unknown = sorted(set(row) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:
        raise ProbeError(f"{where}: unknown field(s) {unknown} (known: {list(_REQUIRED + _OPTIONAL)})")
    for name in _REQUIRED:
        _check_text(row[name], name, where)
    if row["kind"] not in ANSWER_KINDS:
        raise ProbeError(f"{where}: kind '{row['kind']}' is not one of {ANSWER_KINDS}")
    aliases = row.get("aliases", [])
    if not isinstance(aliases, list):
        raise ProbeError(f"{where}: aliases must be a list of strings")
    for alias in aliases:
        _check_text(alias, "aliases", where)
    if row.get("check") is not None:
        _check_text(row["check"], "check", where)
    if row["kind"] == "number" and extract_number(row["answer"]) is None:
        raise ProbeError(f"{where}: kind 'number' but answer {row['answer']!r} holds no number")
    texts = [*aliases, row["answer"]] if row["kind"] == "text" else aliases
    empty = [t for t in texts if not normalize_text(t)]
    if empty:
        raise ProbeError(f"{where}: {empty[0]!r} is empty once normalised (punctuation and articles are dropped)")
    return Probe(id=row["id"], category=row["category"], prompt=row["prompt"], answer=row["answer"],
                 kind=row["kind"], aliases=tuple(aliases), check=row.get("check"))


def _check_text(value: Any, name: str, where: str) -> None:
    if not isinstance(value, str):
        raise ProbeError(f"{where}: field '{name}' must be a string, not {type(value).__name__}")
    if not value.strip():
        raise ProbeError(f"{where}: field '{name}' is empty")
