"""Retain-domain math files: deterministic, disjoint, correctly labelled, reused only when nothing changed."""

import json
import re
from fractions import Fraction

import pytest

from eu_jax.data.domains import DomainError, MathDomain, write_math_domain

SMALL = MathDomain(train_size=300, heldout_size=60, seed=3)
QUESTION = re.compile(r"Calculate (?P<expr>.+)\. Answer with the number only\.")
ARITHMETIC_CHARS = re.compile(r"[\d\s+\-*/()]+")


def read_rows(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def exact_value(expression: str) -> Fraction:
    """Python's own evaluation of the question's expression, every integer made an exact Fraction."""
    assert ARITHMETIC_CHARS.fullmatch(expression), expression
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


def question_key(prompt: str) -> str:
    return "".join(prompt.lower().split())


def test_files_are_deterministic_and_shaped(tmp_path):
    first = write_math_domain(SMALL, tmp_path / "a")
    second = write_math_domain(SMALL, tmp_path / "b")
    for name in ("train", "heldout", "domain"):
        assert first[name].read_bytes() == second[name].read_bytes()
    train, heldout = read_rows(first["train"]), read_rows(first["heldout"])
    assert (len(train), len(heldout)) == (300, 60)
    for row in train + heldout:
        assert set(row) == {"prompt", "response", "answer"}
        assert row["response"] == row["answer"]
    other_seed = write_math_domain(MathDomain(train_size=300, heldout_size=60, seed=4), tmp_path / "c")
    assert other_seed["heldout"].read_bytes() != first["heldout"].read_bytes()


def test_splits_are_disjoint_and_free_of_duplicates(tmp_path):
    paths = write_math_domain(SMALL, tmp_path)
    train = {question_key(r["prompt"]) for r in read_rows(paths["train"])}
    heldout = {question_key(r["prompt"]) for r in read_rows(paths["heldout"])}
    assert len(train) == 300 and len(heldout) == 60
    assert not train & heldout


@pytest.mark.parametrize("task_kwargs, mislabelled", [
    ({}, 0),  # the easy default: "Calculate 57 - 83."
    # Nested divisions: this stream holds 2 items that reasoning-gym labels by floor division.
    ({"max_terms": 4, "operators": ["+", "-", "*", "/"], "allow_parentheses": True, "allow_negation": True}, 2),
])
def test_arithmetic_answers_are_the_exact_values(tmp_path, task_kwargs, mislabelled):
    domain = MathDomain(train_size=400, heldout_size=100, seed=1, task_kwargs=task_kwargs)
    paths = write_math_domain(domain, tmp_path)
    assert json.loads(paths["domain"].read_text())["counts"]["mislabelled_dropped"] == mislabelled
    for row in read_rows(paths["train"]) + read_rows(paths["heldout"]):
        match = QUESTION.fullmatch(row["prompt"])
        assert match, row["prompt"]
        assert exact_value(match["expr"]) == int(row["answer"]), row


def test_default_difficulty_is_two_small_terms(tmp_path):
    paths = write_math_domain(SMALL, tmp_path)
    for row in read_rows(paths["train"]):
        numbers = re.findall(r"\d+", QUESTION.fullmatch(row["prompt"])["expr"])
        assert len(numbers) == 2 and all(int(n) <= 100 for n in numbers), row["prompt"]


def test_gsm_symbolic_keeps_question_and_integer_answer(tmp_path):
    paths = write_math_domain(MathDomain(task="gsm_symbolic", train_size=40, heldout_size=10, instruction="Number only."),
                              tmp_path)
    for row in read_rows(paths["train"]) + read_rows(paths["heldout"]):
        assert row["prompt"].endswith("Do not include units. Number only.")
        assert re.fullmatch(r"-?\d+", row["answer"]), row


def test_heldout_and_train_are_reused_untouched(tmp_path):
    paths = write_math_domain(SMALL, tmp_path)
    before = {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in paths.items()}
    again = write_math_domain(MathDomain(train_size=300, heldout_size=60, seed=3), tmp_path)
    assert again == paths
    assert {name: (p.stat().st_ino, p.stat().st_mtime_ns) for name, p in again.items()} == before


def test_changed_settings_or_damaged_files_regenerate(tmp_path):
    paths = write_math_domain(SMALL, tmp_path)
    original = paths["train"].read_bytes()
    write_math_domain(MathDomain(train_size=300, heldout_size=60, seed=3, task_kwargs={"max_digits": 3}), tmp_path)
    meta = json.loads(paths["domain"].read_text())
    assert meta["settings"]["task_kwargs"]["max_digits"] == 3
    assert paths["train"].read_bytes() != original

    write_math_domain(SMALL, tmp_path)
    assert paths["train"].read_bytes() == original
    paths["train"].write_text("tampered\n")
    write_math_domain(SMALL, tmp_path)
    assert paths["train"].read_bytes() == original


def test_provenance_records_settings_and_counts(tmp_path):
    paths = write_math_domain(SMALL, tmp_path)
    meta = json.loads(paths["domain"].read_text())
    assert meta["settings"]["task"] == "basic_arithmetic" and meta["settings"]["seed"] == 3
    counts = meta["counts"]
    assert (counts["train"], counts["heldout"]) == (300, 60)
    assert counts["tries"] == 360 + counts["duplicates_dropped"] + counts["mislabelled_dropped"]


def test_too_small_a_task_is_a_clear_error(tmp_path):
    one_digit = MathDomain(train_size=300, heldout_size=60, task_kwargs={"max_digits": 1})  # 242 distinct
    with pytest.raises(DomainError, match="distinct questions"):
        write_math_domain(one_digit, tmp_path)
    assert not (tmp_path / "domain.json").exists()


def test_bad_settings_are_refused():
    with pytest.raises(DomainError, match="not one of"):
        MathDomain(task="chess")
    with pytest.raises(DomainError, match="heldout_size must be an integer >= 1, not 0"):
        MathDomain(heldout_size=0)
    with pytest.raises(DomainError, match="train_size must be an integer >= 1, not '10'"):
        MathDomain(train_size="10")
    with pytest.raises(DomainError, match="seed"):
        MathDomain(task_kwargs={"seed": 1})
    with pytest.raises(DomainError, match="operator precedence"):
        MathDomain(task_kwargs={"max_terms": 3, "operators": ["+", "*"]})
    with pytest.raises(DomainError, match="unknown math domain fields"):
        MathDomain.from_mapping({"tsk": "gsm_symbolic"})


def test_unknown_task_kwargs_name_the_task(tmp_path):
    with pytest.raises(DomainError, match=r"\['max_digit'\] are not settings of reasoning-gym's basic_arithmetic"):
        write_math_domain(MathDomain(task_kwargs={"max_digit": 3}), tmp_path)


def test_from_a_config_section():
    import ml_collections

    section = ml_collections.ConfigDict({"train_size": 50, "heldout_size": 10, "task_kwargs": {"max_digits": 3}})
    domain = MathDomain.from_mapping(section)
    assert domain == MathDomain(train_size=50, heldout_size=10, task_kwargs={"max_digits": 3})
    assert domain.resolved_task_kwargs()["max_digits"] == 3 and domain.resolved_task_kwargs()["max_terms"] == 2
