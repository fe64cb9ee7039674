"""A checkpoint loaded for evaluation: sharded params, tokenizer, stop tokens and greedy chat answers.

Every evaluation metric needs the same few things from a model, so they live here once: the loaded
params, tokenizer and stop tokens, and greedy answers to user turns through the chat template, batched
and sharded on the mesh (also across processes: every process holds the same prompts and reads back
the same answers).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from jax.sharding import Mesh

from eu_jax.convert.checkpoint import HF_FILES_DIR, load_model_meta, load_params, locate_params
from eu_jax.generate import SamplingConfig, generate
from eu_jax.generate_cli import eos_token_ids, load_tokenizer
from eu_jax.models.config import ModelConfig
from eu_jax.models.llama import Decoder
from eu_jax.models.state import Params, build_decoder, params_shardings


@dataclass(frozen=True)
class EvalModel:
    """Params sharded on `mesh` with the checkpoint's tokenizer; `name` labels results and plots."""

    name: str
    checkpoint: Path
    config: ModelConfig
    params: Params
    tokenizer: Any
    mesh: Mesh
    eos_ids: tuple[int, ...]

    @classmethod
    def load(cls, checkpoint: str | Path, mesh: Mesh, name: str = "") -> "EvalModel":
        """Tokenizer first (cheap, and its errors come before the params are read), then the params."""
        checkpoint = Path(checkpoint)
        tokenizer = load_tokenizer(checkpoint)
        config = load_model_meta(checkpoint).config
        params, _ = load_params(checkpoint, params_shardings(config, mesh))
        eos = eos_token_ids(tokenizer, locate_params(checkpoint)[2] / HF_FILES_DIR)
        return cls(name or checkpoint.name, checkpoint, config, params, tokenizer, mesh, tuple(eos))

    def with_params(self, params: Params, name: str | None = None) -> "EvalModel":
        """The same model with other weights of the same shapes (e.g. a training run's current params)."""
        return dataclasses.replace(self, params=params, name=self.name if name is None else name)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def decoder(self) -> Decoder:
        return build_decoder(self.config, self.params)

    def chat_prompt(self, user_text: str) -> list[int]:
        """Token ids of one user turn and the assistant header, or the raw text without a chat template."""
        if not self.tokenizer.chat_template:
            return list(self.tokenizer(user_text)["input_ids"])
        messages = [{"role": "user", "content": user_text}]
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))

    def answer(self, user_texts: Sequence[str], max_new_tokens: int, batch_size: int = 16) -> list[str]:
        """Greedy replies to each user turn, decoded without special tokens.

        Prompts are sorted by length before batching, so each batch pads to a similar length and few
        prompt-length buckets compile; a short last batch is filled with repeats so every batch has
        the same number of rows (one compiled shape). Replies come back in the input order.
        """
        prompts = [self.chat_prompt(text) for text in user_texts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        replies: list[str] = [""] * len(prompts)
        model, sampling = self.decoder(), SamplingConfig(max_new_tokens=max_new_tokens)
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            batch = [prompts[i] for i in chosen]
            if len(order) > batch_size:
                batch += [batch[-1]] * (batch_size - len(batch))
            result = generate(model, batch, sampling, self.eos_ids, (), self.pad_id, self.mesh)
            for i, completion in zip(chosen, result.completions):
                replies[i] = self.tokenizer.decode(completion.content, skip_special_tokens=True).strip()
        return replies
