#!/usr/bin/env python
"""Benchmark `eu-convert` import and export of a Llama-3.2-1B-shaped random checkpoint against raw file I/O.

The issue asks for import and export time compared with copying the same bytes, and peak RSS relative to
the model's bytes. This machine is shared and noisy, so absolute seconds say little: every figure that
matters is a ratio between two steps measured side by side in one run (import / read, export / copy,
peak RSS / model bytes). Each step runs in its own fresh Python process, which reports its own peak RSS,
so one step's memory cannot leak into the next one's figure. The script rewrites only its own section of
BENCHMARKS.md, so other benchmarks can add theirs.

Usage:
    .venv/bin/python bench/convert.py               # full 1B run (several minutes), rewrites BENCHMARKS.md
    .venv/bin/python bench/convert.py --layers 2 --no-write   # quick smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from harness import benchmark_parser, log, machine_description, peak_rss_bytes, run_child_process, serve_child, verdict
from report import publish

from eu_jax.convert.cli import parse_size  # light: argparse only, no jax in this parent process

SECTION_TITLE = "## Conversion (bench/convert.py)"

FULL_LAYERS = 16  # Llama-3.2-1B
FULL_VOCAB = 128256
GB = 10**9
COPY_CHUNK_BYTES = 64 * 2**20

# Goals from the project's performance issue.
IMPORT_TIME_GOAL = 2.0  # import time at most this many times the raw copy (read + write) of the source's bytes
PEAK_RSS_GOAL = 1.3  # peak RSS at most this many times the model's (fp32 params) bytes


# ----------------------------------------------------------------------------------------- the checkpoint


@dataclasses.dataclass(frozen=True)
class LlamaDims:
    """Llama-3.2-1B's dimensions; the tensor list and config.json are both derived from this one place."""

    layers: int = FULL_LAYERS
    vocab: int = FULL_VOCAB
    hidden: int = 2048
    intermediate: int = 8192
    heads: int = 32
    kv_heads: int = 8
    head_dim: int = 64

    @classmethod
    def scaled(cls, layers: int) -> LlamaDims:
        """`layers` decoder layers, with the vocabulary shrunk in proportion below 16 (a multiple of 128).

        Without the vocabulary cut a 2-layer smoke run would still carry the full 263M-parameter embedding,
        two thirds of its bytes, and take minutes instead of seconds.
        """
        if layers >= FULL_LAYERS:
            return cls(layers=layers)
        return cls(layers=layers, vocab=max(128, FULL_VOCAB * layers // FULL_LAYERS // 128 * 128))

    def hf_tensor_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """The tensor names and shapes of `transformers.LlamaForCausalLM`'s state dict, in its order.

        Listed by hand so no torch model has to be built (a 1B fp32 torch model takes minutes and ~5 GB).
        There is no lm_head.weight: the head is tied to the embeddings, and transformers does not save it.
        """
        hidden, inter = self.hidden, self.intermediate
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, hidden))]
        for i in range(self.layers):
            prefix = f"model.layers.{i}"
            shapes += [
                (f"{prefix}.self_attn.q_proj.weight", (q_out, hidden)),
                (f"{prefix}.self_attn.k_proj.weight", (kv_out, hidden)),
                (f"{prefix}.self_attn.v_proj.weight", (kv_out, hidden)),
                (f"{prefix}.self_attn.o_proj.weight", (hidden, q_out)),
                (f"{prefix}.mlp.gate_proj.weight", (inter, hidden)),
                (f"{prefix}.mlp.up_proj.weight", (inter, hidden)),
                (f"{prefix}.mlp.down_proj.weight", (hidden, inter)),
                (f"{prefix}.input_layernorm.weight", (hidden,)),
                (f"{prefix}.post_attention_layernorm.weight", (hidden,)),
            ]
        shapes.append(("model.norm.weight", (hidden,)))
        return shapes

    @property
    def params(self) -> int:
        return sum(math.prod(shape) for _, shape in self.hf_tensor_shapes())

    @property
    def fp32_bytes(self) -> int:
        """The fp32 params a model trains in: what load restores, and the yardstick of the peak-RSS goal."""
        return self.params * 4


def write_hf_config(dims: LlamaDims, out: Path) -> None:
    """config.json as transformers writes it for Llama-3.2-1B (tied embeddings, llama3 rope scaling).

    Run inside a conversion child only: the first use of LlamaConfig imports torch (5-10 s here), which
    those processes load anyway, while the parent and the raw baselines stay free of torch and jax.
    """
    import transformers

    transformers.LlamaConfig(
        vocab_size=dims.vocab,
        hidden_size=dims.hidden,
        intermediate_size=dims.intermediate,
        num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads,
        num_key_value_heads=dims.kv_heads,
        head_dim=dims.head_dim,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_theta": 500000.0,
        },
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        bos_token_id=128000,
        eos_token_id=128001,
        dtype="bfloat16",
    ).save_pretrained(out)


def random_tensor_loader(shape: tuple[int, ...], seed: int, is_norm: bool) -> Callable[[], Any]:
    """A lazy bf16 tensor: generated only when the writer asks, so one tensor is alive at a time."""

    def load():
        import ml_dtypes
        import numpy as np

        if is_norm:  # RMSNorm scales start at one, as in a real checkpoint
            return np.ones(shape, dtype=ml_dtypes.bfloat16)
        values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        values *= 0.02
        return values.astype(ml_dtypes.bfloat16)

    return load


def write_random_weights(dims: LlamaDims, out: Path, shard_bytes: int) -> list[Path]:
    """bf16 safetensors with random weights, written with the project's streaming writer; returns the files."""
    import ml_dtypes
    import numpy as np

    from eu_jax.convert.safetensors_io import TensorToWrite, write_safetensors_shards

    bf16 = np.dtype(ml_dtypes.bfloat16)
    tensors = [
        TensorToWrite(name, shape, bf16, random_tensor_loader(shape, seed, name.endswith("norm.weight")))
        for seed, (name, shape) in enumerate(dims.hf_tensor_shapes())
    ]
    paths = write_safetensors_shards(tensors, out, max_shard_bytes=shard_bytes)
    return [path for path in paths if path.suffix == ".safetensors"]


# ----------------------------------------------------------------------------------------- child steps
# Each runs in a fresh interpreter (see `run_step`). Conversion steps load their libraries before the clock
# starts, so the seconds are the conversion's own, and report that footprint as their floor.


def _load_conversion_libraries() -> dict[str, Any]:
    """Load everything import/export pull in and start the CPU backend, so the clock then times conversion only.

    Touching ``transformers.AutoConfig`` matters: it is lazy, and the first use imports torch (seconds), which
    would otherwise land inside the import's timing. The load time is reported separately as start-up.
    """
    start = time.perf_counter()
    import jax
    import numpy
    import transformers

    import eu_jax.convert.export  # noqa: F401
    import eu_jax.convert.hf_import  # noqa: F401

    transformers.AutoConfig, transformers.LlamaConfig, transformers.GenerationConfig  # noqa: B018
    jax.devices()
    versions = {"jax": jax.__version__, "numpy": numpy.__version__, "transformers": transformers.__version__}
    # The idle process's footprint: interpreter, libraries, CPU backend. Peak so far, so it is exact.
    return {"startup": time.perf_counter() - start, "floor": peak_rss_bytes(), "versions": versions}


def back_memory(nbytes: int) -> None:
    """Write and free `nbytes` of memory, then restart the process's peak RSS (VmHWM) from its present RSS.

    On the VMs these runs use, memory the guest has not used lately costs 2-3 s of kernel time per GB at its
    first write (BENCHMARKS.md, conversion findings), so a step's seconds would depend on how much fresh
    memory it meets, which the host's reclaim timing decides, not the step. Every step does this before its
    clock starts, so each meets memory the host backs, and the peak RSS stays the step's own."""
    import numpy as np

    if nbytes:
        block = np.ones(nbytes, np.uint8)  # every page written
        del block  # glibc unmaps a block this large at once
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM


def child_read(files: list[str], backed_bytes: int) -> dict[str, Any]:
    """Raw read: every byte of the weight files into one numpy buffer, as an import must at least do."""
    import numpy as np

    sizes = [os.path.getsize(file) for file in files]
    back_memory(backed_bytes)
    start = time.perf_counter()
    buffer = np.empty(sum(sizes), dtype=np.uint8)
    view, done = memoryview(buffer), 0
    for file, size in zip(files, sizes):
        with open(file, "rb", buffering=0) as f:
            end = done + size
            while done < end:
                count = f.readinto(view[done:end])
                if not count:
                    raise OSError(f"{file} ended early")
                done += count
    return {"seconds": time.perf_counter() - start}


def child_copy(files: list[str], dest_dir: str, target_bytes: int, backed_bytes: int) -> dict[str, Any]:
    """Raw copy: read and write `target_bytes` through user space, cycling over `files`.

    A plain read/write loop rather than shutil.copyfile, whose in-kernel sendfile never touches user
    memory and so is not a copy an exporter (which must produce its bytes) could match.
    """
    buffer = bytearray(COPY_CHUNK_BYTES)
    view = memoryview(buffer)
    back_memory(backed_bytes)
    start = time.perf_counter()
    written, round_ = 0, 0
    while written < target_bytes:
        for file in files:
            if written >= target_bytes:
                break
            dest = Path(dest_dir) / f"copy{round_}-{Path(file).name}"
            with open(file, "rb", buffering=0) as src, open(dest, "wb", buffering=0) as out:
                while written < target_bytes and (count := src.readinto(view)):
                    count = min(count, target_bytes - written)
                    out.write(view[:count])
                    written += count
        round_ += 1
    return {"seconds": time.perf_counter() - start}


def child_import(src: str, out: str, dims: dict[str, int], backed_bytes: int) -> dict[str, Any]:
    loaded = _load_conversion_libraries()
    from eu_jax.convert.hf_import import import_checkpoint
    from eu_jax.models.config import RuntimeOptions

    write_hf_config(LlamaDims(**dims), Path(src))  # completes the source; see write_hf_config for why here
    back_memory(backed_bytes)
    start = time.perf_counter()
    import_checkpoint(Path(src), Path(out), options=RuntimeOptions(param_dtype="float32"), progress=False)
    return {"seconds": time.perf_counter() - start, **loaded}


def child_load(ckpt: str, backed_bytes: int) -> dict[str, Any]:
    """Restore the imported checkpoint as fp32 params on the CPU device, as a training run starts."""
    loaded = _load_conversion_libraries()
    import jax

    from eu_jax.convert.checkpoint import load_model_meta, load_params
    from eu_jax.models.state import params_shardings
    from eu_jax.parallel.mesh import single_device_mesh

    back_memory(backed_bytes)
    start = time.perf_counter()
    meta = load_model_meta(Path(ckpt))
    params, _ = load_params(Path(ckpt), params_shardings(meta.config, single_device_mesh()))
    jax.block_until_ready(params)
    return {"seconds": time.perf_counter() - start, **loaded}


def child_export(ckpt: str, out: str, dtype: str, shard_bytes: int, backed_bytes: int) -> dict[str, Any]:
    loaded = _load_conversion_libraries()
    from eu_jax.convert.export import export_checkpoint

    back_memory(backed_bytes)
    start = time.perf_counter()
    export_checkpoint(Path(ckpt), Path(out), dtype=dtype, max_shard_bytes=shard_bytes, progress=False)
    return {"seconds": time.perf_counter() - start, **loaded}


CHILD_STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "read": child_read,
    "copy": child_copy,
    "import": child_import,
    "load": child_load,
    "export": child_export,
}


# ----------------------------------------------------------------------------------------- the parent


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    work: str
    bytes: int  # bytes read (read, import), written (copy, export) or restored (load)
    seconds: float
    peak_rss: int
    extra: dict[str, Any]

    @property
    def gb_per_s(self) -> float:
        return self.bytes / GB / self.seconds if self.seconds else float("nan")


def run_step(
    name: str,
    work: str,
    nbytes: int,
    child: str,
    runs: int = 1,
    cleanup: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Step:
    """Run a step `runs` times and keep the fastest; `cleanup` removes a run's output before the next run.

    Every step, baselines and conversions alike, takes seconds on the 1B model, so a neighbour's burst on this
    shared machine, or a slow spell of its disk, can double one run; the best of a few is each step's honest
    figure, and the ratios compare best with best (when only the baselines were the best of 3, the import
    measured 1.5x-2.6x the copy in three runs of one day).
    """
    log(f"{name}: {work} ...")
    results = []
    for attempt in range(runs):
        if attempt and cleanup is not None:
            cleanup()
        results.append(run_child_process(__file__, child, kwargs))
    seconds = ", ".join(f"{result['seconds']:.2f}" for result in results)
    best = dict(min(results, key=lambda result: result["seconds"]))
    step = Step(name, work, nbytes, best.pop("seconds"), best.pop("peak_rss"), best)
    log(f"  {name}: {seconds} s, peak RSS {step.peak_rss / GB:.2f} GB")
    return step


def empty_dir(path: Path) -> None:
    for child in path.iterdir():
        child.unlink()


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


@dataclasses.dataclass(frozen=True)
class Run:
    dims: LlamaDims
    file_bytes: int
    files: int
    shard_bytes: int
    steps: dict[str, Step]
    ckpt_bytes: int
    seconds: float
    runs: int
    backed_bytes: int


def run_benchmark(run_dir: Path, dims: LlamaDims, shard_bytes: int, runs: int, fresh_memory: bool = False) -> Run:
    """All steps in order, each baseline before the conversions it is compared with.

    Unless `fresh_memory`, each step first writes and frees as much memory as the fp32 params and the source
    together (`back_memory`), more than any step touches."""
    start = time.perf_counter()
    src, ckpt = run_dir / "hf_src", run_dir / "ckpt"
    log(f"writing random {dims} bf16 weights to {src}")
    files = [str(f) for f in write_random_weights(dims, src, shard_bytes)]
    file_bytes = sum(os.path.getsize(f) for f in files)
    backed = 0 if fresh_memory else dims.fp32_bytes + file_bytes
    measure = functools.partial(run_step, runs=runs, backed_bytes=backed)  # every child step takes both
    steps: dict[str, Step] = {}

    def add(step: Step) -> None:
        steps[step.name] = step

    def copy_step(short: str, copy_bytes: int) -> Step:
        copies = run_dir / f"copy_{short}"
        copies.mkdir()
        copied = measure(f"copy {short}", f"read+write {copy_bytes / GB:.2f} GB of the source files", copy_bytes, "copy",
                         cleanup=lambda: empty_dir(copies), files=files, dest_dir=str(copies), target_bytes=copy_bytes)
        shutil.rmtree(copies)
        return copied

    add(measure("read", "read the safetensors bytes into one buffer", file_bytes, "read", files=files))
    add(copy_step("bf16", file_bytes))  # the import's baseline and export bf16's
    add(measure("import", "import to an orbax checkpoint (the bf16 weights kept as bf16)", file_bytes, "import",
                cleanup=functools.partial(shutil.rmtree, ckpt), src=str(src), out=str(ckpt), dims=dataclasses.asdict(dims)))
    add(measure("load", "restore that checkpoint as fp32 params (a training run's start)", dims.fp32_bytes, "load",
                ckpt=str(ckpt)))
    for dtype, short, copy_bytes in (("bfloat16", "bf16", file_bytes), ("float32", "fp32", 2 * file_bytes)):
        if f"copy {short}" not in steps:
            add(copy_step(short, copy_bytes))
        out = run_dir / f"export_{short}"
        export = measure(f"export {short}", f"export to {dtype} safetensors", 0, "export",
                         cleanup=functools.partial(shutil.rmtree, out),
                         ckpt=str(ckpt), out=str(out), dtype=dtype, shard_bytes=shard_bytes)
        add(dataclasses.replace(export, bytes=dir_bytes(out, "*.safetensors")))
        shutil.rmtree(out)
    seconds = time.perf_counter() - start
    return Run(dims, file_bytes, len(files), shard_bytes, steps, dir_bytes(ckpt), seconds, runs, backed)


# ----------------------------------------------------------------------------------------- the report


def render_section(run: Run) -> str:
    """The markdown section, generated from the measurements only."""
    return "\n".join([*_section_intro(run), "", *_steps_table(run), "", *_ratios_table(run), ""])


def _section_intro(run: Run) -> list[str]:
    versions = run.steps["import"].extra.get("versions", {})
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    dims = run.dims
    scale = "" if dims == LlamaDims() else (
        f" **scaled to {dims.layers} layers and a {dims.vocab}-token vocabulary (a smoke run, not the 1B figures)**"
    )
    return [
        SECTION_TITLE,
        "",
        f"Random Llama-3.2-1B-shaped checkpoint{scale}: {dims.params / 1e9:.2f} B parameters, "
        f"{run.file_bytes / GB:.2f} GB of bf16 safetensors in {run.files} file(s) "
        f"(shards of at most {run.shard_bytes / GB:g} GB); fp32 params {run.dims.fp32_bytes / GB:.2f} GB "
        f"(orbax checkpoint {run.ckpt_bytes / GB:.2f} GB on disk).",
        f"Measured {date} on {machine_description()}; Python {sys.version.split()[0]}, "
        + ", ".join(f"{name} {version}" for name, version in versions.items())
        + f". Whole benchmark: {run.seconds / 60:.1f} min.",
        "",
        "Each step is a fresh process. Seconds exclude interpreter and library start-up, shown apart (the first "
        "use of transformers' AutoConfig imports torch). Every step, baselines and conversions alike, is the best "
        f"of {run.runs} runs, each in a process of its own. Peak RSS is the best run's own high-water mark "
        "(VmHWM); the floor is the same process's footprint once its libraries are loaded, before it converts. "
        "The source is warm in the page cache for both read and import (so the read baseline is as fast as it "
        "gets), and dirty pages are flushed before every step. GB are 10^9 bytes; params are the model's "
        "fp32 params (what training holds): the import keeps the source's bf16 in its checkpoint, load widens it "
        "to fp32, export reads it a parameter at a time (the next one read ahead while one is written).",
        "",
        (f"Before its clock starts, every step writes and frees {run.backed_bytes / GB:.2f} GB of memory (the fp32 "
         "params and the source together, more than any step touches) and restarts its peak RSS: on the VMs "
         "these runs use, memory the guest has not used lately costs 2-3 s of kernel time per GB at its first "
         "write, so without it each step's seconds would follow how much such memory it happened to meet "
         "(findings below)." if run.backed_bytes else
         "**Run with `--fresh-memory`**: the steps did not write and free memory before their clocks started, so "
         "each met whatever memory the host had reclaimed (findings below)."),
    ]


def _steps_table(run: Run) -> list[str]:
    lines = [
        "| Step | Work | GB | Start-up s | Seconds | GB/s | Peak RSS GB | Floor GB | Peak / params | "
        "(Peak − floor) / params | Peak / file |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for step in run.steps.values():
        startup, floor = step.extra.get("startup"), step.extra.get("floor")
        lines.append(
            f"| {step.name} | {step.work} | {step.bytes / GB:.2f} | {_maybe(startup, '.1f')} | "
            f"{step.seconds:.2f} | {step.gb_per_s:.2f} | {step.peak_rss / GB:.2f} | "
            f"{_maybe(None if floor is None else floor / GB)} | {step.peak_rss / run.dims.fp32_bytes:.2f} | "
            f"{_maybe(None if floor is None else (step.peak_rss - floor) / run.dims.fp32_bytes)} | "
            f"{step.peak_rss / run.file_bytes:.2f} |"
        )
    return lines


def _maybe(value: float | None, spec: str = ".2f") -> str:
    return "—" if value is None else format(value, spec)


def _ratios_table(run: Run) -> list[str]:
    """The issue's goals with verdicts, and the other side-by-side ratios for context."""
    s = run.steps
    time_ratio = s["import"].seconds / s["copy bf16"].seconds
    lines = [
        "| Ratio | Value | Goal | Verdict |",
        "|---|---:|---:|---|",
        f"| import time / copy bf16 time (the source's bytes read and written, what an import does at least) | "
        f"{time_ratio:.2f}x | ≤ {IMPORT_TIME_GOAL:g}x | {verdict(time_ratio <= IMPORT_TIME_GOAL)} |",
        f"| import time / read time | {s['import'].seconds / s['read'].seconds:.2f}x | — | — |",
        f"| load time / copy fp32 time (the fp32 params' bytes) | "
        f"{s['load'].seconds / s['copy fp32'].seconds:.2f}x | — | — |",
    ]
    for short in ("bf16", "fp32"):
        ratio = s[f"export {short}"].seconds / s[f"copy {short}"].seconds
        lines.append(f"| export {short} time / copy {short} time (same bytes written) | {ratio:.2f}x | — | — |")
    for name in ("import", "load", "export bf16", "export fp32"):
        raw = s[name].peak_rss / run.dims.fp32_bytes
        net = (s[name].peak_rss - s[name].extra["floor"]) / run.dims.fp32_bytes
        # The goal is the conversions'; load is orbax's restore, shown for what a run's start costs.
        goal = ("—", "—") if name == "load" else (f"≤ {PEAK_RSS_GOAL:g}x", verdict(raw <= PEAK_RSS_GOAL))
        lines.append(f"| {name} peak RSS / fp32 params bytes (minus the floor: {net:.2f}x) | {raw:.2f}x | {' | '.join(goal)} |")
    return lines


# ----------------------------------------------------------------------------------------- command line


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = benchmark_parser(__doc__, children=True)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the run's temporary directory is made (default: %(default)s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's directory (source checkpoint, import output)")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (16 = Llama-3.2-1B)")
    parser.add_argument("--shard-size", type=parse_size, default=5 * GB,
                        help="max safetensors shard size for the source and the exports (default 5GB: one file)")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs of every step, baselines and conversions, best kept (default %(default)s)")
    parser.add_argument("--fresh-memory", action="store_true",
                        help="do not write and free memory before each step (see back_memory)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if serve_child(args.child, CHILD_STEPS):
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(tempfile.mkdtemp(prefix="eu_jax_bench_convert_", dir=args.workdir))
    try:
        run = run_benchmark(run_dir, LlamaDims.scaled(args.layers), args.shard_size, args.runs, args.fresh_memory)
    finally:
        if args.keep:
            log(f"kept {run_dir}")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
    section = render_section(run)
    publish(SECTION_TITLE, section, write=not args.no_write)


if __name__ == "__main__":
    main()
