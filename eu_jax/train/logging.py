"""Metrics out of a run: stdout (with a progress bar), JSONL, and TensorBoard."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

import jax
from tqdm.auto import tqdm

from eu_jax.files import write_text_atomic


def _keep_records_up_to(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (and a line cut short): a run killed after its last checkpoint
    logged steps that the resumed run trains and logs again, and a run starting at 0 starts a new log."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text_atomic(path, "".join(kept))


class MetricsLogger:
    """Writes each logged step to `metrics.jsonl` and TensorBoard on process 0."""

    def __init__(self, output_dir: Path, total_steps: int, start_step: int, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", disable=not self.enabled)
        self.jsonl = None
        self.tensorboard = None
        if self.enabled:
            output_dir.mkdir(parents=True, exist_ok=True)
            path = output_dir / "metrics.jsonl"
            _keep_records_up_to(path, start_step)
            self.jsonl = path.open("a", encoding="utf-8")
            if tensorboard:
                from tensorboardX import SummaryWriter

                self.tensorboard = SummaryWriter(str(output_dir / "tensorboard"))

    def advance(self, steps: int = 1) -> None:
        self.bar.update(steps)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        shown = {k: record[k] for k in ("loss", "grad_norm", "tokens_per_s", "mfu") if k in record}
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        tqdm.write(f"step {step}: " + " ".join(f"{k}={v:.5g}" for k, v in record.items() if k != "step"))

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
