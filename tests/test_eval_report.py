"""Report pieces: tables, plots written as PNG, the README results block, relearning curves."""

from __future__ import annotations

import json

from eu_jax.compare import RESULTS_BEGIN, RESULTS_END, relearning_curve, replace_marked
from eu_jax.eval.report import loss_keys, metrics_table, plot_bars, plot_curves, plot_relearning, plot_tradeoff, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_metrics_table_formats_each_metric_and_marks_missing_values():
    table = metrics_table({"base": {"retain_accuracy": 0.15, "kl_uniform": 6.3456}, "eu": {"retain_accuracy": 0.5}})
    lines = table.splitlines()
    assert lines[0] == "| | retain accuracy | KL(U||p) on held-out self-generated texts |"
    assert lines[2] == "| base | 15.0% | 6.35 |" and lines[3] == "| eu | 50.0% | — |"


def test_read_metrics_keeps_the_last_value_of_a_repeated_step(tmp_path):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 1.5, "curve/kl_uniform": 0.4}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.5, "curve/kl_uniform": 0.4}]
    assert loss_keys(read_metrics(tmp_path)) == ["loss"]
    assert read_metrics(tmp_path / "absent") == []


def test_relearning_curve_runs_from_the_unlearned_model_to_the_attacked_one(tmp_path):
    rows = [{"step": 5, "loss": 1.0, "curve/kl_uniform": 2.0, "curve/ood_accuracy": 0.2}, {"step": 6, "loss": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    unlearned = {"forget_texts": {"kl_uniform": 0.1, "entropy": 10.0}, "probes": {"accuracy": 0.0, "answer_nll": 9.0}}
    attacked = {"forget_texts": {"kl_uniform": 3.0, "entropy": 5.0}, "probes": {"accuracy": 0.4, "answer_nll": 3.0}}
    assert relearning_curve(unlearned, tmp_path, attacked, steps=10) == [
        {"step": 0, "kl_uniform": 0.1, "ood_accuracy": 0.0},
        {"step": 5, "kl_uniform": 2.0, "ood_accuracy": 0.2},
        {"step": 10, "kl_uniform": 3.0, "ood_accuracy": 0.4},
    ]


def test_results_block_is_replaced_in_place_and_appended_once():
    text = "# Title\n\nintro\n"
    once = replace_marked(text, "| a | b |")
    assert once.count(RESULTS_BEGIN) == 1 and once.startswith(text.rstrip("\n"))
    twice = replace_marked(once + "\n## Later section\n", "| c | d |")
    assert "| a | b |" not in twice and "| c | d |" in twice and twice.endswith("## Later section\n")
    assert twice.index(RESULTS_BEGIN) < twice.index("| c | d |") < twice.index(RESULTS_END)


def test_plots_are_written_as_png(tmp_path):
    rows = {"base": {"retain_accuracy": 0.1, "attack_success": 0.5}, "eu": {"retain_accuracy": 0.6, "attack_success": 0.0}}
    records = [{"step": s, "loss": 1.0 / s, "retain/nll": 2.0 / s} for s in range(1, 5)]
    curves = {"eu": [{"step": 0, "kl_uniform": 0.1}, {"step": 10, "kl_uniform": 2.0}]}
    written = [
        plot_bars(rows, ["retain_accuracy", "attack_success"], "t", tmp_path / "bars.png"),
        plot_curves(records, loss_keys(records), "t", tmp_path / "curves.png"),
        plot_tradeoff(rows, tmp_path / "tradeoff.png"),
        plot_relearning(curves, ["kl_uniform"], tmp_path / "relearn.png"),
    ]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE and path.stat().st_size > 2000
    assert plot_curves(records, ["never_logged"], "t", tmp_path / "none.png") is None
