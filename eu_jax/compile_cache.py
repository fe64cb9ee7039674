"""XLA programs kept on disk between runs: every eu_jax command turns on JAX's persistent compilation cache.

A rerun of a command, or a workflow stage that builds a program an earlier stage or run already built (the
evaluation suite's samplers, a method's train step in `make compare`), loads the executable instead of
compiling it again: on CPU a SmolLM2 sampler's 6-7 s of compilation becomes ~0.4 s of loading, and on
accelerators a large model's train step can take minutes to compile. The cache key covers the program, its
shardings and devices, the jax/XLA versions and XLA's flags; XLA:CPU also refuses an executable built for a
CPU with other instruction sets (it compiles afresh). A cached executable is code that runs as the user, so
eu_jax's own folder is made private and not used where others may write to it.
"""

from __future__ import annotations

import os
import stat
import sys

import jax

from eu_jax.assets import cache_dir

MAX_SIZE_VARIABLE = "JAX_COMPILATION_CACHE_MAX_SIZE"
# Least recently used programs are dropped past this (a CPU sampler is ~0.4 MB, accelerator steps tens of MB).
DEFAULT_MAX_BYTES = 4 * 2**30


def enable_compilation_cache() -> str | None:
    """Use `$EU_JAX_CACHE/xla` (default `~/.cache/eu_jax/xla`) as JAX's compilation cache, bounded to 4 GiB,
    unless `JAX_COMPILATION_CACHE_DIR` is set: then jax already uses that folder, and an empty value turns
    the cache off. A default folder that other users may write to is refused (its programs would run as
    code here). Returns the folder in use, or None when the cache is off."""
    chosen = jax.config.jax_compilation_cache_dir  # None unless the variable or the embedding code set it
    if chosen is not None:
        return chosen or None
    try:
        folder = cache_dir() / "xla"
        folder.mkdir(mode=0o700, exist_ok=True)
        shared = folder.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    except OSError as err:  # a read-only home, say: the command runs, compiling as before
        print(f"eu_jax: no compilation cache: {err}", file=sys.stderr)
        return None
    if shared:
        print(f"eu_jax: not using the compilation cache {folder}: other users may write to it, and what it holds "
              "runs as code (chmod go-w it, or set JAX_COMPILATION_CACHE_DIR)", file=sys.stderr)
        return None
    path = str(folder)
    jax.config.update("jax_compilation_cache_dir", path)
    if MAX_SIZE_VARIABLE not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", DEFAULT_MAX_BYTES)
    return path
