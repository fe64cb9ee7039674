"""Markdown reports with PNG plots: training curves, before/after metrics, method comparisons.

Plots use matplotlib's Agg backend (files only, no display). Tables and plots are built from the
evaluation results JSON, so a report can be regenerated from saved results without rerunning anything.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Headline metric -> (label, format, whether higher is better for the kept domain / safety).
METRICS = {
    "retain_accuracy": ("retain accuracy", "{:.1%}"),
    "attack_success": ("attack success rate", "{:.1%}"),
    "kl_uniform": ("KL(U||p) on held-out self-generated texts", "{:.2f}"),
    "entropy": ("entropy (nats)", "{:.2f}"),
    "ood_accuracy": ("out-of-domain probe accuracy", "{:.1%}"),
    "retain_nll": ("retain answer NLL", "{:.3f}"),
    "ood_answer_nll": ("out-of-domain answer NLL", "{:.2f}"),
    "forget_quality": ("forget quality (KS p-value)", "{:.2g}"),
    "model_utility": ("model utility", "{:.3f}"),
    "forget_rouge": ("forget ROUGE-L recall", "{:.3f}"),
    "forget_probability": ("forget answer probability", "{:.3f}"),
    "params_changed": ("parameters changed", "{:.2%}"),
    "minutes": ("minutes", "{:.1f}"),
}
LOSS_SKIP = ("learning_rate", "tokens_per_s", "tflops_per_device", "mfu", "grad_norm")


def _fmt(name: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return METRICS[name][1].format(value) if name in METRICS else f"{value:.4g}"


def metrics_table(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str] = tuple(METRICS)) -> str:
    """A markdown table: one row per named result (e.g. before / after, or one per method)."""
    shown = [m for m in metrics if any(m in r for r in rows.values())]
    lines = ["| | " + " | ".join(METRICS[m][0] if m in METRICS else m for m in shown) + " |",
             "|---|" + "---|" * len(shown)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(m, row.get(m)) for m in shown) + " |")
    return "\n".join(lines)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """The training run's logged steps (metrics.jsonl); a rerun's repeated steps keep the last value."""
    by_step: dict[int, dict[str, float]] = {}
    path = Path(run_dir) / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def plot_curves(records: Sequence[Mapping[str, float]], keys: Sequence[str], title: str, out: Path) -> Path | None:
    """Each key over steps on its own panel; None when no key was logged."""
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys), 3), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(r["step"], r[key]) for r in records if key in r]
        ax.plot(*zip(*points), marker="." if len(points) < 30 else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def loss_keys(records: Sequence[Mapping[str, float]]) -> list[str]:
    keys = sorted({k for r in records for k in r if k != "step" and not k.startswith(("eval/", "curve/"))})
    return ["loss"] + [k for k in keys if k != "loss" and k not in LOSS_SKIP and not k.endswith("mean_logp")]


def plot_bars(rows: Mapping[str, Mapping[str, float]], metrics: Sequence[str], title: str, out: Path) -> Path:
    """One panel per metric, one bar per named result."""
    metrics = [m for m in metrics if any(m in r for r in rows.values())]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.8 * len(metrics), 3.2), squeeze=False)
    names = list(rows)
    for ax, metric in zip(axes[0], metrics):
        values = [rows[n].get(metric, float("nan")) for n in names]
        ax.bar(range(len(names)), values, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(METRICS.get(metric, (metric,))[0], fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_tradeoff(rows: Mapping[str, Mapping[str, float]], out: Path) -> Path:
    """Retain accuracy (keep high) against attack success rate (push low), one point per method."""
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for i, (name, row) in enumerate(rows.items()):
        ax.scatter(row.get("attack_success", float("nan")), row.get("retain_accuracy", float("nan")), color=f"C{i}", label=name)
    ax.set_xlabel("attack success rate (lower is better)")
    ax.set_ylabel("retain accuracy (higher is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_relearning(curves: Mapping[str, Sequence[Mapping[str, float]]], keys: Sequence[str], out: Path) -> Path:
    """Each method's curve of each key over relearning steps (step 0: the unlearned model)."""
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, (name, records) in enumerate(curves.items()):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", color=f"C{i}", label=name)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("relearning step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def samples_table(samples: Sequence[Mapping[str, Any]], columns: Sequence[str], limit: int = 6, width: int = 90) -> str:
    """A markdown table of example generations, each cell cut to `width` characters on one line."""
    def cell(value: Any) -> str:
        text = str(value).replace("\n", " ").replace("|", "\\|")
        return text if len(text) <= width else text[: width - 1] + "…"

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(s.get(c, "")) for c in columns) + " |" for s in samples[:limit]]
    return "\n".join(lines)
