"""What every benchmark script shares: progress lines, the machine's description, a process's peak RSS,
steps run in fresh child processes, and the choice of torch's thread count."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "
_STARTED = time.perf_counter()


def log(message: str) -> None:
    print(f"[bench {time.perf_counter() - _STARTED:6.1f}s] {message}", flush=True)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def meminfo_bytes(field: str) -> int:
    """A /proc/meminfo field (MemTotal, MemAvailable, ...) in bytes; OSError or StopIteration where there is none."""
    line = next(line for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def machine_description() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        memory = f", {meminfo_bytes('MemTotal') / 2**30:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    cores = len(os.sched_getaffinity(0))
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    tunables = os.environ.get("GLIBC_TUNABLES")
    allocator = f", GLIBC_TUNABLES={tunables}" if tunables else ", glibc malloc defaults"
    return f"{cores} cores ({model}){memory}{allocator}, load average {load} at the end of the run"


def peak_rss_bytes() -> int:
    """This process's peak RSS since exec.

    /proc's VmHWM belongs to the address space made by exec; ``ru_maxrss`` would be wrong here, because
    Linux carries the parent's high-water mark over into a child through fork/vfork + exec.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux; an upper bound


def current_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def report_child_result(result: dict[str, Any]) -> None:
    """Inside a child: print its result, with the process's peak RSS, where the parent looks for it."""
    result["peak_rss"] = peak_rss_bytes()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def benchmark_parser(doc: str, children: bool = False) -> argparse.ArgumentParser:
    """A script's argument parser with the options every benchmark has: --no-write and, for scripts that run
    steps in child processes, the hidden --child STEP JSON through which `run_child_process` starts one."""
    from report import BENCHMARKS

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-write", action="store_true", help=f"print the section but do not write {BENCHMARKS.name}")
    if children:
        parser.add_argument("--child", nargs=2, metavar=("STEP", "JSON"), help=argparse.SUPPRESS)
    return parser


def serve_child(child: list[str] | None, steps: dict[str, Callable[..., dict[str, Any]]]) -> bool:
    """Inside a child (`--child STEP JSON`): run that step and report its result. False in the parent."""
    if not child:
        return False
    report_child_result(steps[child[0]](**json.loads(child[1])))
    return True


def run_child_process(script: str, child: str, kwargs: dict[str, Any], jax_platforms: str = "cpu") -> dict[str, Any]:
    """`script --child CHILD KWARGS_JSON` in a fresh interpreter (after flushing dirty pages), its result.

    jax_platforms: JAX_PLATFORMS for the child ("" lets jax pick the accelerator)."""
    os.sync()
    env = dict(os.environ, JAX_PLATFORMS=jax_platforms, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, str(Path(script).resolve()), "--child", child, json.dumps(kwargs)]
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise RuntimeError(f"benchmark step {child!r} failed with exit code {proc.returncode}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def fastest_torch_threads(work: Callable[[], Any]) -> int:
    """Pick torch's thread count (1 or every core) by a short run of `work` with each (after a warm-up).

    OpenMP threads spin at barriers, so on a shared, busy 2-core box two threads can run several times
    slower than one, while on an idle box two are faster. The baseline gets whichever is better now.
    """
    import torch

    seconds = {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        work()
        seconds[threads] = timed(work)[0]
    best = min(seconds, key=seconds.get)
    log("torch threads probe: " + ", ".join(f"{t}: {s:.2f} s" for t, s in seconds.items()) + f"; using {best}")
    torch.set_num_threads(best)
    return best


def verdict(met: bool) -> str:
    """A goal's cell in the tables."""
    return "MET" if met else "NOT MET"
