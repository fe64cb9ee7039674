"""The project's bank of "I don't know"-style replies, and which one answers a given question.

UniErase's unlearning token is trained to lead into a refusal; varied phrasings (rather than one fixed
sentence) keep the token from becoming a trigger for a single memorised string. The phrase for a question
is chosen by a stable hash of its text (SHA-256, not Python's per-process salted `hash()`), so every run,
process and machine pairs a question with the same reply.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Sequence

SHIPPED_PHRASES = "idk_phrases.txt"


def load_phrases(path: str | Path | None = None) -> tuple[str, ...]:
    """Phrasings one per line (blank lines skipped): the shipped bank (written for this project) by default,
    or a text file of one's own."""
    if not path:
        return _shipped_phrases()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"phrase file {path}: cannot be read ({err})") from None
    phrases = _lines(text)
    if not phrases:
        raise ValueError(f"phrase file {path} holds no phrases (one per line)")
    return phrases


@lru_cache(maxsize=1)
def _shipped_phrases() -> tuple[str, ...]:
    return _lines(resources.files("eu_jax.unierase").joinpath(SHIPPED_PHRASES).read_text(encoding="utf-8"))


def _lines(text: str) -> tuple[str, ...]:
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def stable_index(text: str, count: int) -> int:
    """An index in [0, count) that depends only on `text` (the same in every process and Python version)."""
    if count < 1:
        raise ValueError(f"cannot choose among {count} phrases: the bank is empty")
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def idk_reply(question: str, phrases: Sequence[str] | None = None) -> str:
    """The refusal that answers `question`: a deterministic pick from `phrases` (default: the shipped bank)."""
    bank = load_phrases() if phrases is None else tuple(phrases)
    return bank[stable_index(question, len(bank))]
