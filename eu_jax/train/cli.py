"""`eu-train --config=configs/....py --config.section.key=value`: run or resume a training run."""

from __future__ import annotations

from eu_jax.flag_parsing import run_config_command


def _train(config) -> int:
    from eu_jax.train.loop import train

    result = train(config)
    if result.preempted:  # exit status 0 all the same: the stop was asked for and the checkpoint is saved
        print(f"stopped for preemption at step {result.final_step} of {config.train.steps}; checkpoints in "
              f"{result.checkpoint_dir}: run the same command again to resume")
    else:
        print(f"done: step {result.final_step}; checkpoints in {result.checkpoint_dir}")
    return 0


def main() -> None:
    from eu_jax.train.loop import TrainingDiverged

    # ConfigError and DataError are ValueErrors.
    run_config_command("eu-train", "an ml_collections config file (see configs/)", _train, (ValueError, OSError, TrainingDiverged))


if __name__ == "__main__":
    main()
