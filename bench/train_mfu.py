#!/usr/bin/env python
"""MFU of the Exclusive Unlearning train step on one accelerator, beside PyTorch doing the same math.

The issue's goal: on one H100 (or H200), at least 45% model FLOPs utilisation for a Llama-3.2-1B-shaped model
in bf16 (MaxText reports about 50% for Llama-2-7B). Random weights of that shape (built on the device, no files),
bf16 compute with fp32 parameters and AdamW state (`RuntimeOptions(dtype="bfloat16")`), retain NLL + KL-to-uniform
forget, global-norm clipping, batch 4 + 4 rows of 2048 tokens. The PyTorch side runs transformers'
`LlamaForCausalLM` (SDPA attention) under bf16 autocast with fp32 parameters and fused AdamW, the same loss
(`train_step.torch_losses`). Each side initialises its own random weights (so the losses agree only roughly,
both near ln(vocab)). Each side runs in a fresh process, one after the other (each framework takes
the device's memory for itself). MFU = analytic matmul FLOPs of the step (`eu_jax.train.flops`) / seconds /
the device's dense bf16 peak (`eu_jax.train.flops.PEAK_FLOPS_BY_KIND`).

Without an accelerator the script says so and leaves BENCHMARKS.md alone (`make bench` goes on); `--allow-cpu`
runs it on CPU for a smoke test of the script itself (small shapes; no MFU goal applies there).

Usage:
    python bench/train_mfu.py                                   # on a GPU/TPU host, rewrites BENCHMARKS.md
    python bench/train_mfu.py --allow-cpu --layers 2 --hidden 64 --seq 32 --rows 1 --no-write   # smoke run

On a host with the accelerator libraries already installed but not this project (the lent H200's image holds jax,
flax, optax, orbax, transformers and torch; of what the eu_jax step imports only ml_collections is missing), run
it from the repository root with the sources on the path: `PYTHONPATH=. python3 bench/train_mfu.py`, after
installing an ml_collections wheel (e.g. `pip install --no-deps --target /tmp/site ml_collections-*.whl` and
`PYTHONPATH=.:/tmp/site`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import sys
import time
from typing import Any, Callable

from harness import benchmark_parser, log, run_child_process, serve_child, timed, verdict
from report import publish
from train_step import Shape, eu_step_flops, torch_losses

from eu_jax.models.config import REMAT_POLICIES, RuntimeOptions
from eu_jax.models.fused_attention import KERNEL_BACKENDS
from eu_jax.train.flops import peak_flops_of_kind

SECTION_TITLE = "## Train step MFU on an accelerator (bench/train_mfu.py)"
MFU_GOAL = 0.45
GB = 10**9

# Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json; the rope scaling does not change the cost).
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001,
)


def hf_config(layers: int, hidden: int):
    """transformers' LlamaConfig of the benchmarked shape; a smaller `hidden` scales the widths (smoke runs)."""
    import transformers

    scale = hidden / LLAMA_1B["hidden_size"]
    return transformers.LlamaConfig(**dict(
        LLAMA_1B, num_hidden_layers=layers, hidden_size=hidden,
        intermediate_size=int(LLAMA_1B["intermediate_size"] * scale),
        num_attention_heads=max(1, int(LLAMA_1B["num_attention_heads"] * scale)),
        num_key_value_heads=max(1, int(LLAMA_1B["num_key_value_heads"] * scale)),
        head_dim=64,
    ))


def child_eu_jax(layers: int, hidden: int, shape: dict[str, int], steps: int, remat: str, attention: str,
                 allow_cpu: bool) -> dict[str, Any]:
    """eu_jax's step as `eu-train` builds it, on random params initialised on the device. A fused attention
    kernel runs only on its own accelerator (on CPU each runs as a reference, far too slow to time)."""
    import jax
    from flax import nnx

    from eu_jax.models.config import RuntimeOptions, from_hf_config
    from eu_jax.models.llama import Decoder
    from train_step import JaxRunner

    if jax.default_backend() == "cpu" and not allow_cpu:
        return {"no_accelerator": True}
    if attention != "xla" and jax.default_backend() != KERNEL_BACKENDS[attention]:
        return {"not_applicable": True}
    config = from_hf_config(hf_config(layers, hidden))
    runtime = dict(dtype="bfloat16", remat=remat, attention=attention)
    params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(Decoder(config, RuntimeOptions(**runtime), rngs=nnx.Rngs(0)))))()
    start = time.perf_counter()
    runner = JaxRunner(params, config, "eu", Shape(**shape), **runtime)
    loss = runner()
    first = time.perf_counter() - start
    seconds = [timed(runner)[0] for _ in range(steps)]
    memory = runner.memory_analysis()
    return {"device": jax.devices()[0].device_kind, "first": first, "seconds": seconds, "loss": loss,
            "device_bytes": memory["argument"] + memory["temp"]}


class TorchRunner:
    """transformers' Llama on `device`: fp32 parameters, bf16 autocast, SDPA attention, fused AdamW."""

    def __init__(self, layers: int, hidden: int, shape: Shape, compiled: bool, device: str):
        import torch
        import transformers

        from train_step import CLIP_NORM, LEARNING_RATE, WEIGHT_DECAY, make_batch

        torch.manual_seed(0)
        config = hf_config(layers, hidden)
        with torch.device(device):
            self.model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, eps=1e-8, fused=True)
        self.batch = {h: {k: torch.as_tensor(v, device=device) for k, v in half.items()} for h, half in make_batch(shape, config.vocab_size).items()}
        self.loss_fn = torch.compile(torch_losses) if compiled else torch_losses
        self.clip, self.device = CLIP_NORM, device

    def __call__(self) -> float:
        import torch

        with torch.autocast(self.device, dtype=torch.bfloat16):
            loss = self.loss_fn(self.model, None, self.batch, "eu")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # waits for the step


def child_torch(layers: int, hidden: int, shape: dict[str, int], steps: int, compiled: bool, allow_cpu: bool) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available() and not allow_cpu:
        return {"no_accelerator": True}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    runner = TorchRunner(layers, hidden, Shape(**shape), compiled, device)
    loss = runner()
    first = time.perf_counter() - start
    seconds = [timed(runner)[0] for _ in range(steps)]
    on_gpu = device == "cuda"
    return {"device": torch.cuda.get_device_name() if on_gpu else "cpu", "first": first, "seconds": seconds, "loss": loss,
            "device_bytes": torch.cuda.max_memory_allocated() if on_gpu else 0}


CHILDREN: dict[str, Callable[..., dict[str, Any]]] = {"eu_jax": child_eu_jax, "torch": child_torch}


@dataclasses.dataclass
class Run:
    args: argparse.Namespace
    sides: dict[str, dict[str, Any]]  # side name -> child result ({"failed": reason} or {"no_accelerator": True})
    flops: float
    seconds: float


def measure(args: argparse.Namespace) -> Run:
    start = time.perf_counter()
    shape = Shape(args.layers, args.seq, args.rows)
    common = dict(layers=args.layers, hidden=args.hidden, shape=dataclasses.asdict(shape), steps=args.steps, allow_cpu=args.allow_cpu)
    children = {
        "eu_jax": ("eu_jax", dict(common, remat=args.remat, attention="xla")),
        "eu_jax, splash attention": ("eu_jax", dict(common, remat=args.remat, attention="splash")),
        "eu_jax, cuDNN attention": ("eu_jax", dict(common, remat=args.remat, attention="cudnn")),
        "PyTorch eager": ("torch", dict(common, compiled=False)),
    }
    if not args.no_compile:
        children["torch.compile"] = ("torch", dict(common, compiled=True))
    sides = {}
    for name, (child, kwargs) in children.items():
        log(f"{name}: a fresh process")
        try:
            sides[name] = run_child_process(__file__, child, kwargs, jax_platforms="cpu" if args.allow_cpu else "")
        except RuntimeError as err:  # a side that fails (say, torch.compile) is reported, not fatal
            sides[name] = {"failed": str(err)}
        log(f"  {sides[name]}")
        if sides[name].get("no_accelerator"):
            break
    return Run(args, sides, eu_step_flops(hf_config(args.layers, args.hidden), shape), time.perf_counter() - start)


def render_section(run: Run) -> str:
    a = run.args
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tokens = 2 * a.rows * a.seq
    lines = [
        SECTION_TITLE,
        "",
        f"Exclusive Unlearning step on the Llama-3.2-1B shape ({a.layers} layers, hidden {a.hidden}, random weights: "
        f"each side's own random initialisation), bf16 compute with fp32 parameters and AdamW state, batch {a.rows} + {a.rows} rows of {a.seq} tokens "
        f"({tokens} tokens per step), remat {a.remat} on the eu_jax side, whose attention runs as the decoder's own (XLA) and through a fused kernel "
        f"(`runtime.attention`: Pallas' splash attention on a TPU, cuDNN's flash attention on a GPU). Measured {date}. Whole benchmark: "
        f"{run.seconds / 60:.1f} min.",
        "",
        f"Each side runs in a fresh process: a first step (compilation or warm-up), then {a.steps} timed steps, best "
        "kept. MFU = analytic matmul FLOPs of the step (`eu_jax.train.flops`, "
        f"{run.flops / 1e12:.1f} TFLOP) / seconds / the device's dense bf16 peak. Device memory: XLA's arguments + "
        "temporaries of the compiled step (eu_jax), `torch.cuda.max_memory_allocated` (PyTorch).",
        "",
        "| Side | Device | First step s | Seconds per step | Tokens/s | TFLOP/s | MFU | Speed-up vs eager | Loss of step 1 | Device memory GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    eager = run.sides.get("PyTorch eager", {})
    eager_best = min(eager["seconds"]) if "seconds" in eager else None
    for name, m in run.sides.items():
        if m.get("not_applicable"):  # a fused kernel on another kind of device
            continue
        if "seconds" not in m:
            lines.append(f"| {name} | failed: {m.get('failed', '')[:160]} |" + " |" * 8)
            continue
        best, peak = min(m["seconds"]), peak_flops_of_kind(m["device"])
        mfu = f"{run.flops / best / peak:.0%}" if peak else "unknown peak"
        speedup = f"{eager_best / best:.2f}x" if eager_best else "—"
        lines.append(
            f"| {name} | {m['device']} | {m['first']:.1f} | {best:.3f} | {tokens / best:,.0f} | {run.flops / best / 1e12:.1f} | "
            f"{mfu} | {speedup} | {m['loss']:.4f} | {m['device_bytes'] / GB:.1f} |"
        )
    ours = [m for name, m in run.sides.items() if name.startswith("eu_jax") and "seconds" in m]
    peak = peak_flops_of_kind(ours[0]["device"]) if ours else 0
    if peak:  # CPUs have no peak in the table, so a smoke run has no verdict
        mfu = run.flops / min(min(m["seconds"]) for m in ours) / peak
        lines += ["", "| Goal | Value | Verdict |", "|---|---:|---|",
                  f"| eu_jax MFU ≥ {MFU_GOAL:.0%} (1B-class model, bf16, one H100/H200) | {mfu:.0%} | {verdict(mfu >= MFU_GOAL)} |"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, children=True)
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    parser.add_argument("--hidden", type=int, default=LLAMA_1B["hidden_size"], help="smaller scales every width (smoke runs)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=4, help="rows per half (retain and forget)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per side, best kept")
    parser.add_argument("--remat", default=RuntimeOptions().remat, choices=REMAT_POLICIES, help="eu_jax's rematerialisation")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile side")
    parser.add_argument("--allow-cpu", action="store_true", help="run eu_jax on CPU (a smoke test of this script)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if serve_child(args.child, CHILDREN):
        return
    run = measure(args)
    if any(m.get("no_accelerator") for m in run.sides.values()):
        log("no accelerator here (jax sees only the CPU): nothing measured, BENCHMARKS.md left as it is")
        return
    publish(SECTION_TITLE, render_section(run), write=not (args.no_write or args.allow_cpu))


if __name__ == "__main__":
    main()
