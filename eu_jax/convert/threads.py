"""How many threads a conversion lays out tensors with."""

from __future__ import annotations

import os


def conversion_threads() -> int:
    """One per core this process may use, at most 8.

    numpy's copies release the GIL, so the layers' transposes run side by side (2 threads: ~1.8x on
    [8192, 2048] bf16 weights, profiled); each thread holds a tensor or two of its own, hence the cap."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # macOS has no affinity
    return max(1, min(8, usable or 1))
