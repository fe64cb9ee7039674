"""A tiny but complete training set-up: random Llama, character tokenizer, JSONL data, config."""

from __future__ import annotations

import json
from pathlib import Path

from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.train.config import get_default_config
from tests.tiny_models import save_char_tokenizer, save_hf_model


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def make_tiny_run(root: Path, family: str = "llama") -> dict[str, Path]:
    """Checkpoint and data files under `root` (created once, reused by later calls)."""
    paths = {"ckpt": root / "ckpt", "retain": root / "retain.jsonl", "forget": root / "forget.jsonl"}
    if not paths["ckpt"].exists():
        save_hf_model(family, root / "hf")
        save_char_tokenizer(root / "hf")
        import_checkpoint(root / "hf", paths["ckpt"], progress=False)
        # Fixed-width texts: every example has the same number of loss tokens.
        write_jsonl(paths["retain"], [{"prompt": f"{i:02d}+{i:02d}=", "response": f"{2 * i:03d}"} for i in range(48)])
        write_jsonl(paths["forget"], [{"prompt": f"Who is {i:02d}?", "response": f"Person {i:02d}."} for i in range(48)])
    return paths


# A question/answer chat format for the character tokenizer; "</s>" (EOS) ends the assistant's turn.
QA_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n"
    "{% else %}A: {{ m['content'] }}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
)


def make_chat_checkpoint(root: Path, **overrides) -> Path:
    """A tiny random Llama whose character tokenizer has QA_TEMPLATE and decodes back to plain text
    (`overrides` change its config, e.g. num_hidden_layers=4)."""
    from tokenizers import decoders

    ckpt = root / "chat_ckpt"
    if not ckpt.exists():
        save_hf_model("llama", root / "chat_hf", **overrides)
        tokenizer = save_char_tokenizer(root / "chat_hf")
        tokenizer.chat_template = QA_TEMPLATE
        tokenizer.backend_tokenizer.decoder = decoders.Fuse()
        tokenizer.save_pretrained(root / "chat_hf")
        import_checkpoint(root / "chat_hf", ckpt, progress=False)
    return ckpt


def tiny_config(paths: dict[str, Path], output_dir: Path, **sections):
    """The default config pointed at the tiny run, with section overrides like train={"steps": 3}."""
    config = get_default_config()
    config.model.checkpoint = str(paths["ckpt"])
    config.data.retain.path, config.data.forget.path = str(paths["retain"]), str(paths["forget"])
    config.data.max_length, config.data.batch_size = 24, 8
    config.optimizer.learning_rate, config.optimizer.warmup_steps = 3e-3, 0
    config.train.output_dir, config.train.log_every, config.train.tensorboard = str(output_dir), 1, False
    config.data.cache = False  # each test tokenizes afresh; the cache has its own tests
    for section, values in sections.items():
        for key, value in values.items():
            if isinstance(value, dict):  # a nested section such as data.retain
                config[section][key].update(value)
            else:
                config[section][key] = value
    return config
