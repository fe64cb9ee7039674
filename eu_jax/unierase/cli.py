"""`eu-unierase --config=configs/unierase.py --config.checkpoint=CKPT --config.forget.path=forget.jsonl
--config.output=runs/unierase`: both UniErase stages on one checkpoint (see eu_jax/unierase/pipeline.py)."""

from __future__ import annotations

from ml_collections import config_flags

from eu_jax.flag_parsing import run_config_command


def _run(config) -> int:
    from eu_jax.parallel.distributed import DistributedSettings, initialize_distributed
    from eu_jax.unierase.pipeline import run_unierase

    initialize_distributed(DistributedSettings(**config.distributed))
    print(f"eu-unierase: edited model in {run_unierase(config)}")
    return 0


def main() -> None:
    from eu_jax.data import DataError

    config = config_flags.DEFINE_config_file("config", None, "UniErase config (see configs/unierase.py)", lock_config=True)
    run_config_command("eu-unierase", config, _run, (DataError, ValueError, OSError))


if __name__ == "__main__":
    main()
