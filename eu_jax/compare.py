"""`make compare`: EU and every baseline on the demo setup and budget, each attacked by relearning.

For each method in workflow.methods (same base model, data, steps and evaluation): unlearn, evaluate,
fine-tune briefly on off-domain texts the base model wrote (the relearning attack, with a light
evaluation every few steps for the curves), evaluate again. Writes results/<method>.json, a comparison
report (table, retain-accuracy vs attack-success plot, relearning curves) and the README's results table.

    python -m eu_jax.compare --config=configs/demo.py [--config.workflow.methods=eu,npo ...]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


from eu_jax.flag_parsing import CONFIGS, run_config_command


README = Path(__file__).resolve().parent.parent / "README.md"
RESULTS_BEGIN, RESULTS_END = "<!-- compare-results:begin -->", "<!-- compare-results:end -->"
TABLE_METRICS = ("retain_accuracy", "attack_success", "kl_uniform", "ood_accuracy")
CURVE_KEYS = ("kl_uniform", "ood_accuracy")


def relearning_curve(unlearned: dict[str, Any], run_dir: Path, relearned: dict[str, Any], steps: int) -> list[dict[str, float]]:
    """The curve keys at step 0 (the unlearned model), at the attack's light evaluations, and at its end."""
    from eu_jax.eval.report import read_metrics
    from eu_jax.eval.suite import headline

    def pick(values: dict[str, float], prefix: str = "") -> dict[str, float]:
        return {k: values[prefix + k] for k in CURVE_KEYS if prefix + k in values}

    points = {0: pick(headline(unlearned))}
    for record in read_metrics(run_dir):
        if pick(record, "curve/"):
            points[int(record["step"])] = pick(record, "curve/")
    points[steps] = pick(headline(relearned))
    return [{"step": step, **values} for step, values in sorted(points.items())]


def results_section(config, rows: dict[str, dict[str, float]], relearned: dict[str, dict[str, float]], minutes: float) -> str:
    from eu_jax.eval.report import metrics_table

    after = {f"{name} + relearning": row for name, row in relearned.items()}
    w = config.workflow
    return "\n\n".join([
        metrics_table(rows, TABLE_METRICS),
        f"After the relearning attack ({w.relearn.steps} steps of fine-tuning on off-domain texts the base model wrote):",
        metrics_table(after, TABLE_METRICS),
        f"Setup: {w.domain.task} retain data ({w.domain.train_size} train / {w.domain.heldout_size} held out, seed "
        f"{w.domain.seed}); {w.selfgen.train} self-generated forget texts (seed {w.selfgen.seed}); "
        f"{config.train.steps} steps of batch {config.data.batch_size} + {config.data.batch_size}, sequence "
        f"{config.data.max_length}, training seed {config.train.seed}; harmful prompts: {w.eval.harmful.per_set} per set "
        f"({w.eval.harmful.sets}) x templates {w.eval.harmful.templates}; the whole run took {minutes:.0f} minutes.",
    ])


def replace_marked(text: str, body: str) -> str:
    """`text` with the part between the results markers replaced by `body` (markers appended if absent)."""
    block = f"{RESULTS_BEGIN}\n{body.strip()}\n{RESULTS_END}"
    if RESULTS_BEGIN in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        return head + block + rest.split(RESULTS_END, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def run(config) -> int:
    from eu_jax.eval.model import EvalModel
    from eu_jax.eval.relearn import relearn_config
    from eu_jax.eval.report import plot_bars, plot_relearning, plot_tradeoff
    from eu_jax.eval.suite import headline
    from eu_jax.files import write_json_atomic
    from eu_jax.workflow import (
        Evaluator, base_checkpoint, check_workflow_settings, method_config, method_names, prepare_data, train_once, workdir,
    )

    started = time.monotonic()
    methods = method_names(config.workflow.methods, config.workflow.presets_dir, "workflow.methods")
    base = base_checkpoint(config)
    check_workflow_settings(config, methods, base, relearn=True)
    work = workdir(config, base)
    data = prepare_data(config, base, work)
    evaluator = Evaluator(config, base, data, work / "results")
    rows, relearned, curves = {"base": headline(evaluator.base_results)}, {}, {}
    w = config.workflow
    for method in methods:
        print(f"\n== {method}: unlearning ({config.train.steps} steps)", flush=True)
        run_config = method_config(config, method, base, data, work)
        checkpoint = train_once(run_config)
        results = evaluator.evaluate(checkpoint, method, method)
        print(f"== {method}: relearning attack ({w.relearn.steps} steps)", flush=True)
        attack = relearn_config(run_config, checkpoint, str(data.forget["relearn"]), w.relearn.steps,
                                w.relearn.learning_rate, work / "relearn" / method, w.relearn.eval_every)
        template = EvalModel.load(checkpoint, evaluator.mesh, name=method)
        attacked = evaluator.evaluate(train_once(attack, evaluator.light_eval_fn(template)), f"{method} + relearning",
                                      f"{method}_relearned")
        rows[method], relearned[method] = headline(results), headline(attacked)
        curves[method] = relearning_curve(results, work / "relearn" / method, attacked, w.relearn.steps)

    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    section = results_section(config, rows, relearned, (time.monotonic() - started) / 60)
    plot_bars(rows, TABLE_METRICS, "methods after unlearning", out / "compare_bars.png")
    plot_tradeoff(rows, out / "compare_tradeoff.png")
    plot_relearning(curves, CURVE_KEYS, out / "compare_relearning.png")
    report = out / "compare.md"
    report.write_text("\n\n".join([
        "# Exclusive Unlearning vs baselines", section,
        "![metrics per method](compare_bars.png)", "![retain accuracy vs attack success](compare_tradeoff.png)",
        "## Relearning curves", "![relearning](compare_relearning.png)",
    ]) + "\n")
    write_json_atomic(work / "results" / "compare.json", {"rows": rows, "relearned": relearned, "curves": curves})
    if w.update_readme and README.is_file():
        README.write_text(replace_marked(README.read_text(), section + f"\n\nPlots and samples: `{report}`."))
        print(f"updated the results table in {README}")
    print("\n" + section + f"\n\nreport: {report}")
    return 0


def main() -> None:
    run_config_command("compare", "workflow config (see configs/demo.py)", run, default=CONFIGS / "demo.py")


if __name__ == "__main__":
    main()
