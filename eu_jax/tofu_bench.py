"""`make tofu`: the TOFU-style benchmark, UniErase against the fine-tuning unlearning methods.

    python -m eu_jax.tofu_bench --config=configs/tofu.py [--config.tofu.methods=unierase,eu ...]

1. the benchmark: fictitious authors made offline from templates (or the real TOFU from the hub), written
   as `pairs` files: full (forget + retain), retain, forget, real authors, world facts;
2. the "target": the base model fine-tuned on everything; the "retain reference": fine-tuned on the retain
   part only (the model that never saw the forget authors);
3. each method unlearns the forget part from the target with the same budget: UniErase (token + edit),
   EU (retain NLL + KL to uniform on texts the target writes itself), GradDiff, NPO, IdK-DPO;
4. TOFU's metrics on every model, forget quality against the retain reference, the share of parameters
   each method changed and its wall-clock; a table and a plot in report/tofu.md, and the table in the
   README between the tofu-results markers.

Everything lands in one work folder and is reused by a rerun (finished fine-tunes, unlearning runs and
evaluations), so an interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from ml_collections import ConfigDict

from eu_jax.flag_parsing import run_config_command
from eu_jax.setting_rules import AT_LEAST_ONE, POSITIVE_FINITE, Rule, check_rules, zero_or_more

if TYPE_CHECKING:
    from eu_jax.selfgen import SelfGenConfig


README = Path(__file__).resolve().parent.parent / "README.md"
MARKERS = ("<!-- tofu-results:begin -->", "<!-- tofu-results:end -->")
TABLE = ("forget_quality", "model_utility", "forget_rouge", "forget_probability", "params_changed", "minutes")
FINETUNED = ("target", "retain_reference")


class StageClock:
    """Wall-clock minutes of each stage, kept in `minutes.json` of the work folder.

    A stage that was interrupted (an exception, SIGTERM's preemption, Ctrl-C) keeps the minutes it spent
    under "unfinished", and the run that finishes it adds them, so a resumed stage reports its whole time
    (a SIGKILL'd process records nothing). A finished stage keeps its first time, even when reusing it still
    costs something (EU samples its forget texts again); `forget` drops a stage whose run is replaced.
    """

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.unfinished: dict[str, float] = saved.pop("unfinished", {})
        self.minutes: dict[str, float] = saved

    def get(self, name: str) -> float | None:
        return self.minutes.get(name)

    def timed(self, name: str, build, fresh: bool = False):
        """build()'s result, its minutes recorded unless the stage has a finished time (which build() may drop
        with `forget`); `fresh`: the stage starts from nothing, so any time it has is dropped first."""
        if fresh:
            self.forget(name)
        start = time.perf_counter()
        try:
            result = build()
        except BaseException:
            if name not in self.minutes:
                self.unfinished[name] = self.unfinished.get(name, 0.0) + (time.perf_counter() - start) / 60
                self._save()
            raise
        if name not in self.minutes:
            self.minutes[name] = self.unfinished.pop(name, 0.0) + (time.perf_counter() - start) / 60
            self._save()
        return result

    def forget(self, name: str) -> None:
        """Drop a stage's time (its run is being replaced), so the new run is timed afresh."""
        self.minutes.pop(name, None)
        self.unfinished.pop(name, None)

    def _save(self) -> None:
        from eu_jax.files import write_json_atomic

        write_json_atomic(self.path, self.minutes | ({"unfinished": self.unfinished} if self.unfinished else {}))


# The benchmark's own settings that its stages would otherwise only refuse (or quietly replace: a negative
# fine-tuning rate read as "the preset's") once the stages before them have run.
_SECTION_RULES: dict[str, tuple[Rule, ...]] = {
    "finetune": (("steps", *AT_LEAST_ONE), ("learning_rate", *POSITIVE_FINITE)),
    "unlearn": (("steps", *AT_LEAST_ONE),
                ("learning_rate", lambda v: 0 <= v < math.inf, "must be 0 (the model preset's) or a positive finite number")),
    "eval": (("max_new_tokens", *AT_LEAST_ONE), ("batch_size", *AT_LEAST_ONE), ("max_items", *zero_or_more("all"))),
}


def tofu_section() -> ConfigDict:
    """The `tofu` section the benchmark adds to a training config (model / hardware presets as usual)."""
    from eu_jax.unierase.edit import get_edit_config
    from eu_jax.unierase.token_training import get_token_config

    return ConfigDict({
        "workdir": "",  # default: $EU_JAX_CACHE/tofu/<base checkpoint name>
        "presets_dir": "",  # configs/methods
        "source": "fictitious",  # or "hub": locuslab/TOFU (needs the hub)
        "hub_split": "forget10",
        "seed": 0, "num_authors": 50, "forget_fraction": 0.1,
        "finetune": {"steps": 200, "learning_rate": 1e-4},  # target and retain reference
        "methods": "unierase,eu,graddiff,npo,idk_dpo",
        # Every fine-tuning method; learning_rate 0 keeps the model preset's (scaled by the method's preset).
        "unlearn": {"steps": 30, "learning_rate": 0.0},
        "selfgen": {"samples": 64, "max_new_tokens": 64, "batch_size": 32, "seed": 0},  # EU's forget texts
        "unierase": {"token": get_token_config(), "edit": get_edit_config(), "retained_max_tokens": 100_000},
        "eval": {"max_new_tokens": 48, "batch_size": 16, "max_items": 0},
        "update_readme": True,
    })


def _write_marked(text: str, body: str) -> str:
    begin, end = MARKERS
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        return text.split(begin, 1)[0] + block + text.split(end, 1)[1]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def changed_share(before: Path, after: Path) -> float:
    """The share of `before`'s parameters whose value differs in `after` (rows a grown vocabulary adds count as changed)."""
    import jax

    from eu_jax.convert.checkpoint import load_params

    a, _ = load_params(before)
    b, _ = load_params(after)
    changed = total = 0
    for path, old in jax.tree_util.tree_leaves_with_path(a):
        new = dict(jax.tree_util.tree_leaves_with_path(b))[path]
        common = tuple(slice(0, min(x, y)) for x, y in zip(old.shape, new.shape))
        changed += int(np.count_nonzero(old[common] != new[common])) + new.size - new[common].size
        total += old.size
    return changed / total


class TofuBench:
    """The work folder, the benchmark sets and the mesh shared by every step."""

    def __init__(self, config: ConfigDict):
        from eu_jax.data import DataSpec, content_fingerprint
        from eu_jax.data.tofu import fictitious_benchmark, hub_benchmark, write_benchmark
        from eu_jax.parallel.mesh import mesh_from_config
        from eu_jax.workflow import base_checkpoint

        self.config, self.t = config, config.tofu
        self.base = base_checkpoint(config)
        from eu_jax.assets import cache_dir

        self.work = Path(self.t.workdir or cache_dir() / "tofu" / self.base.name)
        if self.t.source == "hub":
            self.benchmark = hub_benchmark(self.t.hub_split)
        elif self.t.source == "fictitious":
            self.benchmark = fictitious_benchmark(self.t.seed, self.t.num_authors, self.t.forget_fraction)
        else:
            raise ValueError(f"tofu.source {self.t.source!r}: use 'fictitious' or 'hub'")
        self.files = write_benchmark(self.benchmark, self.work / "data")
        # What the benchmark's source, seed, authors and forget share made: results and UniErase record it.
        self.files_content = {name: content_fingerprint(DataSpec(str(path))) for name, path in sorted(self.files.items())}
        self.mesh = mesh_from_config(config.mesh)
        self.clock = StageClock(self.work / "minutes.json")

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        return json.loads(path.read_text()) if path.is_file() else None

    def _timed(self, name: str, build) -> Path:
        """build() -> checkpoint, the run of runs/<name>, timed; a finished time whose run is gone (deleted by
        hand) is dropped, while an interrupted stage keeps its minutes even if it stopped before its run began
        (EU's sampling)."""
        gone = self.clock.get(name) is not None and not (self.work / "runs" / name).exists()
        return self.clock.timed(name, build, fresh=gone)

    def _train(self, name: str, run: ConfigDict) -> Path:
        """`train_once`, forgetting the time of a stale run it replaces."""
        from eu_jax.workflow import discard_stale_run, train_unless_finished

        if discard_stale_run(run):
            self.clock.forget(name)
        return train_unless_finished(run)

    def training(self, method: str, checkpoint: Path, retain: Path, forget: Path, name: str, steps: int, lr: float) -> ConfigDict:
        from eu_jax.workflow import with_method

        run = with_method(self.config, method, self.t.presets_dir)
        run.model.checkpoint = str(checkpoint)
        run.data.retain.path, run.data.forget.path = str(retain), str(forget)
        run.train.steps = steps
        if lr > 0:
            run.optimizer.learning_rate = lr
        run.train.output_dir = str(self.work / "runs" / name)
        return run

    def finetune(self, name: str, data: Path) -> Path:
        """SFT of the base model on `data` (the forget half is the same file, unweighted)."""
        ft = self.t.finetune
        run = self.training("retain_only", self.base, data, data, name, ft.steps, ft.learning_rate)
        return self._timed(name, lambda: self._train(name, run))

    def self_generated(self, target: Path) -> Path:
        """EU's forget texts: what the target model writes itself (sampled once)."""
        from eu_jax.eval.model import EvalModel
        from eu_jax.selfgen import checkpoint_provenance, self_generate

        out = self.work / "data" / "selfgen.jsonl"
        model = EvalModel.load(target, self.mesh)
        settings = self._selfgen_config()
        self_generate(model.decoder(), model.tokenizer, settings, out, model.mesh, eos_ids=model.eos_ids,
                      model_info=checkpoint_provenance(target), progress=False, replace_stale=True)
        return out

    def _selfgen_config(self) -> "SelfGenConfig":
        """EU's forget-text sampling, a bad setting named as `config.tofu.selfgen.<key>`."""
        from eu_jax.selfgen import SelfGenConfig

        s = self.t.selfgen
        check_rules(s, [("samples", *AT_LEAST_ONE)], "config.tofu.selfgen")  # SelfGenConfig calls it num_samples
        try:
            return SelfGenConfig(num_samples=s.samples, user_turns="self", max_new_tokens=s.max_new_tokens,
                                 batch_size=s.batch_size, seed=s.seed, retain_path=str(self.files["retain"]))
        except ValueError as err:  # its messages start with the setting
            raise ValueError(f"config.tofu.selfgen.{err}") from None

    def unlearn(self, method: str, target: Path) -> Path:
        if method == "unierase":
            return self._timed(method, lambda: self._unierase(target))
        def build() -> Path:  # EU's self-generation counts towards its time
            forget = self.self_generated(target) if method == "eu" else self.files["forget"]
            u = self.t.unlearn
            return self._train(method, self.training(method, target, self.files["retain"], forget, method, u.steps, u.learning_rate))

        return self._timed(method, build)

    def _unierase(self, target: Path) -> Path:
        """UniErase on the target, reused (or an interrupted one continued) while the target, the benchmark's
        files and the settings it is made from are the same; `made_from.json` records them before it starts."""
        from eu_jax.files import write_json_atomic
        from eu_jax.train.config import config_to_json
        from eu_jax.train.identity import params_identity
        from eu_jax.unierase.pipeline import run_unierase

        out = self.work / "runs" / "unierase"
        made_from = {"target": params_identity(target), "data": self.files_content, "unierase": config_to_json(self.t.unierase)}
        if out.exists() and self._read_json(out / "made_from.json") != made_from:
            print(f"{out} was made from another target, benchmark or settings: running UniErase again", flush=True)
            shutil.rmtree(out)
            self.clock.forget("unierase")
        if (out / "model").is_dir():
            return out / "model"
        write_json_atomic(out / "made_from.json", made_from)
        return run_unierase(self._unierase_config(target, out))

    def _unierase_config(self, target: Path, out: Path) -> ConfigDict:
        from eu_jax.unierase.pipeline import get_unierase_config

        config = get_unierase_config()
        config.update(checkpoint=str(target), output=str(out))
        config.forget.path = str(self.files["forget"])
        config.retained.paths = str(self.files["retain"])
        config.retained.max_tokens = self.t.unierase.retained_max_tokens
        config.token.training = copy.deepcopy(self.t.unierase.token)
        config.edit = copy.deepcopy(self.t.unierase.edit)
        config.mesh = copy.deepcopy(self.config.mesh)
        return config

    def check_settings(self, methods: list[str]) -> None:
        """The benchmark's own sections by their names, then every training's settings (on the base model,
        which the target shares its shape with), before the first fine-tune: a bad one stops it at once."""
        from eu_jax.convert.checkpoint import load_model_meta
        from eu_jax.unierase.pipeline import check_edit_settings
        from eu_jax.unierase.token_training import check_token_training
        from eu_jax.workflow import validate_before_work

        t = self.t
        for name, rules in _SECTION_RULES.items():
            check_rules(t[name], rules, f"config.tofu.{name}")
        if "eu" in methods:
            self._selfgen_config()
        if "unierase" in methods:
            check_token_training(t.unierase.token, "config.tofu.unierase.token")
            check_edit_settings(t.unierase.edit, load_model_meta(self.base).config.num_layers, "config.tofu.unierase.edit")
        ft, u = t.finetune, t.unlearn
        runs = {name: self.training("retain_only", self.base, self.files["retain"], self.files["retain"], name,
                                    ft.steps, ft.learning_rate) for name in FINETUNED}
        for method in methods:
            if method != "unierase":
                runs[method] = self.training(method, self.base, self.files["retain"], self.files["forget"], method,
                                             u.steps, u.learning_rate)
        validate_before_work(runs)

    def evaluate(self, name: str, checkpoint: Path) -> dict[str, Any]:
        """TOFU's metrics of one checkpoint, saved as results/<name>.json and reused for the same params on the
        same benchmark with the same evaluation settings (a run trained further since is evaluated again)."""
        from eu_jax.eval.model import EvalModel
        from eu_jax.eval.tofu import evaluate_tofu
        from eu_jax.files import write_json_atomic
        from eu_jax.train.config import config_to_json
        from eu_jax.train.identity import params_identity

        path = self.work / "results" / f"{name}.json"
        saved = self._read_json(path)
        made_from = {"params": params_identity(checkpoint), "data": self.files_content, "eval": config_to_json(self.t.eval)}
        if saved and all(saved.get(key) == value for key, value in made_from.items()):
            return saved
        e = self.t.eval
        results = evaluate_tofu(EvalModel.load(checkpoint, self.mesh, name=name), self.benchmark, e.max_new_tokens,
                                e.batch_size, e.max_items)
        results.update(made_from)
        write_json_atomic(path, results)
        return results


def headline(results: dict[str, Any], minutes: float | None, changed: float | None) -> dict[str, float]:
    row = {"model_utility": results["model_utility"], "forget_rouge": results["forget"]["rouge_l_recall"],
           "forget_probability": results["forget"]["probability"]}
    if "forget_quality" in results:
        row["forget_quality"] = results["forget_quality"]["p_value"]
    if minutes is not None:
        row["minutes"] = minutes
    if changed is not None:
        row["params_changed"] = changed
    return row


def plot_quality_utility(rows: dict[str, dict[str, float]], out: Path) -> Path:
    """TOFU's picture: forget quality (log scale, up is better) against model utility (right is better)."""
    from eu_jax.eval.report import plt

    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for i, (name, row) in enumerate(rows.items()):
        ax.scatter(row["model_utility"], max(row.get("forget_quality", np.nan), 1e-30), color=f"C{i}", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("model utility")
    ax.set_ylabel("forget quality (KS p-value)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def run(config: ConfigDict) -> int:
    from eu_jax.eval.report import metrics_table
    from eu_jax.eval.tofu import add_forget_quality

    from eu_jax.workflow import method_names

    methods = method_names(config.tofu.methods, config.tofu.presets_dir, "tofu.methods", others=("unierase",))
    bench = TofuBench(config)
    bench.check_settings(methods)
    t = bench.t
    target, reference = bench.finetune("target", bench.files["full"]), bench.finetune("retain_reference", bench.files["retain"])
    reference_results = bench.evaluate("retain_reference", reference)
    rows = {}
    for name, checkpoint in (("target", target), ("retain_reference", reference)):
        results = add_forget_quality(bench.evaluate(name, checkpoint), reference_results)
        rows[name] = headline(results, bench.clock.get(name), None)
    for method in methods:
        print(f"\n== {method}: unlearning the forget authors from the target", flush=True)
        checkpoint = bench.unlearn(method, target)
        results = add_forget_quality(bench.evaluate(method, checkpoint), reference_results)
        rows[method] = headline(results, bench.clock.get(method), changed_share(target, checkpoint))

    out = bench.work / "report"
    out.mkdir(parents=True, exist_ok=True)
    b = bench.benchmark
    section = "\n\n".join([
        metrics_table(rows, TABLE),
        f"Setup: {t.source} TOFU set ({len(b.forget)} forget / {len(b.retain)} retain questions, {len(b.real_authors)} real "
        f"authors, {len(b.world_facts)} world facts; seed {t.seed}); target and retain reference fine-tuned "
        f"{t.finetune.steps} steps at lr {t.finetune.learning_rate}; each fine-tuning method {t.unlearn.steps} steps at lr "
        f"{t.unlearn.learning_rate or config.optimizer.learning_rate} (times its preset's factor), batch {config.data.batch_size} + "
        f"{config.data.batch_size}; minutes are wall-clock "
        f"on the machine that ran it (UniErase: both stages).",
    ])
    plot_quality_utility(rows, out / "tofu_quality_utility.png")
    (out / "tofu.md").write_text("\n\n".join(["# TOFU-style benchmark", section,
                                              "![forget quality vs model utility](tofu_quality_utility.png)"]) + "\n")
    if t.update_readme and README.is_file():
        README.write_text(_write_marked(README.read_text(), section + f"\n\nPlot: `{out / 'tofu.md'}`."))
    print("\n" + section + f"\n\nreport: {out / 'tofu.md'}")
    return 0


def main() -> None:
    run_config_command("tofu", "TOFU benchmark config (see configs/tofu.py)", run)


if __name__ == "__main__":
    main()
