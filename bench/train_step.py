#!/usr/bin/env python
"""Benchmark eu_jax's train step against a PyTorch step doing the same math with transformers' Llama.

The Exclusive Unlearning step (retain NLL + KL-to-uniform on the forget half, global-norm clipping, AdamW)
on the SmolLM2-135M shape (random weights saved in bf16, identical on both sides), fp32 on CPU, batch 4 + 4 rows of 256
tokens. eu_jax, PyTorch eager and `torch.compile` each run in a fresh process (in one process their thread
pools slow each other), one after the other in one run; the best of N steps is kept, and the same processes
give peak memory, also of an NPO step (which runs the frozen reference model too). In the same run, the
matmul rate of the model's own shapes is measured with XLA and with PyTorch, so achieved FLOP/s can be read
as a fraction of the best this machine did.

Goals (the performance issue): eu_jax tokens/s at least 1.2x PyTorch eager's; achieved FLOP/s at least 80%
of the best matmul rate; the NPO step's peak RSS at most 1.15x the EU step's.

Usage:
    .venv/bin/python bench/train_step.py                 # full run (~15 min on 2 cores), rewrites BENCHMARKS.md
    .venv/bin/python bench/train_step.py --layers 2 --seq 64 --steps 1 --no-write   # quick smoke run
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
from typing import Any, Callable

os.environ.setdefault("JAX_PLATFORMS", "cpu")

from harness import ROOT, benchmark_parser, current_rss_bytes, fastest_torch_threads, log, machine_description, run_child_process, serve_child, timed, verdict  # noqa: E402
from report import publish  # noqa: E402

SECTION_TITLE = "## Train step (bench/train_step.py)"
SPEEDUP_GOAL = 1.2  # eu_jax tokens/s at least this many times PyTorch eager's
MATMUL_FRACTION_GOAL = 0.8  # achieved FLOP/s at least this share of the best matmul rate
NPO_MEMORY_GOAL = 1.15  # NPO step's peak RSS at most this many times the EU step's
GB = 10**9

# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M-Instruct config.json).
SMOLLM2 = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    max_position_embeddings=8192, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)
LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM, NPO_BETA = 1e-5, 0.01, 1.0, 0.1


@dataclasses.dataclass(frozen=True)
class Shape:
    layers: int
    seq: int
    rows: int  # per half: the batch is `rows` retain + `rows` forget rows

    @property
    def tokens(self) -> int:
        return 2 * self.rows * self.seq


# ----------------------------------------------------------------------------------------- the model


def smollm2_config(layers: int):
    """transformers' LlamaConfig of the SmolLM2-135M shape with `layers` layers."""
    import transformers

    return transformers.LlamaConfig(**dict(SMOLLM2, num_hidden_layers=layers))


def write_model(shape: Shape, out: Path) -> tuple[Path, Path]:
    """Random SmolLM2-shaped weights saved by transformers in bf16, as SmolLM2 is released, and their eu_jax
    import (which keeps them in bf16 on disk). Both sides compute with the same values widened to fp32."""
    import torch
    import transformers

    from eu_jax.convert.hf_import import import_checkpoint

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(smollm2_config(shape.layers))
    model.to(torch.bfloat16).save_pretrained(out / "hf")
    return out / "hf", import_checkpoint(out / "hf", out / "eu_jax", progress=False)


def make_batch(shape: Shape, vocab_size: int = SMOLLM2["vocab_size"], seed: int = 0) -> dict[str, Any]:
    """Token ids for both halves; every token counts (the mask is all ones)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab_size, size=(2, shape.rows, shape.seq), dtype=np.int32)
    ones = np.ones((shape.rows, shape.seq), np.int32)
    return {half: {"input_ids": ids[i], "attention_mask": ones, "loss_mask": ones} for i, half in enumerate(("retain", "forget"))}


# ----------------------------------------------------------------------------------------- eu_jax side


def jax_step(
    params: dict[str, Any], config: Any, objective_name: str, chunk_tokens: int = 1024, reference: Any = None, **runtime: Any
):
    """eu_jax's jitted train step, its state, reference params and jitted reference forward (None without a
    reference), exactly as `eu-train` builds them.

    `params` are donated to the train state; `reference`: the frozen reference's device arrays, where the
    objective needs one (default: a copy of `params`); `runtime` are RuntimeOptions fields (remat, dtype, ...)."""
    import jax
    import jax.numpy as jnp
    from ml_collections import ConfigDict

    from eu_jax.models.config import RuntimeOptions
    from eu_jax.objectives import Objective
    from eu_jax.train.optimizer import learning_rate_schedule, make_optimizer
    from eu_jax.train.state import new_train_state
    from eu_jax.train.step import make_reference_forward, make_train_step

    forget = {"eu": "uniform_kl", "npo": "npo"}[objective_name]
    objective = Objective(retain="nll", forget=forget, forget_kwargs={"beta": NPO_BETA} if forget == "npo" else {})
    opt = ConfigDict(dict(learning_rate=LEARNING_RATE, schedule="constant", warmup_steps=0, end_lr_ratio=1.0,
                          weight_decay=WEIGHT_DECAY, b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=CLIP_NORM))
    # A copy on the device, as `eu-train` loads it: host arrays would be taken in again by every step.
    needs_reference = objective.requirements().needs_reference
    if not needs_reference:
        reference = None
    elif reference is None:
        reference = jax.tree.map(lambda p: jnp.array(p, copy=True), params)
    optimizer = make_optimizer(opt, 1000)
    options = RuntimeOptions(**runtime)
    step = make_train_step(config, options, objective, optimizer, learning_rate_schedule(opt, 1000), 1, chunk_tokens)
    state = jax.jit(lambda p: new_train_state(optimizer, p, 0), donate_argnums=0)(params)
    reference_forward = make_reference_forward(config, options, objective) if needs_reference else None
    return jax.jit(step, donate_argnums=0), state, reference, reference_forward and jax.jit(reference_forward)


def cpu_preset_chunk_tokens() -> int:
    """The log-prob chunk `eu-train` uses on the cpu hardware preset (configs/hardware/cpu.py)."""
    from eu_jax.files import load_python_file

    experiment = load_python_file(ROOT / "configs" / "experiment.py")
    return int(experiment.get_config("hardware=cpu").objective.chunk_tokens)


class JaxRunner:
    """Runs eu_jax's step in place: each call advances the state by one step."""

    def __init__(self, params: dict[str, Any], config: Any, objective: str, shape: Shape, **options: Any):
        import jax

        self.step, self.state, self.reference, self.reference_forward = jax_step(params, config, objective, **options)
        self.batch = jax.device_put(make_batch(shape, config.vocab_size))
        self.compiled = self.step.lower(self.state, self.step_batch(), self.reference).compile()

    def step_batch(self) -> dict[str, Any]:
        """The batch as the step takes it: with the reference's outputs, computed afresh as `eu-train` does."""
        from eu_jax.train.step import with_reference_outputs

        if self.reference_forward is None:
            return self.batch
        return with_reference_outputs(self.batch, self.reference_forward(self.reference, self.batch))

    @classmethod
    def from_checkpoint(cls, ckpt: Path, objective: str, shape: Shape, **options: Any) -> "JaxRunner":
        """A runner on a fresh load of an eu_jax checkpoint's params (the runner's state takes them over), and
        of its frozen reference in the dtype it is stored in, as `eu-train` loads them."""
        import jax

        from eu_jax.convert.checkpoint import load_params

        params, meta = load_params(ckpt, None)
        reference = jax.device_put(load_params(ckpt, None, keep_stored_dtype=True)[0]) if objective == "npo" else None
        return cls(params, meta.config, objective, shape, reference=reference, **options)

    def __call__(self) -> float:
        import jax

        self.state, metrics = self.compiled(self.state, self.step_batch(), self.reference)
        return float(jax.block_until_ready(metrics["loss"]))

    def memory_analysis(self) -> dict[str, int]:
        stats = self.compiled.memory_analysis()
        return {k: int(getattr(stats, f"{k}_size_in_bytes")) for k in ("argument", "output", "temp", "alias")}


# ----------------------------------------------------------------------------------------- PyTorch side


def torch_losses(model, reference, batch: dict[str, Any], objective: str):
    """The same objective in PyTorch: retain NLL + KL(U || p) on the forget half (EU), or + NPO."""
    import torch
    import torch.nn.functional as F

    retain, forget = (torch.as_tensor(batch[h]["input_ids"], dtype=torch.long) for h in ("retain", "forget"))
    rows = retain.shape[0]
    logp = F.log_softmax(model(input_ids=torch.cat([retain, forget])).logits[:, :-1].float(), dim=-1)
    targets = torch.cat([retain, forget])[:, 1:, None]
    retain_nll = -logp[:rows].gather(-1, targets[:rows]).mean()
    if objective == "eu":
        forget_term = (-math.log(logp.shape[-1]) - logp[rows:].mean(-1)).mean()
    else:
        with torch.no_grad():
            ref_logp = F.log_softmax(reference(input_ids=forget).logits[:, :-1].float(), dim=-1)
        ratio = (logp[rows:].gather(-1, targets[rows:]) - ref_logp.gather(-1, targets[rows:])).sum(dim=(1, 2))
        forget_term = -(2.0 / NPO_BETA) * F.logsigmoid(-NPO_BETA * ratio).mean()
    return retain_nll + forget_term


class TorchRunner:
    """transformers' LlamaForCausalLM (eager, or under torch.compile) with AdamW, one step per call."""

    def __init__(self, hf_dir: Path, objective: str, shape: Shape, compiled: bool = False):
        import copy

        import torch
        import transformers

        self.model = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
        self.model.train()
        self.reference = None
        if objective == "npo":
            self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, eps=1e-8)
        self.batch, self.objective = make_batch(shape), objective
        self.loss_fn = torch.compile(torch_losses) if compiled else torch_losses

    def __call__(self) -> float:
        import torch

        loss = self.loss_fn(self.model, self.reference, self.batch, self.objective)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP_NORM)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())


# ----------------------------------------------------------------------------------------- matmul rates


def matmul_shapes(shape: Shape) -> list[tuple[int, int, int, int]]:
    """(tokens, in, out, count) of one forward's matmuls over the whole batch (both halves run as one
    forward on both sides): q, k, v, o, gate, up, down per layer, and the output head."""
    d, f, v = SMOLLM2["hidden_size"], SMOLLM2["intermediate_size"], SMOLLM2["vocab_size"]
    heads, kv_heads = SMOLLM2["num_attention_heads"], SMOLLM2["num_key_value_heads"]
    head_dim = d // heads
    n, layers = shape.tokens, shape.layers
    return [
        (n, d, heads * head_dim, 2 * layers),  # q, o
        (n, d, kv_heads * head_dim, 2 * layers),  # k, v
        (n, d, f, 2 * layers),  # gate, up
        (n, f, d, layers),  # down
        (n, d, v, 1),  # output head
    ]


def matmul_rates(shape: Shape, repeats: int) -> dict[str, float]:
    """FLOP/s of the model's matmul mix (each shape best of `repeats`, weighted by its count), XLA and torch."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rates = {}
    for side in ("xla", "torch"):
        flops = seconds = 0.0
        for n, k, m, count in matmul_shapes(shape):
            a = np.random.default_rng(0).standard_normal((n, k), np.float32)
            b = np.random.default_rng(1).standard_normal((k, m), np.float32)
            if side == "xla":
                x, w = jax.device_put(a), jax.device_put(b)
                fn = jax.jit(jnp.matmul)
                run = lambda: fn(x, w).block_until_ready()  # noqa: E731
            else:
                x, w = torch.from_numpy(a), torch.from_numpy(b)
                run = lambda: torch.mm(x, w)  # noqa: E731
            run()
            best = min(timed(run)[0] for _ in range(repeats))
            flops += 2.0 * n * k * m * count
            seconds += best * count
        rates[side] = flops / seconds
    return rates


# ----------------------------------------------------------------------------------------- measurements


def eu_step_flops(hf_config: Any, shape: Shape) -> float:
    """Analytic matmul FLOPs of one EU step (no reference model) of a transformers config's model, as eu-train's
    logs count them."""
    from eu_jax.models.config import from_hf_config
    from eu_jax.train.flops import step_flops

    return step_flops(from_hf_config(hf_config), shape.seq, shape.tokens, 0)


SIDES = ("eu_jax", "PyTorch eager", "torch.compile")


def child_side(side: str, objective: str, hf_dir: str, ckpt: str, shape: dict[str, int], steps: int) -> dict[str, Any]:
    """One side and objective in a fresh process: set-up, the first step (compilation or warm-up), then `steps`
    timed steps; its RSS once set up (the floor) and its peak."""
    shp = Shape(**shape)
    start = time.perf_counter()
    if side == "eu_jax":
        runner = JaxRunner.from_checkpoint(Path(ckpt), objective, shp, chunk_tokens=cpu_preset_chunk_tokens())
    else:
        runner = TorchRunner(Path(hf_dir), objective, shp, compiled=side == "torch.compile")
    floor = current_rss_bytes()
    loss = runner()
    first = time.perf_counter() - start
    threads = fastest_torch_threads(runner) if side != "eu_jax" else 0
    seconds = [timed(runner)[0] for _ in range(steps)]
    result = {"floor": floor, "first": first, "seconds": seconds, "loss": loss, "torch_threads": threads}
    if side == "eu_jax":
        result["xla"] = runner.memory_analysis()
    return result


def child_matmul(shape: dict[str, int]) -> dict[str, Any]:
    return matmul_rates(Shape(**shape), repeats=5)


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {"side": child_side, "matmul": child_matmul}


@dataclasses.dataclass
class Results:
    shape: Shape
    sides: dict[str, dict[str, Any]]  # "eu_jax eu" -> child result (a failed side: {"failed": reason})
    rates: dict[str, float]
    flops: float
    steps: int
    seconds: float

    def best(self, key: str) -> float:
        return min(self.sides[key]["seconds"])


def run_benchmark(workdir: Path, shape: Shape, steps: int, try_compile: bool) -> Results:
    start = time.perf_counter()
    log(f"writing random SmolLM2-shaped weights ({shape.layers} layers) and importing them")
    hf_dir, ckpt = write_model(shape, workdir)
    runs = [(side, "eu") for side in SIDES if try_compile or side != "torch.compile"]
    runs += [("eu_jax", "npo"), ("PyTorch eager", "npo")]
    sides = {}
    for side, objective in runs:
        log(f"{side} {objective} step in a fresh process")
        kwargs = dict(side=side, objective=objective, hf_dir=str(hf_dir), ckpt=str(ckpt), shape=dataclasses.asdict(shape), steps=steps)
        try:
            sides[f"{side} {objective}"] = run_child_process(__file__, "side", kwargs)
        except RuntimeError as err:  # torch.compile may not work on every CPU box; say so in the table
            if side != "torch.compile":
                raise
            sides[f"{side} {objective}"] = {"failed": str(err)}
        result = sides[f"{side} {objective}"]
        log(f"  {result.get('seconds', result.get('failed'))}")
    log("matmul rates of the model's shapes (XLA and torch)")
    rates = run_child_process(__file__, "matmul", dict(shape=dataclasses.asdict(shape)))
    flops = eu_step_flops(smollm2_config(shape.layers), shape)
    return Results(shape, sides, {k: rates[k] for k in ("xla", "torch")}, flops, steps, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------- the report


def render_section(r: Results) -> str:
    import jax
    import torch
    import transformers

    from eu_jax.models.config import RuntimeOptions

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    best_rate = max(r.rates.values())
    eager = r.best("PyTorch eager eu")
    lines = [
        SECTION_TITLE,
        "",
        f"Exclusive Unlearning step (retain NLL + KL-to-uniform forget, global-norm clipping, AdamW) on the SmolLM2-135M "
        f"shape ({r.shape.layers} layers, random weights saved in bf16, identical on both sides), fp32, batch {r.shape.rows} + "
        f"{r.shape.rows} rows of {r.shape.seq} tokens ({r.shape.tokens} tokens per step). Measured {date} on "
        f"{machine_description()}; jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}. "
        f"Whole benchmark: {r.seconds / 60:.1f} min.",
        "",
        f"Each side and objective runs in a fresh process, one after the other in this run: set-up, a first step "
        f"(eu_jax and torch.compile: compilation; eager: warm-up), then {r.steps} timed steps, best kept (sides in one "
        "process slow each other: torch's and XLA's thread pools compete). The PyTorch reference runs transformers' "
        "`LlamaForCausalLM` (eager attention) on both halves at once, full-vocabulary log-softmax, `clip_grad_norm_` "
        "and `torch.optim.AdamW`; eu_jax runs `make_train_step` as `eu-train` does (both halves in one forward, "
        f"log-probs in chunks of {cpu_preset_chunk_tokens()} tokens (the cpu preset's), remat `{RuntimeOptions().remat}`: each layer keeps its matmul outputs "
        "for the backward pass and recomputes the rest). FLOP/s = analytic matmul FLOPs of the step (`eu_jax.train.flops`, "
        f"{r.flops / 1e12:.2f} TFLOP) / seconds. torch uses 1 thread or all cores, whichever a short probe found "
        "faster. Peak RSS is the process's high-water mark (VmHWM); the floor is its RSS once the model, optimizer "
        "and batch are set up. The NPO step also runs the frozen reference model on the forget half (eu_jax holds it "
        "in the bf16 its checkpoint stores and runs its forward as a program of its own before each step, as "
        "`eu-train` does; PyTorch in fp32, under `no_grad`). XLA's own figures (eu_jax): arguments (params, AdamW "
        "state, batch, and the reference's outputs and output projection) and temporaries of the compiled step.",
        "",
        "| Side | Objective | First step s | Seconds per step | Tokens/s | GFLOP/s | Share of best matmul rate "
        "| Speed-up vs eager | Loss of step 1 | Peak RSS GB | Floor GB | XLA arguments GB | XLA temporaries GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, m in r.sides.items():
        side, objective = key.rsplit(" ", 1)
        if "failed" in m:
            lines.append(f"| {side} | {objective.upper()} | failed: {m['failed'][:160]} |" + " |" * 10)
            continue
        best = min(m["seconds"])
        threads = f" ({m['torch_threads']} thread{'s' if m['torch_threads'] > 1 else ''})" if m["torch_threads"] else ""
        rate = r.flops / best if objective == "eu" else float("nan")
        xla = m.get("xla")
        xla_cells = f"{xla['argument'] / GB:.2f} | {xla['temp'] / GB:.2f}" if xla else "— | —"
        compute = (f"{rate / 1e9:.1f} | {rate / best_rate:.0%} | {eager / best:.2f}x" if objective == "eu" else "— | — | —")
        lines.append(
            f"| {side}{threads} | {objective.upper()} | {m['first']:.1f} | {best:.2f} | {r.shape.tokens / best:.0f} | "
            f"{compute} | {m['loss']:.4f} | {m['peak_rss'] / GB:.2f} | {m['floor'] / GB:.2f} | {xla_cells} |"
        )
    ours = r.best("eu_jax eu")
    speedup, share = eager / ours, r.flops / ours / best_rate
    npo_ratio = r.sides["eu_jax npo"]["peak_rss"] / r.sides["eu_jax eu"]["peak_rss"]
    lines += [
        "",
        f"Matmul rate of the model's own shapes ({r.shape.tokens} tokens x q/k/v/o/gate/up/down and the output head, "
        f"weighted by their count in a forward, each best of 5, in a process of its own): XLA "
        f"{r.rates['xla'] / 1e9:.1f} GFLOP/s, PyTorch {r.rates['torch'] / 1e9:.1f} GFLOP/s.",
        "",
        "| Goal | Value | Verdict |",
        "|---|---:|---|",
        f"| eu_jax tokens/s ≥ {SPEEDUP_GOAL:g}x PyTorch eager's | {speedup:.2f}x | {verdict(speedup >= SPEEDUP_GOAL)} |",
        f"| eu_jax FLOP/s ≥ {MATMUL_FRACTION_GOAL:.0%} of the best matmul rate | {share:.0%} | {verdict(share >= MATMUL_FRACTION_GOAL)} |",
        f"| eu_jax NPO step peak RSS ≤ {NPO_MEMORY_GOAL:g}x the EU step's | {npo_ratio:.2f}x | {verdict(npo_ratio <= NPO_MEMORY_GOAL)} |",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, children=True)
    parser.add_argument("--layers", type=int, default=SMOLLM2["num_hidden_layers"])
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rows", type=int, default=4, help="rows per half (retain and forget)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side, best kept")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if serve_child(args.child, CHILDREN):
        return
    workdir = Path(tempfile.mkdtemp(prefix="eu_jax_bench_train_"))
    try:
        results = run_benchmark(workdir, Shape(args.layers, args.seq, args.rows), args.steps, not args.no_compile)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    publish(SECTION_TITLE, render_section(results), write=not args.no_write)


if __name__ == "__main__":
    main()
