"""The TOFU-style benchmark (`make tofu`): an experiment config plus a `tofu` section.

    python -m eu_jax.tofu_bench --config=configs/tofu.py                 # SmolLM2-135M on this CPU (small)
    python -m eu_jax.tofu_bench --config=configs/tofu.py:model=llama3_2_1b,hardware=gpu_1host \
        --config.model.checkpoint=ckpt/llama3_2_1b --config.tofu.source=hub

Every field of the section and its default is in `eu_jax/tofu_bench.py` (`tofu_section`). On the `cpu`
hardware preset the set, the fine-tunes and the evaluation shrink so the benchmark fits a 2-core CPU; on
accelerators the defaults apply (50 authors, 200 fine-tuning steps, every item evaluated).
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent


def _experiment():
    from eu_jax.files import load_python_file

    return load_python_file(CONFIGS / "experiment.py")


def get_config(spec: str = ""):
    from eu_jax.tofu_bench import tofu_section

    config, hardware = _experiment().with_workflow(spec, "tofu", tofu_section())
    config.train.log_every = 5
    config.data.max_length = 128  # question + answer through the chat template
    if hardware == "cpu":
        config.data.batch_size = 4
        config.train.async_checkpointing = False
        # 10 authors (10 forget / 90 retain questions), fine-tuned for ~6 epochs: about an hour in all here.
        config.tofu.update(num_authors=10, forget_fraction=0.1)
        config.tofu.finetune.update(steps=150, learning_rate=1e-4)
        config.tofu.unlearn.update(steps=12)
        config.tofu.selfgen.update(samples=24, max_new_tokens=48, batch_size=24)
        config.tofu.eval.update(batch_size=20, max_new_tokens=32, max_items=40)
        config.tofu.unierase.token.update(batch_size=4, max_length=128)
        # A third of the default steps at three times the learning rates.
        config.tofu.unierase.token.raw.update(steps=30, learning_rate=3e-2)
        config.tofu.unierase.token.mixed.update(steps=20, learning_rate=3e-3)
        config.tofu.unierase.token.robust.update(steps=10, learning_rate=3e-3)
        config.tofu.unierase.retained_max_tokens = 20_000
        config.tofu.unierase.edit.contexts.count = 2
    return config
