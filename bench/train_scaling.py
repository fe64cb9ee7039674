#!/usr/bin/env python
"""How eu_jax's train step scales: step time and memory against sequence length and batch size, with and
without rematerialisation, with the loss's log-probs in chunks or all at once, and with causal attention in
query blocks or as one product.

The Exclusive Unlearning step on the SmolLM2-135M shape (random weights), fp32 on CPU. Memory is XLA's own
account of the compiled step (arguments: params, optimizer state, batch; temporaries: activations saved for
the backward pass and workspace), exact and free of the machine's noise; seconds are one step after
compilation (best of `--runs`). Writes its section of BENCHMARKS.md and a PNG plot next to it.

Usage:
    .venv/bin/python bench/train_scaling.py                    # full sweep (~20 min on 2 cores)
    .venv/bin/python bench/train_scaling.py --layers 2 --max-seq 256 --max-rows 2 --no-write   # quick smoke run
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from harness import benchmark_parser, log, machine_description, meminfo_bytes, timed  # noqa: E402
from report import BENCHMARKS, publish  # noqa: E402
from train_step import SMOLLM2, JaxRunner, Shape, write_model  # noqa: E402

from eu_jax.models.config import REMAT_POLICIES, RuntimeOptions  # noqa: E402

SECTION_TITLE = "## Train step scaling (bench/train_scaling.py)"
PLOT = BENCHMARKS.parent / "bench" / "plots" / "train_scaling.png"
GB = 10**9


@dataclasses.dataclass(frozen=True)
class Variant:
    sweep: str  # "sequence", "batch", "log-probs" or "attention"
    shape: Shape
    remat: str = RuntimeOptions().remat
    chunk_tokens: int = 1024
    attention_block: int = RuntimeOptions().attention_block

    @property
    def label(self) -> str:
        chunk = "one chunk per half" if self.chunk_tokens >= self.shape.rows * self.shape.seq else f"chunks of {self.chunk_tokens}"
        blocks = self.attention_block > 0 and self.shape.seq > self.attention_block
        attention = f"attention in blocks of {self.attention_block}" if blocks else "attention as one product"
        return f"remat {self.remat}, {chunk}, {attention}"


@dataclasses.dataclass(frozen=True)
class Point:
    variant: Variant
    seconds: float
    argument_bytes: int
    temp_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.variant.shape.tokens / self.seconds


def variants(layers: int, max_seq: int, max_rows: int) -> list[Variant]:
    seqs = [s for s in (128, 256, 512, 1024, 2048) if s <= max_seq]
    out = [Variant("sequence", Shape(layers, s, 1), remat) for remat in REMAT_POLICIES for s in seqs]
    all_rows = [r for r in (1, 2, 4, 8) if r <= max_rows]
    out += [Variant("batch", Shape(layers, 256, rows), remat) for remat in REMAT_POLICIES[:2] for rows in all_rows]
    rows_tokens = 4 * 256
    out += [Variant("log-probs", Shape(layers, 256, 4), chunk_tokens=c) for c in (128, rows_tokens)]
    out += [Variant("attention", Shape(layers, s, 1), "full", attention_block=0) for s in seqs if s >= 512]
    return out


def measure(ckpt: Path, v: Variant, runs: int) -> Point:
    runner = JaxRunner.from_checkpoint(ckpt, "eu", v.shape, chunk_tokens=v.chunk_tokens, remat=v.remat, attention_block=v.attention_block)
    memory = runner.memory_analysis()
    if memory["argument"] + memory["temp"] > meminfo_bytes("MemAvailable"):
        log(f"{v.sweep}: {v.shape}, {v.label}: needs {(memory['argument'] + memory['temp']) / GB:.1f} GB, does not fit")
        return Point(v, float("nan"), memory["argument"], memory["temp"])
    runner()  # the first call pays for moving buffers into place
    seconds = min(timed(runner)[0] for _ in range(runs))
    log(f"{v.sweep}: {v.shape}, {v.label}: {seconds:.2f} s, temporaries {memory['temp'] / GB:.2f} GB")
    return Point(v, seconds, memory["argument"], memory["temp"])


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    curves = {
        **{f"remat {remat}": lambda v, remat=remat: v.sweep == "sequence" and v.remat == remat for remat in REMAT_POLICIES},
        "remat full, attention as one product": lambda v: v.sweep == "attention",
    }
    for label, belongs in curves.items():
        pts = [p for p in points if belongs(p.variant)]
        seqs = [p.variant.shape.seq for p in pts]
        axes[0].plot(seqs, [p.seconds for p in pts], marker="o", label=label)
        axes[1].plot(seqs, [p.temp_bytes / GB for p in pts], marker="o", label=label)
    for ax, ylabel in zip(axes, ("seconds per step", "XLA temporaries (GB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (batch 1 + 1)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("eu_jax EU train step, SmolLM2-135M shape, fp32 CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render_section(points: list[Point], layers: int, runs: int, seconds: float, plot_path: Path | None) -> str:
    import jax

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION_TITLE,
        "",
        f"Exclusive Unlearning step on the SmolLM2-135M shape ({layers} layers, random weights), fp32, rows given "
        f"per half (retain and forget each). Measured {date} on {machine_description()}; jax {jax.__version__}. "
        f"Whole benchmark: {seconds / 60:.1f} min.",
        "",
        f"Seconds: one step after compilation, best of {runs}. Memory: XLA's account of the compiled step "
        "(arguments = params, AdamW state and batch; temporaries = activations kept for the backward pass and "
        "workspace), exact and independent of the machine's load. Remat `dots` (the default) keeps each layer's "
        "matmul outputs and recomputes the rest in the backward pass, `full` keeps only each layer's input, `none` "
        "every intermediate; log-probs are computed `chunk_tokens` tokens at a time (one chunk per half = the whole "
        f"half's {SMOLLM2['vocab_size']:,}-way logits at once). Causal attention runs `attention_block` queries "
        "at a time against the keys up to each block's end (the default), or as one [T, T] product per head "
        "(the attention sweep, for comparison).",
        "",
        "| Sweep | Rows per half | Sequence | Tokens per step | Variant | Seconds | Tokens/s | Arguments GB | Temporaries GB |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for p in points:
        v = p.variant
        timing = "does not fit in memory | —" if math.isnan(p.seconds) else f"{p.seconds:.2f} | {p.tokens_per_s:.0f}"
        lines.append(
            f"| {v.sweep} | {v.shape.rows} | {v.shape.seq} | {v.shape.tokens} | {v.label} | {timing} | "
            f"{p.argument_bytes / GB:.2f} | {p.temp_bytes / GB:.2f} |"
        )
    if plot_path is not None:
        lines += ["", f"![step time and memory against sequence length]({plot_path.relative_to(BENCHMARKS.parent).as_posix()})"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    parser.add_argument("--max-seq", type=int, default=2048)
    parser.add_argument("--max-rows", type=int, default=8, help="largest rows per half in the batch sweep")
    parser.add_argument("--runs", type=int, default=1, help="timed steps per point, best kept")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="eu_jax_bench_scaling_"))
    try:
        log(f"writing random SmolLM2-shaped weights ({args.layers} layers) and importing them")
        _, ckpt = write_model(Shape(args.layers, 1, 1), workdir)
        points = [measure(ckpt, v, args.runs) for v in variants(args.layers, args.max_seq, args.max_rows)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    plot_path = None if args.no_write else PLOT
    if plot_path is not None:
        plot(points, plot_path)
    publish(SECTION_TITLE, render_section(points, args.layers, args.runs, time.perf_counter() - start, plot_path), write=not args.no_write)


if __name__ == "__main__":
    main()
