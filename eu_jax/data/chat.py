"""Records to (token ids, loss mask): chat templates, assistant-only masks, BOS/EOS exactly once.

- Conversations (and pairs, when the tokenizer has a chat template) are rendered to text with the
  tokenizer's own template (`apply_chat_template(tokenize=False)`) and tokenized once, without the
  tokenizer's automatic special tokens. Assistant turns are located by rendering prefixes: the text of
  messages[:i] with the generation prompt ends where assistant turn i starts, the text of messages[:i+1]
  ends where it ends. The loss covers the turn's content and its end-of-turn token (the first special
  token after the content, e.g. `<|eot_id|>` or `<|im_end|>`), not what follows it (ChatML's newline).
- Pairs without a template: [BOS] prompt response EOS, loss on response and EOS.
- Text: [BOS] text EOS, loss on every token.
- BOS: exactly one at the start when the tokenizer adds one by default or the template writes one,
  never two (a template that writes `<|begin_of_text|>` and a tokenizer that adds it again is the
  classic doubled-BOS trap); none otherwise. EOS: the template's end-of-turn tokens, or one EOS
  appended when the conversation's last assistant turn has no special token after it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from eu_jax.data.sources import DataError, Record


@dataclass(frozen=True)
class Encoded:
    ids: np.ndarray  # [n] int32
    loss: np.ndarray  # [n] int32: 1 on tokens to score

    def __len__(self) -> int:
        return len(self.ids)


def use_chat_template(tokenizer: Any, template: str) -> Any:
    """Apply the config's template choice: "" keeps the tokenizer's own, "none" disables it, Jinja text
    (anything with a "{") replaces it, anything else must be a template file. Returns the tokenizer,
    changed in place (the cache key includes the template, so a change invalidates cached sets)."""
    if template == "none":
        tokenizer.chat_template = None
    elif "{" in template:
        tokenizer.chat_template = template
    elif template:
        from pathlib import Path

        path = Path(template).expanduser()
        if not path.is_file():
            raise DataError(f"chat template file '{template}' does not exist (give a file, Jinja text, '' or 'none')")
        tokenizer.chat_template = path.read_text(encoding="utf-8")
    return tokenizer


class Encoder:
    """Encodes records with one tokenizer; probes its BOS/EOS behaviour once.

    `score_turn_end=False` leaves the token that closes a reply (its end-of-turn token, or the EOS appended
    after it) unscored, so the reply's own text is scored alone (the judge's fluency test).
    """

    def __init__(self, tokenizer: Any, score_turn_end: bool = True):
        self.tokenizer = tokenizer
        self.score_turn_end = score_turn_end
        self.template = bool(getattr(tokenizer, "chat_template", None))
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        self.bos_text = tokenizer.bos_token if self.bos_id is not None else None
        probe = tokenizer("a")["input_ids"]
        self.adds_bos = self.bos_id is not None and len(probe) > 0 and probe[0] == self.bos_id
        specials = set(getattr(tokenizer, "all_special_tokens", []))
        for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
            if getattr(token, "special", False):
                specials.add(str(token.content))
        self.specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._offsets = None  # whether the tokenizer returns offset mappings (probed on first use)

    # ---- public ------------------------------------------------------------------------------------

    def encode(self, record: Record) -> Encoded:
        return self.encode_many([record])[0]

    def encode_many(self, records: Sequence[Record], batch_size: int = 512) -> list[Encoded]:
        """Encode records; texts are tokenized in batches (the tokenizers library runs them in parallel)."""
        out: list[Encoded] = []
        for first in range(0, len(records), batch_size):
            plans = [self._plan(record) for record in records[first : first + batch_size]]
            texts = [text for plan in plans for text, _ in plan.parts]
            tokenized = iter(self._tokenize_batch(texts))
            for plan in plans:
                ids: list[int] = []
                loss: list[int] = []
                for text, spans in plan.parts:
                    part_ids, starts = next(tokenized)
                    if starts is None:  # no offsets: locate the span edges by tokenizing prefixes
                        part_loss = np.zeros(len(part_ids), np.int32)
                        for s, e in spans:
                            part_loss[self._first_token_at(text, part_ids, s, plan.record) : self._first_token_at(text, part_ids, e, plan.record)] = 1
                    else:
                        part_loss = _in_spans(starts, spans)
                    ids.extend(part_ids)
                    loss.extend(part_loss.tolist())
                out.append(self._finish(ids, loss, plan.template_bos, plan.eos_loss))
        return out

    # ---- plans: texts to tokenize and the character spans to score -----------------------------------

    def _plan(self, record: Record) -> "_Plan":
        if record.text is not None:
            return _Plan(record, [(record.text, [(0, len(record.text))])], template_bos=False, eos_loss=1)
        if record.messages is None and not self.template:
            parts = [(record.prompt, []), (record.response, [(0, len(record.response))])]
            return _Plan(record, parts, template_bos=False, eos_loss=int(self.score_turn_end))
        if not self.template:
            raise DataError(f"{record.where}: a 'messages' record needs a chat template, and the tokenizer has none "
                            f"(set data.chat_template to a template file)")
        return self._plan_chat(record)

    def _render(self, messages: list[dict[str, str]], record: Record, generation: bool = False) -> str:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
        except Exception as err:  # jinja TemplateError, raise_exception(...) in the template
            raise DataError(f"{record.where}: the chat template refused the conversation ({type(err).__name__}: {err})") from None
        if not isinstance(text, str):
            raise DataError(f"{record.where}: the chat template did not render to text")
        return text

    def _plan_chat(self, record: Record) -> "_Plan":
        messages = record.chat()
        full = self._render(messages, record)
        spans = []  # character spans to score
        append_eos = False
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start_text = self._render(messages[:i], record, generation=True)
            end_text = self._render(messages[: i + 1], record)
            if not full.startswith(start_text) or not full.startswith(end_text) or len(start_text) > len(end_text):
                raise DataError(
                    f"{record.where}: cannot locate assistant turn {i + 1}: the chat template renders the conversation's "
                    f"first turns differently from the whole conversation, so their tokens cannot be masked"
                )
            end, closed = self._turn_end(full[len(start_text) : len(end_text)], message["content"])
            spans.append((len(start_text), len(start_text) + end))
            append_eos = not closed and i == len(messages) - 1
        template_bos = self.bos_text is not None and full.startswith(self.bos_text)
        return _Plan(record, [(full, spans)], template_bos=template_bos, eos_loss=int(self.score_turn_end) if append_eos else None)

    def _turn_end(self, turn: str, content: str) -> tuple[int, bool]:
        """End of the scored part of a turn's text: after the first special token following the content (before
        it without `score_turn_end`), and whether there is one."""
        core = content.strip()
        found = turn.find(core) if core else 0
        after = found + len(core) if found >= 0 else 0
        best = None
        for special in self.specials:  # longest first, so `<|im_end|>` wins over any shorter prefix
            at = turn.find(special, after)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, len(special))
        if best is None:
            return len(turn), False
        return best[0] + (best[1] if self.score_turn_end else 0), True

    # ---- tokens ------------------------------------------------------------------------------------

    def _tokens(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _tokenize_batch(self, texts: list[str]) -> list[tuple[list[int], np.ndarray | None]]:
        """(ids, each token's first character) per text; starts are None when the tokenizer has no offsets."""
        if not texts:
            return []
        if self._offsets is not False:
            try:
                out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
            except NotImplementedError:  # tokenizers without offsets (Python / SentencePiece backends)
                self._offsets = False
            else:
                self._offsets = True
                return [
                    (list(ids), np.asarray([start for start, _ in offsets], np.int64).reshape(-1))
                    for ids, offsets in zip(out["input_ids"], out["offset_mapping"])
                ]
        return [(self._tokens(text), None) for text in texts]

    def _first_token_at(self, text: str, ids: list[int], cut: int, record: Record) -> int:
        """Without offsets: the index of the first token of `ids` that starts at or after character `cut`.

        The prefix text[:cut] tokenizes to ids[:k] when the cut is a token boundary; when a token straddles
        the cut, the prefix's last token is a piece of it and the straddling token (which starts before the
        cut) is ids[k-1], so the answer is k either way.
        """
        if cut >= len(text):
            return len(ids)
        prefix = self._tokens(text[:cut])
        k = len(prefix)
        if prefix == ids[:k] or prefix[:-1] == ids[: k - 1]:
            return k
        raise DataError(f"{record.where}: the tokenizer splits the text differently around character {cut}, "
                        f"so the assistant tokens cannot be located (a tokenizer with offset mappings avoids this)")

    def _finish(self, ids: list[int], loss: list[int], template_bos: bool, eos_loss: int | None) -> Encoded:
        """Exactly one BOS where the tokenizer or the template uses one; EOS appended when asked."""
        if self.bos_id is not None:
            lead = 0
            while lead < len(ids) and ids[lead] == self.bos_id:
                lead += 1
            if self.adds_bos or template_bos or lead:
                ids, loss = [self.bos_id] + ids[lead:], [0] + loss[lead:]
        if eos_loss is not None and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids, loss = ids + [self.eos_id], loss + [eos_loss]
        return Encoded(np.asarray(ids, np.int32), np.asarray(loss, np.int32))


@dataclass(frozen=True)
class _Plan:
    """A record as texts to tokenize (their tokens are concatenated) with the character spans to score."""

    record: Record
    parts: list[tuple[str, list[tuple[int, int]]]]
    template_bos: bool
    eos_loss: int | None


def _in_spans(starts: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """1 for each token whose first character lies inside a span."""
    mask = np.zeros(len(starts), bool)
    for s, e in spans:
        mask |= (starts >= s) & (starts < e)
    return mask.astype(np.int32)
