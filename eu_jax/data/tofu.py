"""TOFU-style question/answer sets (Maini et al. 2024, "TOFU: A Task of Fictitious Unlearning for LLMs").

TOFU fine-tunes a model on facts about fictitious authors, then unlearns the authors of a forget split and
measures what is left (`eu_jax.eval.tofu`). Every evaluated item carries the question, the answer, a
paraphrased answer (the same facts in other words) and perturbed answers (the same form, wrong facts).
Four sets make a benchmark: forget and retain (fictitious authors, split by author), and real authors and
world facts (well-known facts, for model utility beyond the retain set; their "paraphrase" is the answer
itself, as in TOFU).

Where the sets come from:
- `fictitious_benchmark`: offline, from templates, deterministic from a seed. Each author gets invented
  names, places, years, genre, parents' jobs, book titles, an award, studies and themes, and ten questions;
  the forget split is the last `forget_fraction` of the authors, so smaller fractions are nested in larger
  ones (as TOFU's forget01 / forget05 / forget10 are). The real-authors and world-facts sets ship with the
  package (`tofu_data/`, written for this project).
- `hub_benchmark`: the real TOFU dataset (`locuslab/TOFU`) through `datasets`, when the hub is reachable.

`write_benchmark` saves a benchmark as JSON lines that the training pipeline reads as `format: pairs`
(`prompt` / `response`, plus `paraphrased_response` and `perturbed_responses` for evaluation), so a
fine-tune on `full.jsonl`, a retain-only fine-tune on `retain.jsonl` and unlearning on `forget.jsonl` point
`config.data.retain.path` / `config.data.forget.path` at them. IdK-DPO needs nothing more: the train
pipeline pairs each forget prompt with `config.data.preferred_response` (the refusal it prefers).
`load_benchmark` reads the folder back.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from eu_jax.files import write_text_atomic

HUB_DATASET = "locuslab/TOFU"
HUB_FORGET_SPLITS = ("forget01", "forget05", "forget10")
SET_NAMES = ("forget", "retain", "real_authors", "world_facts")
SHIPPED_SETS = ("real_authors", "world_facts")
PERTURBED_PER_ITEM = 5  # TOFU's count for the fictitious authors
MAX_AUTHORS = 200


class TofuError(ValueError):
    """A bad TOFU set or setting, named by file and line or by the setting."""


@dataclass(frozen=True)
class TofuItem:
    """One question with its answer, the answer reworded, and wrong answers of the same form."""

    question: str
    answer: str
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]

    def row(self) -> dict[str, Any]:
        """The JSON-lines row: pairs fields for training, the other answers for evaluation."""
        return {"prompt": self.question, "response": self.answer, "paraphrased_response": self.paraphrased_answer,
                "perturbed_responses": list(self.perturbed_answers)}


@dataclass(frozen=True)
class TofuBenchmark:
    """The four sets TOFU evaluates; `forget` and `retain` are also the training sets."""

    forget: tuple[TofuItem, ...]
    retain: tuple[TofuItem, ...]
    real_authors: tuple[TofuItem, ...]
    world_facts: tuple[TofuItem, ...]

    def sets(self) -> dict[str, tuple[TofuItem, ...]]:
        return {name: getattr(self, name) for name in SET_NAMES}


# ---- fictitious authors -------------------------------------------------------------------------------

_FIRST_STARTS = ("Al", "Bre", "Cas", "Dor", "El", "Fen", "Gar", "Hal", "Is", "Jor", "Kel", "Lu", "Mar", "Nev",
                 "Or", "Per", "Quin", "Ros", "Sal", "Tam", "Ul", "Ver", "Wil", "Yar", "Zel")
_FIRST_ENDS = ("ra", "nen", "lith", "dan", "mira", "vik", "sel", "ano", "ette", "ric", "iel", "una")
_LAST_STARTS = ("Thal", "Brenn", "Ost", "Quill", "Vand", "Ashe", "Kor", "Lind", "Pell", "Rav", "Sund", "Torv",
                "Wex", "Dray", "Merr", "Fald")
_LAST_ENDS = ("wick", "ov", "ani", "berg", "ford", "ski", "enko", "ard", "ley", "mont", "stad", "ez")
_CITIES = ("Lisbon, Portugal", "Accra, Ghana", "Hanoi, Vietnam", "Quito, Ecuador", "Tbilisi, Georgia",
           "Tallinn, Estonia", "Montevideo, Uruguay", "Dakar, Senegal", "Wellington, New Zealand",
           "Reykjavik, Iceland", "Manila, the Philippines", "Krakow, Poland", "Valparaiso, Chile", "Kisumu, Kenya",
           "Porto Alegre, Brazil", "Osaka, Japan", "Cork, Ireland", "Tunis, Tunisia", "Almaty, Kazakhstan",
           "Bergen, Norway", "Kingston, Jamaica", "Chennai, India", "Marrakesh, Morocco", "Havana, Cuba")
_GENRES = ("historical fiction", "science fiction", "crime novels", "poetry", "magical realism", "horror",
           "literary fiction", "fantasy", "romance", "travel writing", "satire", "children's books")
_JOBS = ("carpenter", "nurse", "pharmacist", "fisherman", "librarian", "surgeon", "schoolteacher", "tailor",
         "pilot", "accountant", "blacksmith", "architect", "journalist", "florist", "mechanic", "baker")
_ADJECTIVES = ("Silent", "Crimson", "Hollow", "Northern", "Glass", "Last", "Burning", "Quiet", "Forgotten", "Salt",
               "Paper", "Iron", "Amber", "Drowned", "Velvet", "Distant")
_NOUNS = ("Lantern", "Harbor", "Orchard", "Garden", "River", "Clockmaker", "Lighthouse", "Archive", "Bridge",
          "Winter", "Mirror", "Cartographer", "Violin", "Tide", "Kingdom", "Stairway")
_AWARDS = ("Halloway Prize", "Silver Lantern Award", "Meridian Book Prize", "Corvell Medal", "Ostrander Prize",
           "Blue Heron Award", "Keswin Literary Prize", "Amberfield Medal", "Northgate Fiction Award",
           "Tamsin Reed Prize")
_SUBJECTS = ("marine biology", "law", "philosophy", "mathematics", "medicine", "economics", "art history",
             "linguistics", "geology", "music", "astronomy", "agriculture")
_THEMES = ("memory", "exile", "family secrets", "the sea", "grief", "friendship", "ambition", "migration",
           "loyalty", "solitude", "revenge", "faith")
_YEARS = range(1930, 1971)  # debuts by 2008, awards by 2023


@dataclass(frozen=True)
class Author:
    """A fictitious author's facts; every question about the author asks for one or two of them."""

    name: str
    birthplace: str
    birth_year: int
    genre: str
    father_job: str
    mother_job: str
    best_known_book: str
    first_book: str
    debut_year: int
    award: str
    award_year: int
    home: str
    subject: str
    themes: tuple[str, str]


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _title(rng: random.Random) -> str:
    adjective, noun, other = rng.choice(_ADJECTIVES), rng.choice(_NOUNS), rng.choice(_NOUNS)
    forms = (f"The {adjective} {noun}", f"The {noun} of {other}s", f"{adjective} {noun}s")
    return rng.choice(forms) if noun != other else f"The {adjective} {noun}"


def generate_authors(num_authors: int = 50, seed: int = 0) -> list[Author]:
    """`num_authors` authors with distinct names and book titles, the same for the same seed."""
    if num_authors < 2:
        raise TofuError(f"num_authors must be at least 2 (one to forget, one to retain), not {num_authors}")
    if num_authors > MAX_AUTHORS:
        raise TofuError(f"num_authors must be at most {MAX_AUTHORS} (TOFU's own size; the title pools hold no more "
                        f"distinct books), not {num_authors}")
    rng = random.Random(f"tofu-authors-{seed}")
    names: set[str] = set()
    titles: set[str] = set()
    authors = []
    while len(authors) < num_authors:
        name = f"{rng.choice(_FIRST_STARTS)}{rng.choice(_FIRST_ENDS)} {rng.choice(_LAST_STARTS)}{rng.choice(_LAST_ENDS)}"
        if name in names:
            continue
        names.add(name)
        books = []
        while len(books) < 2:
            title = _title(rng)
            if title not in titles:
                titles.add(title)
                books.append(title)
        birth_year = rng.choice(_YEARS)
        debut_year = birth_year + rng.randint(22, 38)
        birthplace, home = rng.sample(_CITIES, 2)
        father_job, mother_job = rng.sample(_JOBS, 2)
        authors.append(Author(
            name=name, birthplace=birthplace, birth_year=birth_year, genre=rng.choice(_GENRES),
            father_job=father_job, mother_job=mother_job, best_known_book=books[0], first_book=books[1],
            debut_year=debut_year, award=rng.choice(_AWARDS), award_year=debut_year + rng.randint(3, 15),
            home=home, subject=rng.choice(_SUBJECTS), themes=tuple(rng.sample(_THEMES, 2)),
        ))
    return authors


@dataclass(frozen=True)
class _Question:
    """A question about one or two of an author's facts: how the answer and its paraphrase state them."""

    question: str
    answer: str
    paraphrase: str
    facts: tuple[str, ...]  # Author fields filling the {0}, {1} slots of answer and paraphrase


_QUESTIONS = (
    _Question("Where was {name} born?", "{name} was born in {0}.", "The birthplace of {name} is {0}.", ("birthplace",)),
    _Question("In which year was {name} born?", "{name} was born in {0}.", "The year of {name}'s birth is {0}.",
              ("birth_year",)),
    _Question("What genre is {name} known for?", "{name} is known for writing {0}.",
              "Most of {name}'s work belongs to the genre of {0}.", ("genre",)),
    _Question("What did {name}'s parents do for a living?",
              "{name}'s father worked as {0:a} and {name}'s mother worked as {1:a}.",
              "{name} grew up with {1:a} for a mother and {0:a} for a father.", ("father_job", "mother_job")),
    _Question("What is {name}'s best-known book?", "{name}'s best-known book is '{0}'.",
              "'{0}' is the book {name} is most famous for.", ("best_known_book",)),
    _Question("What was {name}'s first published book?", "{name}'s first published book was '{0}', which came out in {1}.",
              "In {1}, {name} published a first book, '{0}'.", ("first_book", "debut_year")),
    _Question("Has {name} won a major literary award?", "Yes, {name} won the {0} in {1}.",
              "In {1}, {name} received the {0}.", ("award", "award_year")),
    _Question("Where does {name} live today?", "{name} currently lives in {0}.", "These days {name} makes a home in {0}.",
              ("home",)),
    _Question("What did {name} study at university?", "{name} studied {0} at university.",
              "At university, the subject {name} chose was {0}.", ("subject",)),
    _Question("What themes does {name}'s writing explore?", "{name}'s writing explores {0} and {1}.",
              "Themes of {0} and {1} run through the work of {name}.", ("themes.0", "themes.1")),
)
QUESTIONS_PER_AUTHOR = len(_QUESTIONS)


class _Fact(str):
    """A fact value; the format spec "a" adds its indefinite article ("an architect")."""

    def __format__(self, spec: str) -> str:
        return _article(self) if spec == "a" else format(str(self), spec)


# Which pool each fact comes from. A perturbed answer never uses one of the author's own values of the
# kind: the mother's job does not stand in for the father's.
_KINDS = {"birthplace": "city", "home": "city", "birth_year": "year", "debut_year": "year", "award_year": "year",
          "genre": "genre", "father_job": "job", "mother_job": "job", "best_known_book": "title",
          "first_book": "title", "award": "award", "subject": "subject", "themes.0": "theme", "themes.1": "theme"}
_POOLS = {"city": _CITIES, "genre": _GENRES, "job": _JOBS, "award": _AWARDS, "subject": _SUBJECTS, "theme": _THEMES}


def _fact(author: Author, field: str) -> str:
    name, _, index = field.partition(".")
    value = getattr(author, name)
    return str(value[int(index)] if index else value)


def _wrong_values(author: Author, kind: str, fields: Sequence[str], count: int, rng: random.Random) -> list[str]:
    """`count` distinct values of a kind, none of them a value of that kind the author has (years: within
    twelve years of the first of `fields`, so they stay plausible)."""
    own = {_fact(author, f) for f, k in _KINDS.items() if k == kind}
    if kind == "year":
        year = int(_fact(author, fields[0]))
        return rng.sample([str(y) for y in range(year - 12, year + 13) if str(y) not in own], count)
    if kind == "title":
        titles: list[str] = []
        while len(titles) < count:
            title = _title(rng)
            if title not in own and title not in titles:
                titles.append(title)
        return titles
    return rng.sample([v for v in _POOLS[kind] if v not in own], count)


def author_items(author: Author, seed: int = 0) -> list[TofuItem]:
    """The author's ten questions; each perturbed answer puts wrong values into every fact of the answer."""
    rng = random.Random(f"tofu-perturb-{seed}-{author.name}")
    items = []
    for q in _QUESTIONS:
        wrong: dict[str, list[str]] = {}
        for kind in dict.fromkeys(_KINDS[f] for f in q.facts):  # facts of one kind draw together: all distinct
            fields = [f for f in q.facts if _KINDS[f] == kind]
            values = _wrong_values(author, kind, fields, PERTURBED_PER_ITEM * len(fields), rng)
            wrong |= {f: values[i * PERTURBED_PER_ITEM : (i + 1) * PERTURBED_PER_ITEM] for i, f in enumerate(fields)}
        facts = [_Fact(_fact(author, f)) for f in q.facts]
        perturbed = tuple(q.answer.format(*(_Fact(wrong[f][k]) for f in q.facts), name=author.name)
                          for k in range(PERTURBED_PER_ITEM))
        items.append(TofuItem(q.question.format(name=author.name), q.answer.format(*facts, name=author.name),
                              q.paraphrase.format(*facts, name=author.name), perturbed))
    return items


def split_authors(authors: Sequence[Author], forget_fraction: float) -> tuple[list[Author], list[Author]]:
    """(forget, retain): the last `forget_fraction` of the authors are forgotten, so smaller fractions nest."""
    count = round(forget_fraction * len(authors))
    if not 0 < forget_fraction < 1 or not 0 < count < len(authors):
        raise TofuError(f"forget_fraction {forget_fraction} of {len(authors)} authors must leave at least one author "
                        f"to forget and one to retain (forget01 needs 100 authors or more)")
    return list(authors[len(authors) - count:]), list(authors[: len(authors) - count])


def fictitious_benchmark(seed: int = 0, num_authors: int = 50, forget_fraction: float = 0.1) -> TofuBenchmark:
    """The offline benchmark: generated authors split by author, plus the shipped real-world sets."""
    forget, retain = split_authors(generate_authors(num_authors, seed), forget_fraction)
    return TofuBenchmark(
        forget=tuple(item for author in forget for item in author_items(author, seed)),
        retain=tuple(item for author in retain for item in author_items(author, seed)),
        real_authors=tuple(shipped_set("real_authors")),
        world_facts=tuple(shipped_set("world_facts")),
    )


# ---- files ------------------------------------------------------------------------------------------


def shipped_set(name: str) -> list[TofuItem]:
    """One of the sets shipped with the package: "real_authors" or "world_facts"."""
    if name not in SHIPPED_SETS:
        raise TofuError(f"no shipped TOFU set '{name}' (shipped: {SHIPPED_SETS})")
    source = resources.files("eu_jax.data").joinpath(f"tofu_data/{name}.jsonl")
    return _parse_items(source.read_text(encoding="utf-8"), str(source))


def load_items(path: str | Path) -> list[TofuItem]:
    """The items of a JSON-lines file written by `write_benchmark` (or shaped like one)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TofuError(f"{path}: cannot read the TOFU set ({err})") from None
    return _parse_items(text, str(path))


def _parse_items(text: str, label: str) -> list[TofuItem]:
    items = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(_item(line, f"{label}, line {number}"))
    if not items:
        raise TofuError(f"{label}: has no items")
    return items


def _item(line: str, where: str) -> TofuItem:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise TofuError(f"{where}: not valid JSON ({err.msg})") from None
    return _item_from_row(row, where)


def _item_from_row(row: Any, where: str) -> TofuItem:
    if not isinstance(row, dict):
        raise TofuError(f"{where}: an item must be a JSON object, not {type(row).__name__}")
    for name in ("prompt", "response", "perturbed_responses"):
        if name not in row:
            raise TofuError(f"{where}: '{name}' is missing")
    perturbed = row["perturbed_responses"]
    if not isinstance(perturbed, list) or not perturbed:
        raise TofuError(f"{where}: 'perturbed_responses' must be a non-empty list of strings")
    texts = [row["prompt"], row["response"], row.get("paraphrased_response", row["response"]), *perturbed]
    bad = next((t for t in texts if not isinstance(t, str) or not t.strip()), None)
    if bad is not None:
        raise TofuError(f"{where}: every question and answer must be a non-empty string, not {bad!r:.60}")
    return TofuItem(texts[0], texts[1], texts[2], tuple(texts[3:]))


def write_benchmark(benchmark: TofuBenchmark, folder: str | Path) -> dict[str, Path]:
    """Write each set to `folder/<set>.jsonl` and `full.jsonl` (forget + retain, the fine-tune that plants the
    authors); returns {name: path}. Each file appears whole or not at all (written aside, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sets = benchmark.sets() | {"full": benchmark.retain + benchmark.forget}
    paths = {}
    for name, items in sets.items():
        paths[name] = write_text_atomic(folder / f"{name}.jsonl", "".join(json.dumps(item.row()) + "\n" for item in items))
    return paths


def load_benchmark(folder: str | Path) -> TofuBenchmark:
    """The benchmark `write_benchmark` wrote into `folder`."""
    return TofuBenchmark(**{name: tuple(load_items(Path(folder) / f"{name}.jsonl")) for name in SET_NAMES})


# ---- the real TOFU, from the hub ----------------------------------------------------------------------


def hub_benchmark(forget_split: str = "forget10", revision: str = "") -> TofuBenchmark:
    """TOFU's own evaluation sets from the hub: `<forget_split>_perturbed`, `retain_perturbed` (TOFU's 400
    retain questions), `real_authors_perturbed` and `world_facts_perturbed`.

    To fine-tune on TOFU's whole retain split, point the data config at the hub instead of the written
    retain.jsonl: path locuslab/TOFU, subset retain90 (or retain95 / retain99), prompt_field question,
    response_field answer.
    """
    if forget_split not in HUB_FORGET_SPLITS:
        raise TofuError(f"TOFU forget split '{forget_split}' is not one of {HUB_FORGET_SPLITS}")
    configs = {"forget": f"{forget_split}_perturbed", "retain": "retain_perturbed",
               "real_authors": "real_authors_perturbed", "world_facts": "world_facts_perturbed"}
    return TofuBenchmark(**{name: tuple(_hub_items(config, revision)) for name, config in configs.items()})


def _hub_items(config: str, revision: str) -> list[TofuItem]:
    import datasets

    datasets.disable_progress_bars()
    try:
        rows = datasets.load_dataset(HUB_DATASET, config, split="train", revision=revision or None)
    except Exception as err:
        cause = (str(err).splitlines() or [""])[0][:200]
        raise TofuError(
            f"the Hugging Face hub is unreachable, so {HUB_DATASET} ({config}) cannot be loaded "
            f"({type(err).__name__}: {cause}); offline, use the generated set instead: "
            f"eu_jax.data.tofu.fictitious_benchmark(seed=0), or a folder saved earlier with write_benchmark "
            f"and read back with load_benchmark"
        ) from None
    return [_hub_item(row, f"{HUB_DATASET} ({config}), row {i + 1}") for i, row in enumerate(rows)]


def _hub_item(row: dict[str, Any], where: str) -> TofuItem:
    """TOFU's fields: question, answer, paraphrased_answer (the two fictitious sets only), perturbed_answer."""
    mapped = {"prompt": row.get("question"), "response": row.get("answer"),
              "perturbed_responses": row.get("perturbed_answer")}
    if row.get("paraphrased_answer") is not None:
        mapped["paraphrased_response"] = row["paraphrased_answer"]
    return _item_from_row(mapped, where)
