#!/usr/bin/env python
"""Benchmark eu_jax's jitted sampler against transformers' `generate` on SmolLM2-135M-Instruct (fp32, CPU).

The issue's goal: at least 3x the tokens/s of transformers' `generate` at batch 16. Both run greedy on the
same chat-templated prompts, left-padded the same way, for exactly 128 new tokens per row (EOS is switched
off on both sides, so every row does the same work). Runs alternate between the two, best of N kept, so a
neighbour's burst on this shared machine hits both alike; the first eu_jax call (compilation) and the first
transformers call (warm-up) are reported apart. The script rewrites only its own section of BENCHMARKS.md.

Usage:
    .venv/bin/python bench/generate.py                      # full run (a few minutes), rewrites BENCHMARKS.md
    .venv/bin/python bench/generate.py --new-tokens 16 --runs 1 --no-write   # quick smoke run
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
from harness import benchmark_parser, fastest_torch_threads, log, machine_description, timed, verdict  # noqa: E402
from report import publish  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from eu_jax.assets import fetch_smollm2  # noqa: E402
from eu_jax.convert.checkpoint import HF_FILES_DIR, load_params  # noqa: E402
from eu_jax.convert.hf_import import import_checkpoint  # noqa: E402
from eu_jax.generate import SamplingConfig, bucket_length, generate, left_pad  # noqa: E402
from eu_jax.models.config import RuntimeOptions  # noqa: E402
from eu_jax.models.state import build_decoder  # noqa: E402

SECTION_TITLE = "## Generation (bench/generate.py)"
SPEEDUP_GOAL = 3.0  # eu_jax tokens/s at least this many times transformers' at batch 16
GOAL_BATCH = 16
PRODUCT_REPEATS = 3  # timed runs of the weight-products floor per timed run of `generate`
# Sampled decoding (no goal; eu-selfgen's work): name -> settings, applied alike on both sides.
SAMPLED = {
    "temperature 1 (eu-selfgen's default)": dict(temperature=1.0, top_k=0, top_p=1.0),
    "temperature 1, top-p 0.9": dict(temperature=1.0, top_k=0, top_p=0.9),
}

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain photosynthesis in one sentence.",
    "What is 12 times 7?",
    "Give me a tip for learning a new language.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Suggest a name for a pet turtle.",
    "Who wrote Romeo and Juliet?",
    "What is the boiling point of water in Celsius?",
    "List two benefits of exercise.",
    "What is a prime number?",
    "Describe a rainbow to a child.",
]


@dataclasses.dataclass(frozen=True)
class Side:
    name: str
    first: float  # first call: compilation + one run (eu_jax) or warm-up (transformers)
    best: float
    prefill: float  # best 1-token call: prefill + one sampling step
    identical_rows: int | None  # rows whose new tokens agree exactly with transformers' (None: transformers)


@dataclasses.dataclass(frozen=True)
class Row:
    batch: int
    prompt_tokens: int  # longest prompt in the batch (eu_jax pads it up to its bucket)
    sides: list[Side]  # transformers last
    torch_threads: int
    new_tokens: int
    products_ms: dict[str, float]  # a decode step's weight products alone, by library (`weight_products_ms`)

    def tokens_per_s(self, seconds: float) -> float:
        return self.batch * self.new_tokens / seconds

    def speedup(self, side: Side) -> float:
        return self.sides[-1].best / side.best

    def step_ms(self, side: Side) -> float:
        """Milliseconds per decode step: the whole call minus the 1-token call, over the other tokens."""
        return 1000 * (side.best - side.prefill) / (self.new_tokens - 1)


@dataclasses.dataclass(frozen=True)
class SampledRow:
    setting: str
    batch: int
    new_tokens: int
    first: dict[str, float]  # side -> first call s
    best: dict[str, float]  # side -> best s

    def tokens_per_s(self, side: str) -> float:
        return self.batch * self.new_tokens / self.best[side]


EU_SIDES = {"eu_jax": "float32", "eu_jax, bf16 weights": "bfloat16"}  # side -> stored parameter dtype


def load_models(workdir: Path):
    """eu_jax decoders by side (imported from the GGUF into `workdir`; fp32 compute, weights stored fp32 or
    bf16), transformers' own GGUF load, the tokenizer."""
    gguf = fetch_smollm2()
    ckpt = import_checkpoint(gguf, workdir / "ckpt", progress=False)
    params, meta = load_params(ckpt, None)
    decoders = {
        name: build_decoder(meta.config, jax.device_put(jax.tree.map(lambda p: p.astype(dtype), params)), RuntimeOptions(param_dtype=dtype))
        for name, dtype in EU_SIDES.items()
    }
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    reference.generation_config.eos_token_id = None  # exactly `new_tokens` per row, as on the eu_jax side
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt / HF_FILES_DIR)
    return decoders, reference, tokenizer


def chat_prompts(tokenizer, batch: int) -> tuple:
    """The first `batch` questions as chat-templated token ids, and the same left-padded (ids, mask)."""
    turns = [[{"role": "user", "content": q}] for q in QUESTIONS[:batch]]
    prompts = [list(tokenizer.apply_chat_template(t, add_generation_prompt=True, return_dict=False)) for t in turns]
    return prompts, *left_pad(prompts, tokenizer.pad_token_id)


def transformers_new_tokens(reference, ids, mask, pad_id: int, new_tokens: int, **sampling) -> list[list[int]]:
    """transformers' `generate` on the left-padded batch: each row's new tokens."""
    with torch.no_grad():
        out = reference.generate(
            torch.as_tensor(ids, dtype=torch.long), attention_mask=torch.as_tensor(mask),
            max_new_tokens=new_tokens, pad_token_id=pad_id, **sampling,
        )
    return out[:, ids.shape[1] :].tolist()


def alternate(runners: dict[str, Callable[[], object]], runs: int, label: str) -> dict[str, list[float]]:
    """Seconds of `runs` rounds, each running every runner once in turn, so load bursts hit every side."""
    times = {name: [] for name in runners}
    for attempt in range(runs):
        for name, run in runners.items():
            times[name].append(timed(run)[0])
        log(f"{label} run {attempt + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
    return times


def measure(decoders, reference, tokenizer, batch: int, new_tokens: int, runs: int) -> Row:
    prompts, ids, mask = chat_prompts(tokenizer, batch)
    pad_id = tokenizer.pad_token_id

    def ours(decoder) -> Callable[[int], list[list[int]]]:
        return lambda tokens=new_tokens: generate(decoder, prompts, SamplingConfig(max_new_tokens=tokens), pad_id=pad_id).tokens

    def theirs(tokens: int = new_tokens) -> list[list[int]]:
        return transformers_new_tokens(reference, ids, mask, pad_id, tokens, do_sample=False)

    threads = fastest_torch_threads(lambda: theirs(8))
    runners = {name: ours(decoder) for name, decoder in decoders.items()}
    runners["transformers"] = theirs
    first, tokens = {}, {}
    for name, run in runners.items():
        first[name], tokens[name] = timed(run)
        run(1)  # compiles the 1-token variant
    calls = {}
    for name, run in runners.items():
        calls[name], calls[f"{name} 1-token"] = run, functools.partial(run, 1)
    seconds = alternate(calls, runs, f"batch {batch}")
    times = {name: seconds[name] for name in runners}
    prefill = {name: seconds[f"{name} 1-token"] for name in runners}
    assert all(len(t) == new_tokens for rows in tokens.values() for t in rows), "a row stopped early"
    sides = [
        Side(name, first[name], min(times[name]), min(prefill[name]),
             None if name == "transformers" else sum(a == b for a, b in zip(tokens[name], tokens["transformers"])))
        for name in runners
    ]
    products = weight_products_ms(next(iter(decoders.values())).config, batch, repeats=PRODUCT_REPEATS * runs)
    log(f"batch {batch} weight products alone: " + ", ".join(f"{k} {v:.1f} ms" for k, v in products.items()))
    return Row(batch, max(map(len, prompts)), sides, threads, new_tokens, products)


def measure_sampled(decoder, reference, tokenizer, batch: int, new_tokens: int, runs: int) -> list[SampledRow]:
    """Sampled decoding, eu_jax against transformers (torch threads as the greedy rows chose), per setting."""
    prompts, ids, mask = chat_prompts(tokenizer, batch)
    pad_id = tokenizer.pad_token_id
    seeds = itertools.count(1)  # a new seed per call: each call samples anew, as eu-selfgen's batches do

    def runners(knobs: dict) -> dict[str, Callable[[], object]]:
        return {
            "eu_jax": lambda: generate(decoder, prompts, SamplingConfig(new_tokens, seed=next(seeds), **knobs), pad_id=pad_id),
            "transformers": lambda: transformers_new_tokens(reference, ids, mask, pad_id, new_tokens, do_sample=True, **knobs),
        }

    rows = []
    for setting, knobs in SAMPLED.items():
        sides = runners(knobs)
        first = {name: timed(run)[0] for name, run in sides.items()}
        best = {name: min(times) for name, times in alternate(sides, runs, f"batch {batch}, {setting}").items()}
        rows.append(SampledRow(setting, batch, new_tokens, first, best))
    return rows


def weight_products_ms(config, batch: int, repeats: int) -> dict[str, float]:
    """Milliseconds per decode step spent in the weight products alone, XLA and torch (best of `repeats`).

    Every layer's q/k/v/o/gate/up/down product and the output head, for `batch` one-token rows, each against a
    weight of its own (as in a step, every weight comes from memory, not from a cache), chained so no product
    can be skipped or hoisted. No attention, norms or sampling: the floor of a step, whatever the code around it.
    """
    import numpy as np

    d, f, heads, kv = config.hidden_size, config.intermediate_size, config.num_heads, config.num_kv_heads
    q, k = heads * config.head_dim, kv * config.head_dim
    shapes = [(d, q), (d, k), (d, k), (q, d), (d, f), (d, f), (f, d)]
    rng = np.random.default_rng(0)
    weights = [[rng.standard_normal(s, np.float32) * 0.02 for s in shapes] for _ in range(config.num_layers)]
    head = rng.standard_normal((d, config.vocab_size), np.float32) * 0.02
    x0 = rng.standard_normal((batch, d), np.float32)

    def layers(x, weights, head, silu):
        for wq, wk, wv, wo, wg, wu, wd in weights:
            x = x + (x @ wq) @ wo + (x @ wk).mean() + (x @ wv).mean()
            x = x + (silu(x @ wg) * (x @ wu)) @ wd
        return x @ head

    xla_weights, xla_head, xla_x = jax.device_put((weights, head, x0))
    xla = jax.jit(lambda x, w, h: layers(x, w, h, jax.nn.silu))
    torch_weights = [[torch.from_numpy(w) for w in ws] for ws in weights]
    runs = {
        "xla": lambda: xla(xla_x, xla_weights, xla_head).block_until_ready(),
        "torch": lambda: layers(torch.from_numpy(x0), torch_weights, torch.from_numpy(head), torch.nn.functional.silu),
    }
    seconds = {name: [] for name in runs}
    with torch.no_grad():
        for name, run in runs.items():
            run()
        for _ in range(repeats):
            for name, run in runs.items():
                seconds[name].append(timed(run)[0])
    return {name: 1000 * min(times) for name, times in seconds.items()}


# ----------------------------------------------------------------------------------------- the report


def render_section(rows: list[Row], sampled: list[SampledRow], runs: int, seconds: float) -> str:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    goal_row = next((r for r in rows if r.batch == GOAL_BATCH), None)
    lines = [
        SECTION_TITLE,
        "",
        f"SmolLM2-135M-Instruct (the Q4_1 GGUF dequantised to fp32; eu_jax imports it, transformers loads it "
        f"itself), greedy, {rows[0].new_tokens} new tokens per row with EOS off, chat-templated prompts, fp32 on CPU. "
        f"Measured {date} on {machine_description()}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}. Whole benchmark: {seconds / 60:.1f} min.",
        "",
        f"Seconds are whole `generate` calls (prefill included), best of {runs} alternating runs; the first call "
        "of each side is shown apart (eu_jax: compilation + run; transformers: warm-up). eu_jax pads the prompt "
        "length up to its bucket (`bucket_length`). Tokens/s = batch x new tokens / seconds. The 1-token call "
        "(prefill and one token, best of as many runs) gives ms per decode step = (seconds - 1-token call) / "
        "(new tokens - 1). \"Same tokens\" "
        "counts rows whose new tokens agree exactly with transformers' (fp32 compute on every side; a near-tie can "
        "flip a late token, and bf16-stored weights round every weight). bf16 weights halve the parameters' memory; "
        "the steps still compute in fp32 (XLA casts the weights once per call, outside the decoding loop). "
        "torch runs with 1 thread or all cores, whichever a short probe finds faster at the time (OpenMP threads "
        "spinning at barriers make 2 threads several times slower than 1 when the box is busy).",
        "",
        "| Batch | Prompt tokens (bucket) | Side | First call s | Seconds | Tokens/s | 1-token call s "
        "| ms per decode step | Speed-up | Same tokens |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        prompt = f"{r.prompt_tokens} ({bucket_length(r.prompt_tokens)})"
        for side in r.sides:
            name = side.name
            if name == "transformers":
                name = f"transformers ({r.torch_threads} torch thread{'s' if r.torch_threads > 1 else ''})"
            speedup, same = ("", "") if side.identical_rows is None else (f"{r.speedup(side):.2f}x", f"{side.identical_rows}/{r.batch}")
            lines.append(
                f"| {r.batch} | {prompt} | {name} | {side.first:.2f} | {side.best:.2f} | {r.tokens_per_s(side.best):.1f} | "
                f"{side.prefill:.2f} | {r.step_ms(side):.0f} | {speedup} | {same} |"
            )
    lines += [
        "",
        "The floor of a decode step (`weight_products_ms`): every layer's seven weight products and the output "
        "head alone, for the batch's one-token rows, each weight read from memory as in a step; no attention, "
        f"norms or sampling. Best of {PRODUCT_REPEATS * runs} alternating runs, XLA and PyTorch (same threads as above).",
        "",
        "| Batch | Weight products alone, XLA ms | Weight products alone, PyTorch ms | transformers' decode step ms "
        f"| Decode step {SPEEDUP_GOAL:g}x transformers would need ms |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        theirs = r.step_ms(r.sides[-1])
        lines.append(
            f"| {r.batch} | {r.products_ms['xla']:.1f} | {r.products_ms['torch']:.1f} | {theirs:.0f} | {theirs / SPEEDUP_GOAL:.0f} |"
        )
    lines += [
        "",
        "Sampled decoding (eu-selfgen's work; no goal): the same prompts, EOS off, settings alike on both sides "
        "(transformers' `do_sample=True` with its top-k off), a new seed per call; best of "
        f"{runs} alternating runs, first calls apart. The sides draw different tokens, so only speed is compared.",
        "",
        "| Batch | Sampling | Side | First call s | Seconds | Tokens/s | Speed-up |",
        "|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in sampled:
        for side in r.best:
            speedup = "" if side == "transformers" else f"{r.best['transformers'] / r.best[side]:.2f}x"
            lines.append(
                f"| {r.batch} | {r.setting} | {side} | {r.first[side]:.2f} | {r.best[side]:.2f} | "
                f"{r.tokens_per_s(side):.1f} | {speedup} |"
            )
    if goal_row is not None:
        lines += ["", "| Goal | Value | Verdict |", "|---|---:|---|"]
        for side in goal_row.sides[:-1]:
            speedup = goal_row.speedup(side)
            lines.append(
                f"| {side.name} tokens/s ≥ {SPEEDUP_GOAL:g}x transformers `generate` at batch {GOAL_BATCH} | "
                f"{speedup:.2f}x | {verdict(speedup >= SPEEDUP_GOAL)} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="batch sizes (default: 1 16)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3, help="timed runs per side and batch, best kept")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="eu_jax_bench_generate_") as workdir:
        log("loading SmolLM2-135M-Instruct on both sides")
        models = load_models(Path(workdir))
        rows = [measure(*models, batch, args.new_tokens, args.runs) for batch in args.batches]
        decoders, reference, tokenizer = models
        sampled = measure_sampled(decoders["eu_jax"], reference, tokenizer, max(args.batches), args.new_tokens, args.runs)
    section = render_section(rows, sampled, args.runs, time.perf_counter() - start)
    publish(SECTION_TITLE, section, write=not args.no_write)


if __name__ == "__main__":
    main()
