"""An experiment = base defaults + one model, one method and one hardware preset.

    eu-train --config=configs/experiment.py:model=llama3_1_8b,method=npo,hardware=gpu_1host \
             --config.model.checkpoint=ckpt/llama3_1_8b --config.train.output_dir=runs/npo ...

ml_collections passes the text after ':' to `get_config`. Parts left out take the defaults
(smollm2_135m, eu, cpu). A preset is `configs/<models|methods|hardware>/<name>.py` with one function
`apply(config)`; they are applied in the order model, method, hardware, so each owns its fields:

- model: memory plan (remat, scan, batch, sequence length) and the size's reference learning rate,
  i.e. what the 1e-5 that TOFU/NPO use for 7B models becomes at this size;
- method: the objective terms, their weights and every kwarg, and the learning rate as a multiple of
  the model's reference where the method's paper differs from 1e-5 at 7B (RMU: 5x);
- hardware: mesh, compute dtype, checkpointing and the loss's log-prob chunk (`objective.chunk_tokens`).

Anything can still be overridden afterwards on the command line (`--config.optimizer.learning_rate=...`).
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent
PRESET_DIRS = {"model": "models", "method": "methods", "hardware": "hardware"}  # in application order
DEFAULTS = {"model": "smollm2_135m", "method": "eu", "hardware": "cpu"}


def available(kind: str) -> list[str]:
    """Preset names of `kind` ("model", "method" or "hardware"): the .py files in its folder."""
    from eu_jax.files import preset_names

    return preset_names(CONFIGS / PRESET_DIRS[kind])


def parse_spec(spec: str) -> dict[str, str]:
    """'model=a,method=b' -> the three choices, defaults filled in; bad parts raise ValueError."""
    choices = dict(DEFAULTS)
    for part in filter(None, (p.strip() for p in (spec or "").split(","))):
        kind, sep, name = (s.strip() for s in part.partition("="))
        if not sep or kind not in PRESET_DIRS:
            raise ValueError(f"experiment spec part '{part}' is not one of model=..., method=..., hardware=...")
        if name not in available(kind):
            raise ValueError(f"unknown {kind} preset '{name}'; available {kind} presets: {', '.join(available(kind))}")
        choices[kind] = name
    return choices


def _load(path: Path):
    from eu_jax.files import load_python_file

    return load_python_file(path)


def get_config(spec: str = ""):
    choices = parse_spec(spec)
    config = _load(CONFIGS / "base.py").get_config()
    for kind, folder in PRESET_DIRS.items():
        _load(CONFIGS / folder / f"{choices[kind]}.py").apply(config)
    return config


def with_workflow(spec: str, name: str, section) -> tuple:
    """An experiment plus a command's section (`workflow` for demo/compare, `tofu` for the benchmark) whose
    `presets_dir` points at configs/methods; also returns the hardware preset's name, which sizes it."""
    config = get_config(spec)
    config[name] = section
    config[name].presets_dir = str(CONFIGS / "methods")
    config.train.tensorboard = False
    return config, parse_spec(spec)["hardware"]
