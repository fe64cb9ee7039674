from setuptools import find_packages, setup

setup(
    name="eu_jax",
    version="0.1.0",
    description="Exclusive Unlearning, UniErase and standard unlearning baselines for LLMs in JAX/Flax",
    python_requires=">=3.10",
    packages=find_packages(include=["eu_jax", "eu_jax.*"]),
    package_data={
        "eu_jax.eval": ["probe_data/*.jsonl"],
        "eu_jax.data": ["tofu_data/*.jsonl"],
        "eu_jax.unierase": ["idk_phrases.txt"],
    },
    install_requires=[
        "jax>=0.7,<0.13",
        "flax>=0.12,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11,<0.13",
        "transformers>=5.0,<6",
        "datasets>=3.0,<6",
        "ml_collections>=1.0,<2",
        "safetensors>=0.5,<0.9",
        "numpy>=1.26,<3",
        "tqdm>=4.66,<5",
        "tensorboardX>=2.6,<3",
        # TOFU's ROUGE-L recall (with its stemmer), as the benchmark itself computes it.
        "rouge-score>=0.1.2,<0.2",
        "scipy>=1.11,<2",
        # Bounds the persistent compilation cache (jax needs it for jax_compilation_cache_max_size).
        "filelock>=3.12,<4",
    ],
    extras_require={
        # PyTorch reference models and export checks; 2.13.0 is the CPU build this project is tested with.
        "torch": ["torch>=2.5,<2.16"],
        "gguf": ["gguf>=0.16,<0.20", "accelerate>=1.0,<2"],
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5,<4"],
        # The demo and evaluation reports: retain-domain generators and PNG plots.
        "demo": ["reasoning-gym>=0.1.25,<0.2", "matplotlib>=3.8,<4"],
        "tpu": ["jax[tpu]>=0.7,<0.13"],
        "cuda": ["jax[cuda12]>=0.7,<0.13"],
    },
    entry_points={
        "console_scripts": [
            "eu-convert=eu_jax.convert.cli:main",
            "eu-train=eu_jax.train.cli:main",
            "eu-generate=eu_jax.generate_cli:main",
            "eu-selfgen=eu_jax.selfgen:main",
            "eu-eval=eu_jax.eval.cli:main",
            "eu-unierase=eu_jax.unierase.cli:main",
        ],
    },
)
