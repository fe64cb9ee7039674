"""`eu-unierase --config=configs/unierase.py --config.checkpoint=CKPT --config.forget.path=forget.jsonl
--config.output=runs/unierase`: both UniErase stages on one checkpoint (see eu_jax/unierase/pipeline.py)."""

from __future__ import annotations

from eu_jax.flag_parsing import run_config_command


def _run(config) -> int:
    from eu_jax.parallel.distributed import DistributedSettings, initialize_distributed
    from eu_jax.unierase.pipeline import run_unierase

    initialize_distributed(DistributedSettings(**config.distributed))
    print(f"eu-unierase: edited model in {run_unierase(config)}")
    return 0


def main() -> None:
    run_config_command("eu-unierase", "UniErase config (see configs/unierase.py)", _run)  # DataError is a ValueError


if __name__ == "__main__":
    main()
