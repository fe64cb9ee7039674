"""Edit requests as token arrays: where the edit is read and written, and which tokens it must produce.

A request says: after this prompt (a user turn, through the chat template) the model's reply should
start with `target` (UniErase: the unlearning token). Its edit acts at the last token of `subject` (the
words the knowledge is about; by default the whole prompt), or with position "prompt_end" at the last
token of the rendered prompt, where the target is predicted. Following MEMIT/AlphaEdit, each request is
rendered under several short context prefixes, so the edit generalises beyond one exact context, and once
as a raw "essence" prompt about the subject (`kl_template`), whose next-token distribution the edit must
keep.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from eu_jax.data.sources import DataError
from eu_jax.generate import bucket_length


@dataclass(frozen=True)
class EditRequest:
    prompt: str  # the question, as the user asks it
    target: str  # what the reply should start with, e.g. "<unlearn_0>"
    subject: str = ""  # the edit acts at this text's last token inside the prompt ("" = the whole prompt)

    @property
    def subject_text(self) -> str:
        return self.subject or self.prompt


def check_kl_template(template: str) -> None:
    """Refuse an essence prompt that `template.format(subject)` cannot fill: it needs exactly one plain `{}`
    (a message starting with `kl_template=`, for the caller to prefix with the config's section)."""
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template) if name is not None]
    except ValueError:  # a single '{' or '}'
        fields = None
    if fields != [("", "", None)]:
        raise ValueError(f"kl_template={template!r} must hold exactly one {{}} field, where the subject goes (e.g. '{{}} is a')")


@dataclass(frozen=True)
class EditBatch:
    """Right-padded rows: every (request, context prefix) pair, then one essence row per request.

    ids, attention [N, T]; lookup [N]: position of the subject's last token; request [N]: its request;
    targets, target_positions, target_mask [N, M]: the target tokens and the positions predicting them
    (mask 0 on essence rows and padding); essence [N]: 1 on essence rows, whose last token's distribution
    the edit keeps; last [N]: each row's last real position.
    """

    ids: np.ndarray
    attention: np.ndarray
    lookup: np.ndarray
    request: np.ndarray
    targets: np.ndarray
    target_positions: np.ndarray
    target_mask: np.ndarray
    essence: np.ndarray
    last: np.ndarray
    num_requests: int
    num_contexts: int


@dataclass(frozen=True)
class _Row:
    ids: list[int]
    lookup: int
    targets: list[int]
    target_start: int


class EditEncoder:
    """Renders and tokenizes edit prompts with one tokenizer (its chat template, if any)."""

    def __init__(self, tokenizer: Any, use_chat_template: bool = True, position: str = "subject"):
        if position not in ("subject", "prompt_end"):
            raise ValueError(f"edit position {position!r}: use 'subject' (its last token) or 'prompt_end' (the last prompt token)")
        self.tokenizer, self.position = tokenizer, position
        self.chat = use_chat_template and bool(getattr(tokenizer, "chat_template", None))
        bos = tokenizer.bos_token_id
        probe = tokenizer("a")["input_ids"]
        self.bos_id = bos if bos is not None and len(probe) > 0 and probe[0] == bos else None

    def _prompt_text(self, content: str) -> str:
        if not self.chat:
            return content
        messages = [{"role": "user", "content": content}]
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _tokenize(self, text: str, where: str) -> tuple[list[int], np.ndarray]:
        """Ids and each token's first character, with a BOS in front when the tokenizer adds one."""
        try:
            out = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        except NotImplementedError:
            raise DataError(f"{where}: editing needs a fast tokenizer with offset mappings to find the subject's tokens") from None
        ids, starts = list(out["input_ids"]), np.asarray([s for s, _ in out["offset_mapping"]], np.int64)
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids, starts = [self.bos_id] + ids, np.concatenate([[-1], starts])
        return ids, starts

    def _row(self, content: str, subject: str, target: str, where: str, render: bool = True) -> _Row:
        prompt = self._prompt_text(content) if render else content
        at = prompt.find(content)
        end = prompt.rfind(subject, at, at + len(content)) if at >= 0 else -1
        if end < 0:
            raise DataError(f"{where}: the subject {subject!r} does not appear in the prompt {content!r}")
        end += len(subject)
        ids, starts = self._tokenize(prompt + target, where)
        before_end = np.nonzero((starts >= 0) & (starts < end))[0]
        target_tokens = np.nonzero(starts >= len(prompt))[0]
        if target and not len(target_tokens):
            raise DataError(f"{where}: the target {target!r} encodes to no tokens")
        first = int(target_tokens[0]) if len(target_tokens) else len(ids)
        lookup = first - 1 if self.position == "prompt_end" and render else int(before_end[-1])
        return _Row(ids=ids, lookup=lookup, targets=ids[first:], target_start=first)

    def encode(self, requests: Sequence[EditRequest], prefixes: Sequence[str], kl_template: str) -> EditBatch:
        """Rows for every request under every prefix (prefixes[0] should be "", the plain prompt),
        followed by one raw essence row per request (`kl_template` with the subject in it)."""
        if not requests:
            raise DataError("no edit requests: give at least one prompt to edit")
        rows, owners, essence = [], [], []
        for r, request in enumerate(requests):
            where = f"edit request {r} ({request.prompt[:40]!r})"
            for prefix in prefixes:
                rows.append(self._row(prefix + request.prompt, request.subject_text, request.target, where))
                owners.append(r), essence.append(0)
        for r, request in enumerate(requests):
            text = kl_template.format(request.subject_text)
            rows.append(self._row(text, request.subject_text, "", f"essence prompt of edit request {r}", render=False))
            owners.append(r), essence.append(1)
        width = bucket_length(max(len(row.ids) for row in rows))  # rounds of one size share compiled programs
        targets = max(len(row.targets) for row in rows)
        n = len(rows)
        batch = {
            "ids": np.zeros((n, width), np.int32), "attention": np.zeros((n, width), np.int32),
            "targets": np.zeros((n, targets), np.int32), "target_positions": np.zeros((n, targets), np.int32),
            "target_mask": np.zeros((n, targets), np.float32),
        }
        for i, row in enumerate(rows):
            batch["ids"][i, : len(row.ids)] = row.ids
            batch["attention"][i, : len(row.ids)] = 1
            m = len(row.targets)
            batch["targets"][i, :m] = row.targets
            batch["target_positions"][i, :m] = np.arange(row.target_start - 1, row.target_start - 1 + m)
            batch["target_mask"][i, :m] = 1
        return EditBatch(
            **batch,
            lookup=np.asarray([row.lookup for row in rows], np.int32),
            request=np.asarray(owners, np.int32),
            essence=np.asarray(essence, np.int32),
            last=np.asarray([len(row.ids) - 1 for row in rows], np.int32),
            num_requests=len(requests),
            num_contexts=len(prefixes),
        )
