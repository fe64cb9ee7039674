"""Is a generated reply correct? Answer extraction and exact-match rules for greedy-generation accuracy.

Chat models rarely reply with the bare answer: they write "The answer is 42." or "The capital of France is
Paris." Exact match on the raw reply would score those wrong, so:

- numbers ("number"): the first number in the reply, with its sign ("-4", "−4"), thousands separators
  ("1,234") and decimals, compared by value with the expected number. Replies that work a sum out end
  with the result ("5 + 3 = 8", "2 * 6 = 12, 12 + 1 = 13"), so a reply with "=" is read after its last
  "=". Only that one number counts: a reply listing several numbers is not searched for the right one.
- text ("text"): after SQuAD-style normalisation (lowercase, no punctuation, no articles, single spaces),
  the reply equals the answer or an alias, or contains it as a whole-word span ("paris is the capital"
  contains "paris"; "parisian" does not). A reply that names several candidates contains each of them, so
  text match is lenient toward hedging; the probes ask questions with one short answer to keep that rare.
"""

from __future__ import annotations

import re
import unicodedata
from decimal import Decimal
from typing import Iterable, Literal

AnswerKind = Literal["number", "text"]
ANSWER_KINDS: tuple[str, ...] = ("number", "text")

# A sign (ASCII or U+2212 minus), then "1,234" style groups or plain digits, then an optional decimal part.
# The number may not continue a word or another number ("x2", "v1.2"), so only whole numbers are found.
_NUMBER = re.compile(r"(?<![\w.])([-+\u2212]?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(?![\d])")
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")


def normalize_text(text: str) -> str:
    """SQuAD-style normal form: lowercase, accents and punctuation removed, articles dropped, single spaces.

    Unlike SQuAD, punctuation and symbols become a space instead of vanishing, so "Paris,France" still
    holds the word "paris" and "Mia's" the word "mia". Accents are stripped ("São Paulo" == "Sao Paulo").
    """
    decomposed = unicodedata.normalize("NFKD", text.lower())
    kept = []
    for char in decomposed:
        category = unicodedata.category(char)
        if category == "Mn":  # combining accent
            continue
        kept.append(" " if category[0] in "PS" else char)
    return " ".join(_ARTICLES.sub(" ", "".join(kept)).split())


def extract_number(text: str) -> str | None:
    """The first number in `text` in plain form ("-1234.5": ASCII minus, no "+", no commas), or None."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    sign, digits = match.groups()
    return ("-" if sign in ("-", "\u2212") else "") + digits.replace(",", "")


def numeric_match(response: str, answer: str) -> bool:
    """Whether the reply's number (the first after its last "=", else its first) equals the answer's number
    by value ("42.0" matches "42")."""
    expected = extract_number(answer)
    if expected is None:
        raise ValueError(f"answer {answer!r} holds no number to compare with")
    found = extract_number(response.rpartition("=")[2])
    return found is not None and Decimal(found) == Decimal(expected)


def text_match(response: str, answer: str, aliases: Iterable[str] = ()) -> bool:
    """Whether the normalised reply equals the answer or an alias, or contains one as a whole-word span."""
    candidates = [normalize_text(c) for c in (answer, *aliases)]
    if not candidates[0]:
        raise ValueError(f"answer {answer!r} is empty once normalised (punctuation and articles are dropped)")
    padded = f" {normalize_text(response)} "
    return any(c and f" {c} " in padded for c in candidates)


def is_correct(response: str, answer: str, kind: AnswerKind, aliases: Iterable[str] = ()) -> bool:
    """Score a reply: "number" compares the first number (aliases such as "seven" match as text),
    "text" uses `text_match`."""
    if kind == "number":
        return numeric_match(response, answer) or any(text_match(response, alias) for alias in aliases)
    if kind == "text":
        return text_match(response, answer, aliases)
    raise ValueError(f"answer kind {kind!r} is not one of {ANSWER_KINDS}")
