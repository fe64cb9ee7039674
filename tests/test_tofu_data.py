"""TOFU-style sets: the fictitious-author generator, the split by author, the shipped real-world sets, the
JSON-lines files the training pipeline reads, and the hub path's offline error."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from eu_jax.data import DataSpec, load_records, with_response
from eu_jax.data.tofu import (
    PERTURBED_PER_ITEM,
    QUESTIONS_PER_AUTHOR,
    TofuError,
    TofuItem,
    author_items,
    fictitious_benchmark,
    generate_authors,
    hub_benchmark,
    load_benchmark,
    load_items,
    shipped_set,
    split_authors,
    write_benchmark,
)


def test_generator_is_deterministic_for_a_seed_and_differs_across_seeds():
    first, again, other = fictitious_benchmark(seed=3), fictitious_benchmark(seed=3), fictitious_benchmark(seed=4)
    assert first == again
    assert first.forget != other.forget and first.retain != other.retain
    authors = generate_authors(50, seed=3)
    assert len({a.name for a in authors}) == 50
    assert len({title for a in authors for title in (a.best_known_book, a.first_book)}) == 100


def test_forget_and_retain_are_split_by_author_with_the_right_sizes():
    authors = generate_authors(50, seed=0)
    forget, retain = split_authors(authors, 0.1)
    assert len(forget) == 5 and len(retain) == 45
    assert {a.name for a in forget}.isdisjoint(a.name for a in retain)
    assert {a.name for a in forget} | {a.name for a in retain} == {a.name for a in authors}
    smaller, _ = split_authors(authors, 0.05)
    assert len(smaller) == 2 and set(smaller) <= set(forget)  # forget05 inside forget10, as in TOFU

    benchmark = fictitious_benchmark(seed=0, num_authors=50, forget_fraction=0.1)
    assert len(benchmark.forget) == 5 * QUESTIONS_PER_AUTHOR == 50 and len(benchmark.retain) == 450
    assert list(benchmark.forget) == [item for a in forget for item in author_items(a, seed=0)]
    forget_names = {a.name for a in forget}
    assert not any(name in item.question for item in benchmark.retain for name in forget_names)
    assert {item.question for item in benchmark.forget}.isdisjoint(item.question for item in benchmark.retain)

    assert len(split_authors(generate_authors(200), 0.01)[0]) == 2  # TOFU's forget01: 2 of 200 authors
    with pytest.raises(TofuError, match="forget_fraction 0.01 of 50 authors"):
        split_authors(authors, 0.01)  # half an author
    with pytest.raises(TofuError, match="num_authors must be at least 2"):
        generate_authors(1)
    with pytest.raises(TofuError, match="num_authors must be at most 200"):
        generate_authors(201)


def _facts(author) -> list[str]:
    values = [v for f in dataclasses.fields(author) if f.name != "name" for v in
              (getattr(author, f.name) if f.name == "themes" else [getattr(author, f.name)])]
    return [str(v) for v in values]


def _found(facts: list[str], text: str) -> set[str]:
    return {fact for fact in facts if re.search(rf"(?<!\w){re.escape(fact)}(?!\w)", text)}


def test_paraphrases_keep_the_facts_and_perturbed_answers_change_them():
    for author in generate_authors(12, seed=5):
        facts = _facts(author)
        items = author_items(author, seed=5)
        assert len(items) == QUESTIONS_PER_AUTHOR
        assert _found(facts, " ".join(item.answer for item in items)) == set(facts)  # every fact is asked about
        for item in items:
            stated = _found(facts, item.answer)
            assert stated and author.name in item.question
            assert item.paraphrased_answer != item.answer and _found(facts, item.paraphrased_answer) == stated
            assert len(set(item.perturbed_answers)) == PERTURBED_PER_ITEM
            for wrong in item.perturbed_answers:
                assert wrong != item.answer and author.name in wrong
                assert not _found(facts, wrong) & stated, (item.answer, wrong)  # every fact replaced


def test_shipped_real_world_sets():
    for name in ("real_authors", "world_facts"):
        items = shipped_set(name)
        assert len(items) >= 40 and len({item.question for item in items}) == len(items)
        for item in items:
            assert item.paraphrased_answer == item.answer  # TOFU scores these sets' answer as the "paraphrase"
            assert len(item.perturbed_answers) >= 3 and item.answer not in item.perturbed_answers
    with pytest.raises(TofuError, match="no shipped TOFU set 'trivia'"):
        shipped_set("trivia")


def test_written_files_feed_the_training_pipeline_and_load_back(tmp_path):
    benchmark = fictitious_benchmark(seed=1, num_authors=20, forget_fraction=0.1)
    paths = write_benchmark(benchmark, tmp_path / "tofu")
    assert set(paths) == {"forget", "retain", "full", "real_authors", "world_facts"}
    for name, items in (("forget", benchmark.forget), ("retain", benchmark.retain),
                        ("full", benchmark.retain + benchmark.forget)):
        records = load_records(DataSpec(path=str(paths[name]), format="pairs"))
        assert [(r.prompt, r.response) for r in records] == [(i.question, i.answer) for i in items]
    auto = load_records(DataSpec(path=str(paths["forget"])))  # format "auto" finds the pairs too
    assert auto[0].format == "pairs"
    # IdK-DPO pairs every forget prompt with the config's preferred (refusal) answer.
    preferred = with_response(auto, "I don't know.")
    assert [r.prompt for r in preferred] == [i.question for i in benchmark.forget]
    assert {r.response for r in preferred} == {"I don't know."}
    assert load_benchmark(tmp_path / "tofu") == benchmark
    assert not list((tmp_path / "tofu").glob("*.tmp"))


def test_bad_item_files_name_the_file_and_line(tmp_path):
    path = tmp_path / "set.jsonl"
    good = {"prompt": "Q?", "response": "A.", "perturbed_responses": ["B."]}
    path.write_text(json.dumps(good) + "\n" + json.dumps({"prompt": "Q?", "response": "A."}) + "\n")
    with pytest.raises(TofuError, match=r"set.jsonl, line 2: 'perturbed_responses' is missing"):
        load_items(path)
    path.write_text(json.dumps(good | {"perturbed_responses": ["B.", 3]}) + "\n")
    with pytest.raises(TofuError, match=r"line 1: every question and answer must be a non-empty string, not 3"):
        load_items(path)
    path.write_text("\n")
    with pytest.raises(TofuError, match="has no items"):
        load_items(path)


def test_hub_path_offline_says_how_to_use_the_offline_set():
    with pytest.raises(TofuError) as caught:
        hub_benchmark("forget05")
    message = str(caught.value)
    assert message.startswith("the Hugging Face hub is unreachable, so locuslab/TOFU (forget05_perturbed) cannot be loaded")
    assert "fictitious_benchmark(seed=0)" in message and "\n" not in message
    with pytest.raises(TofuError, match="forget split 'forget20' is not one of"):
        hub_benchmark("forget20")


def test_hub_rows_map_tofu_fields(monkeypatch):
    """TOFU's columns (question, answer, paraphrased_answer, perturbed_answer) on rows shaped like the hub's."""
    import datasets

    asked = []

    def fake_load_dataset(name, config, split, revision):
        asked.append((name, config, split, revision))
        row = {"question": f"Q {config}?", "answer": "A.", "perturbed_answer": ["B.", "C."]}
        if config.startswith(("forget", "retain")):  # only TOFU's fictitious sets have paraphrases
            row["paraphrased_answer"] = "A, reworded."
        return [row]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    benchmark = hub_benchmark("forget01", revision="v1")
    assert [config for _, config, _, _ in asked] == [
        "forget01_perturbed", "retain_perturbed", "real_authors_perturbed", "world_facts_perturbed"]
    assert {(name, split, revision) for name, _, split, revision in asked} == {("locuslab/TOFU", "train", "v1")}
    assert benchmark.forget[0] == TofuItem("Q forget01_perturbed?", "A.", "A, reworded.", ("B.", "C."))
    assert benchmark.real_authors[0] == TofuItem("Q real_authors_perturbed?", "A.", "A.", ("B.", "C."))
