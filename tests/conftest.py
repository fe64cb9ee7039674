"""Test-wide set-up: 8 virtual CPU devices (so sharded code runs for real) and fp32-exact matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Commands run in-process (and their subprocesses) compile afresh: no persistent compilation cache.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
