"""`eu-train --config=configs/....py --config.section.key=value`: run or resume a training run."""

from __future__ import annotations

import sys

from absl import app
from ml_collections import config_flags

from eu_jax.flag_parsing import one_line_errors

_CONFIG = config_flags.DEFINE_config_file("config", None, "an ml_collections config file (see configs/)", lock_config=True)


def _run(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go through --config.section.key=value")
    from eu_jax.train.config import ConfigError
    from eu_jax.train.loop import TrainingDiverged, train

    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config=path/to/config.py is required")
    try:
        result = train(config)
    except (ConfigError, TrainingDiverged, FileNotFoundError, ValueError) as err:
        print(f"eu-train: error: {err}", file=sys.stderr)
        return 2
    print(f"done: step {result.final_step}; checkpoints in {result.checkpoint_dir}")
    return 0


def main() -> None:
    app.run(_run, flags_parser=one_line_errors("eu-train"))


if __name__ == "__main__":
    main()
