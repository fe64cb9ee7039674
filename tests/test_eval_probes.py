"""The shipped general-knowledge probes are well formed and right; bad probe files fail naming file and line."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

import eu_jax.eval
from eu_jax.eval.probes import Probe, ProbeError, load_probes

SHIPPED = Path(eu_jax.eval.__file__).parent / "probe_data" / "general_knowledge.jsonl"
READING = re.compile(r"Read the text and answer the question\.\nText: (?P<passage>.+)\nQuestion: (?P<question>.+\?)")


def raw_rows():
    return [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]


def has_word(text: str, word: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


def test_shipped_set_loads_whole():
    probes = load_probes()
    rows = raw_rows()
    assert [p.id for p in probes] == [r["id"] for r in rows]
    assert 85 <= len(probes) <= 95
    assert len({r["id"] for r in rows}) == len(rows)
    assert Counter(r["category"] for r in rows) == {"world_facts": 40, "reading": 25, "coding": 25}
    first = probes[0]
    assert (first.prompt, first.answer, first.kind) == (rows[0]["prompt"], rows[0]["answer"], rows[0]["kind"])


def test_category_filter():
    coding = load_probes(categories=["coding"])
    assert len(coding) == 25 and {p.category for p in coding} == {"coding"}
    with pytest.raises(ProbeError, match=r"no probes of categories \['math'\]"):
        load_probes(categories=["coding", "math"])


def test_reading_answers_come_from_the_passage_not_the_question():
    for row in raw_rows():
        if row["category"] != "reading":
            continue
        parts = READING.fullmatch(row["prompt"])
        assert parts, row["id"]
        assert has_word(parts["passage"], row["answer"]), row["id"]
        assert not has_word(parts["question"], row["answer"]), row["id"]


def test_answers_are_not_given_away_by_the_prompt():
    # An echo of the question must not score: the answer is never a word of the prompt (reading passages
    # aside), and number answers are read from the first number, so their prompts hold no digits.
    for row in raw_rows():
        if row["category"] != "reading":
            assert not any(has_word(row["prompt"], a) for a in [row["answer"], *row["aliases"]]), row["id"]
        if row["kind"] == "number":
            assert not re.search(r"\d", row["prompt"]), row["id"]


def test_coding_checks_evaluate_to_the_answer():
    checked = [row for row in raw_rows() if "check" in row]
    assert len(checked) == 10
    for row in checked:
        assert row["check"] in row["prompt"], row["id"]
        assert str(eval(row["check"], {"__builtins__": {"len": len, "type": type, "bool": bool}})) == row["answer"]


def test_coding_keywords_are_python_keywords_or_builtins():
    import builtins
    import keyword

    plain = [row for row in raw_rows() if row["category"] == "coding" and "check" not in row]
    assert len(plain) == 15
    for row in plain:
        name = row["answer"]
        assert keyword.iskeyword(name) or hasattr(builtins, name) or hasattr(list, name), row["id"]


def test_probe_scores_replies():
    probe = Probe(id="x", category="world_facts", prompt="How many legs does a spider have?", answer="8",
                  kind="number", aliases=("eight",))
    assert probe.is_correct("A spider has eight legs.")
    assert probe.is_correct("8")
    assert not probe.is_correct("Six.")


GOOD = '{"id": "a", "category": "world_facts", "prompt": "Capital of Peru?", "answer": "Lima", "kind": "text"}'


@pytest.mark.parametrize("line, message", [
    ('{"id": "b", "category": "c", "prompt": "p"', r"line 2: not valid JSON"),
    ('["a list"]', r"line 2: a probe must be a JSON object"),
    ('{"id": "b", "category": "c", "prompt": "p", "kind": "text"}', r"line 2: missing field\(s\) \['answer'\]"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": "x", "kind": "date"}', r"line 2: kind 'date'"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": " ", "kind": "text"}', r"line 2: field 'answer' is empty"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": 4, "kind": "number"}', r"line 2: field 'answer' must be"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": "four", "kind": "number"}', r"line 2: .*holds no number"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": "The", "kind": "text"}', r"line 2: 'The' is empty once"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": "x", "kind": "text", "aliases": "y"}',
     r"line 2: aliases must be a list"),
    ('{"id": "b", "category": "c", "prompt": "p", "answer": "x", "kind": "text", "hint": "y"}',
     r"line 2: unknown field\(s\) \['hint'\]"),
    (GOOD, r"line 2: duplicate id 'a' \(first on line 1\)"),
])
def test_bad_probe_files_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "probes.jsonl"
    path.write_text(GOOD + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ProbeError, match=re.escape(str(path)) + ", " + message):
        load_probes(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(ProbeError, match="cannot read the probe file"):
        load_probes(tmp_path / "absent.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ProbeError, match="has no probes"):
        load_probes(tmp_path / "empty.jsonl")
