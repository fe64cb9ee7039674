"""`eu-generate`: sample from an eu_jax checkpoint, for a few prompts (--prompt) or as a chat (--chat).

Prompts go through the tokenizer's chat template as a user turn unless --raw is given. Decoding ends
per prompt at an EOS token (the tokenizer's, generation_config.json's and the chat template's
end-of-turn token), at a --stop string, or after --max-new-tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, TextIO

from jax.sharding import Mesh

from eu_jax.compile_cache import enable_compilation_cache
from eu_jax.convert.checkpoint import HF_FILES_DIR, load_model_meta, load_params, locate_params
from eu_jax.files import local_path
from eu_jax.generate import Completion, SamplingConfig, generate
from eu_jax.models.llama import Decoder
from eu_jax.models.state import build_decoder, params_shardings
from eu_jax.parallel.mesh import make_mesh, parse_mesh_spec

_TURN_MARK = "\x00eu-generate-turn-mark\x00"


class GenerateError(ValueError):
    """A problem with the checkpoint or the arguments, told in one sentence."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="eu-generate", description=__doc__)
    parser.add_argument("ckpt", type=local_path, help="eu_jax params checkpoint, training run directory or step folder")
    parser.add_argument(
        "--prompt", action="append", dest="prompts", default=[], help="prompt text (repeatable; all run as one batch)"
    )
    parser.add_argument("--chat", action="store_true", help="interactive chat on stdin (/reset, /exit, EOF quits)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", nargs="+", action="extend", default=[], metavar="STR", help="stop strings")
    parser.add_argument("--raw", action="store_true", help="send prompts as they are, without the chat template")
    parser.add_argument("--mesh", default="data=1,fsdp=-1", help="device mesh, e.g. data=2,fsdp=-1")
    return parser


def load_tokenizer(ckpt: Path) -> Any:
    """The tokenizer saved in the checkpoint's hf_files/ (every imported checkpoint has one)."""
    import transformers

    hf_dir = locate_params(ckpt)[2] / HF_FILES_DIR
    if not hf_dir.is_dir():
        raise GenerateError(f"checkpoint {ckpt} has no tokenizer: {hf_dir} is missing")
    try:
        return transformers.AutoTokenizer.from_pretrained(hf_dir)
    except (OSError, ValueError) as err:
        raise GenerateError(f"no usable tokenizer in {hf_dir}: {err}") from None


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token the chat template puts after an assistant reply (e.g. <|im_end|>), if any.

    Found by rendering a two-turn conversation, so it works for any template, not a list of names.
    """
    if not tokenizer.chat_template:
        return None
    turns = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _TURN_MARK}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    tail = tokenizer(rendered.split(_TURN_MARK, 1)[-1], add_special_tokens=False)["input_ids"]
    added = set(tokenizer.get_added_vocab().values())
    return tail[0] if tail and tail[0] in added else None


def eos_token_ids(tokenizer: Any, hf_dir: Path) -> list[int]:
    """The tokenizer's EOS, generation_config.json's EOS id(s) and the chat template's end of turn."""
    ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    config_file = hf_dir / "generation_config.json"
    if config_file.is_file():
        configured = json.loads(config_file.read_text()).get("eos_token_id")
        ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def stop_token_sequences(tokenizer: Any, stop: str) -> list[list[int]]:
    """Token-id spellings of a stop string: alone and after a space, as BPE and SentencePiece
    tokenizers spell a word differently there. Each one decodes to text containing `stop`."""
    spellings = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (stop, " " + stop)]
    return [list(s) for s in dict.fromkeys(tuple(s) for s in spellings if s)]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """Text up to the first stop string: catches spellings the token-level check did not cover."""
    cut = min((text.find(s) for s in stops if s in text), default=len(text))
    return text[:cut]


@dataclass
class Generator:
    """A loaded model and tokenizer, with the decoding settings from the command line."""

    model: Decoder
    tokenizer: Any
    mesh: Mesh
    sampling: SamplingConfig
    eos_ids: list[int]
    stops: list[str]

    def complete(self, prompts: list[list[int]], seed_offset: int = 0) -> list[tuple[str, Completion]]:
        """(text, completion) per prompt; the text has no special tokens and ends before any stop string."""
        sampling = dataclasses.replace(self.sampling, seed=(self.sampling.seed + seed_offset) % 2**32)
        stop_ids = [seq for stop in self.stops for seq in stop_token_sequences(self.tokenizer, stop)]
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        result = generate(self.model, prompts, sampling, self.eos_ids, stop_ids, pad_id, self.mesh)
        return [(self.text(c), c) for c in result.completions]

    def text(self, completion: Completion) -> str:
        return cut_at_stop(self.tokenizer.decode(completion.content, skip_special_tokens=True), self.stops)

    def encode_turns(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)


def load_generator(args: argparse.Namespace) -> Generator:
    """Tokenizer first (cheap, and its errors come before the params are read), then the params."""
    if any(not stop for stop in args.stop):
        raise GenerateError("--stop '': an empty stop string would end every answer before its first character")
    tokenizer = load_tokenizer(args.ckpt)
    if not args.raw and not tokenizer.chat_template:
        raise GenerateError(
            f"the tokenizer of {args.ckpt} has no chat template; pass --raw to send prompts as they are"
        )
    sampling = SamplingConfig(args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed)
    mesh = make_mesh(parse_mesh_spec(args.mesh))
    config = load_model_meta(args.ckpt).config
    params, _ = load_params(args.ckpt, params_shardings(config, mesh))
    eos_ids = eos_token_ids(tokenizer, locate_params(args.ckpt)[2] / HF_FILES_DIR)
    return Generator(build_decoder(config, params), tokenizer, mesh, sampling, eos_ids, list(args.stop))


def run_prompts(generator: Generator, prompts: list[str], raw: bool, out: TextIO) -> None:
    """All prompts in one batch; each answer on stdout, its length and finish reason on stderr."""
    if raw:
        encoded = [generator.tokenizer(p)["input_ids"] for p in prompts]
    else:
        encoded = [generator.encode_turns([{"role": "user", "content": p}]) for p in prompts]
    for number, (prompt, (text, completion)) in enumerate(zip(prompts, generator.complete(encoded)), start=1):
        if len(prompts) > 1:
            print(f"### {number}: {prompt}", file=out)
        print(text, file=out, flush=True)
        print(f"[{len(completion.tokens)} tokens, finished by {completion.finish_reason}]", file=sys.stderr)


def run_chat(generator: Generator, stdin: TextIO, out: TextIO) -> None:
    """A REPL keeping the conversation; each turn samples with the next seed, so turns differ."""
    print("chat: type a message; /reset clears the conversation, /exit or end of input quits", file=sys.stderr)
    history: list[dict[str, str]] = []
    turn = 0
    while True:
        if stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return
        message = line.strip()
        if message == "/reset":
            history.clear()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message:
            continue
        history.append({"role": "user", "content": message})
        text, _ = generator.complete([generator.encode_turns(history)], seed_offset=turn)[0]
        history.append({"role": "assistant", "content": text})
        print(text, file=out, flush=True)
        turn += 1


def run(args: argparse.Namespace) -> int:
    if args.chat == bool(args.prompts):
        raise GenerateError("give either --prompt TEXT (one or more) or --chat")
    if args.chat and args.raw:
        raise GenerateError("--chat uses the chat template, so it cannot be combined with --raw")
    generator = load_generator(args)
    if args.chat:
        run_chat(generator, sys.stdin, sys.stdout)
    else:
        run_prompts(generator, args.prompts, args.raw, sys.stdout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    enable_compilation_cache()
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"eu-generate: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
