"""`eu-eval --config=configs/eval.py --config.checkpoint=RUN --config.base=BASE --config.output=out.json`.

Runs the evaluation suite (retain accuracy and NLL, KL to uniform on held-out forget texts, out-of-domain
probes, harmful / jailbreak attack success with the offline judge) on one checkpoint, sharded on the
configured mesh (multi-host too: every process runs the same commands), and writes the results as JSON
with the config and checkpoint they came from. The judge's fluency test reads perplexities under the
base model (`base`; default: the checkpoint itself).
"""

from __future__ import annotations

import time
from pathlib import Path

from ml_collections import ConfigDict

from eu_jax.files import file_in_the_way
from eu_jax.flag_parsing import run_config_command

def evaluate(config: ConfigDict) -> Path:
    import jax

    from eu_jax.eval.model import EvalModel
    from eu_jax.eval.sentence_encoder import SentenceEncoder, fetch_minilm
    from eu_jax.eval.suite import EvalSuite
    from eu_jax.parallel.distributed import DistributedSettings, initialize_distributed
    from eu_jax.parallel.mesh import mesh_from_config
    from eu_jax.train.config import config_to_json
    from eu_jax.files import write_json_atomic

    if not config.checkpoint:
        raise ValueError("config.checkpoint is required (an eu_jax checkpoint or training run)")
    output = Path(config.output or Path(config.checkpoint) / "eval.json")
    check_results_path(output)
    initialize_distributed(DistributedSettings(**config.distributed))
    start = time.perf_counter()
    suite = EvalSuite(config.eval)
    mesh = mesh_from_config(config.mesh)
    model = EvalModel.load(config.checkpoint, mesh)
    base = EvalModel.load(config.base, mesh, name="base") if config.base else model
    judge = None
    if suite.attacks:
        judge = suite.offline_judge(base, SentenceEncoder.from_folder(fetch_minilm()).encode)
    results = suite.run(model, judge)
    results["judge"] = {"max_perplexity": judge.max_perplexity, "base": str(base.checkpoint)} if judge else {}
    results["config"] = config_to_json(config)
    results["seconds"] = time.perf_counter() - start
    if jax.process_index() == 0:
        write_json_atomic(output, results)
    return output


def check_results_path(output: Path) -> None:
    """Refuse a results path that cannot become a file before any model loads, so an evaluation's minutes
    are not spent on results that cannot be saved."""
    if output.is_dir():
        raise ValueError(f"config.output: {output} is an existing folder; give the results file's path, e.g. {output / 'eval.json'}")
    blocking = file_in_the_way(output.parent)
    if blocking is not None:
        raise ValueError(f"config.output: {output} lies under {blocking}, which is a file, not a folder")


def _evaluate(config: ConfigDict) -> int:
    print(f"eu-eval: results in {evaluate(config)}")
    return 0


def main() -> None:
    run_config_command("eu-eval", "evaluation config (see configs/eval.py)", _evaluate)  # DataError is a ValueError


if __name__ == "__main__":
    main()
