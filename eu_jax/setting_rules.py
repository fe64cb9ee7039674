"""Range and choice checks of a config section, each refusal one sentence naming the setting where the user
sets it (`config.tofu.selfgen.batch_size=0 must be at least 1`): sections that other commands build into their
own configs (the workflows' eval, relearning, fine-tuning and sampling settings) are checked under their own
names before any work, not as the derived setting a later stage would name."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

# (dotted setting within the section, test, what the setting must be)
Rule = tuple[str, Callable[[Any], bool], str]

AT_LEAST_ONE: tuple[Callable[[Any], bool], str] = (lambda v: v >= 1, "must be at least 1")
POSITIVE_FINITE: tuple[Callable[[Any], bool], str] = (lambda v: 0 < v < math.inf, "must be a positive finite number")
SEED: tuple[Callable[[Any], bool], str] = (lambda v: 0 <= v < 2**32, "must be in [0, 2**32 - 1]")


def zero_or_more(meaning: str) -> tuple[Callable[[Any], bool], str]:
    """The rule of a count where 0 has a `meaning` of its own ("all", "off", ...)."""
    return (lambda v: v >= 0, f"must be 0 ({meaning}) or more")


def setting(section: Any, key: str) -> Any:
    """The value of a dotted key within a (nested) config section."""
    for part in key.split("."):
        section = section[part]
    return section


def check_rules(section: Any, rules: Sequence[Rule], where: str) -> None:
    """Raise ValueError `<where>.<key>=<value> <requirement>` for the first setting that breaks its rule."""
    for key, test, requirement in rules:
        value = setting(section, key)
        if not test(value):
            raise ValueError(f"{where}.{key}={value!r} {requirement}")
