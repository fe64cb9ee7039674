"""The training loop: set-up from the config, the jitted step, logging, evaluation, checkpoints.

Everything sharded is created in its sharding (restored, or initialised under jit with
out_shardings). The loop itself only moves small metric scalars to the host.
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from ml_collections import ConfigDict

from eu_jax.convert.checkpoint import HF_FILES_DIR, load_model_meta, load_params, locate_params
from eu_jax.data.batches import ShardedSet, ShardLayout, allgather_json, format_spans, process_rows
from eu_jax.data import DataError, DataReport, DataSpec, LengthPolicy, TokenCache, load_set, use_chat_template
from eu_jax.models.config import RuntimeOptions
from eu_jax.models.state import Params, abstract_params, params_shardings
from eu_jax.objectives import Objective
from eu_jax.parallel.distributed import DistributedSettings, initialize_distributed
from eu_jax.parallel.mesh import mesh_from_config
from eu_jax.parallel.sharding import activation_sharding, batch_sharding
from eu_jax.train.checkpointing import RunCheckpoints, require_shared_folder
from eu_jax.train.config import ConfigError, config_to_json, data_shards, validate
from eu_jax.train.evaluation import make_nll_eval
from eu_jax.train.flops import peak_flops_per_device, step_flops
from eu_jax.train.identity import run_identity, saved_run_differences
from eu_jax.train.logging import MetricsLogger
from eu_jax.train.optimizer import learning_rate_schedule, make_optimizer
from eu_jax.train.state import TrainState, abstract_train_state, new_train_state, train_state_shardings
from eu_jax.train.step import make_reference_forward, make_train_step, with_reference_outputs

EvalFn = Callable[[Params, int], dict[str, float]]


class TrainingDiverged(RuntimeError):
    """A loss term became NaN or inf."""


@dataclass(frozen=True)
class TrainResult:
    final_step: int
    start_step: int
    last_metrics: dict[str, float]
    checkpoint_dir: Path
    stopped_early: bool = False
    preempted: bool = False


class _Preemption:
    """SIGTERM (preemption, scancel) asks the loop to save and stop at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def objective_from_config(section: ConfigDict) -> Objective:
    return Objective(
        retain=section.retain,
        retain_kwargs=dict(section.retain_kwargs),
        forget=section.forget,
        forget_kwargs=dict(section.forget_kwargs),
        a=section.a,
        g=section.g,
    )


def _data_cache(config: ConfigDict) -> TokenCache | bool:
    return TokenCache(config.data.cache_dir or None) if config.data.cache else False


HALVES = ("retain", "forget")


def _load_sets(config: ConfigDict, tokenizer, needs_preferred: bool, layout: ShardLayout, owned: list[int]) -> dict[str, ShardedSet]:
    """This process's data shards `owned` of the retain and forget sets (the forget set with its preferred_*
    twin if asked). Every process calls it: they first agree that all of them loaded their shards, since a
    process waiting in a collective for one that failed would wait forever."""
    cache, loaded, failure = _data_cache(config), {}, None
    try:
        for half in HALVES:
            section = config.data[half]
            spec, policy = DataSpec.from_mapping(section), LengthPolicy(config.data.max_length, section.overflow, section.pack)
            preferred = config.data.preferred_response if half == "forget" and needs_preferred else None
            loaded[half] = {
                shard: load_set(spec, tokenizer, policy, preferred_response=preferred, cache=cache, shard=shard, shards=layout.count)
                for shard in owned
            }
    except Exception as err:  # re-raised below, once the other processes know
        failure = err
    mine = {} if failure else {half: {shard: asdict(s.report) for shard, s in shards.items()} for half, shards in loaded.items()}
    shared = allgather_json({"error": None if failure is None else str(failure), "reports": mine})
    if failure is not None:
        raise failure
    failed = [(p, s["error"]) for p, s in enumerate(shared) if s["error"] is not None]
    if failed:
        process, message = failed[0]
        raise DataError(f"process {process} of {len(shared)} could not load its data shards, so this one stops too: {message}")
    for half in HALVES:
        _print_data_reports(half, layout, owned, [s["reports"][half] for s in shared])
    return {half: ShardedSet.from_processes(layout, {s: loaded[half][s].arrays() for s in owned}) for half in HALVES}


def _print_data_reports(half: str, layout: ShardLayout, owned: list[int], by_process: list[dict[str, dict]]) -> None:
    """Process 0 prints the set's totals over all shards; with several processes, each says what it holds."""
    reports = {int(shard): DataReport(**report) for reports in by_process for shard, report in reports.items()}
    total = DataReport.total([reports[s] for s in range(layout.count)])
    if jax.process_index() == 0:
        print(total.summary(half), flush=True)
    if jax.process_count() > 1:
        examples = sum(reports[s].examples for s in owned)
        print(
            f"process {jax.process_index()} of {jax.process_count()} holds {half} data shards {format_spans(owned)} "
            f"of {layout.count}: {examples:,} of {total.examples:,} examples",
            flush=True,
        )


def _tokenizer_for(checkpoint: str):
    import transformers

    _, _, meta_dir = locate_params(Path(checkpoint))
    return transformers.AutoTokenizer.from_pretrained(meta_dir / HF_FILES_DIR)


def _builtin_eval(config: ConfigDict, tokenizer, model_config, options: RuntimeOptions, sharding) -> EvalFn | None:
    """Held-out NLL on the configured eval files, if any."""
    sets = {}
    for name in ("retain", "forget"):
        section = config.data[f"eval_{name}"]
        if section.path:
            policy = LengthPolicy(config.data.max_length, section.overflow, pack=False)
            sets[name] = load_set(DataSpec.from_mapping(section), tokenizer, policy, cache=_data_cache(config)).data.arrays()
    if not sets:
        return None
    # As many rows per forward as one training forward runs (both halves of a micro-batch), so the evaluation
    # fits wherever training does: micro-batches exist to bound that.
    rows = 2 * config.data.batch_size // config.data.microbatches
    return make_nll_eval(model_config, options, sets, rows, sharding, config.objective.chunk_tokens)


def make_batch(sets: dict[str, ShardedSet], step: int, seed: int, sharding) -> tuple[dict, dict[str, int]]:
    """The global batch of `step` and its token counts per half."""
    batch, tokens = {}, {}
    for half, data in sets.items():
        batch[half], tokens[half] = data.batch(step, seed + (half == "forget"), sharding)
    return batch, tokens


@dataclass
class _Run:
    """Everything the loop needs, built once from the config."""

    config: ConfigDict
    mesh: jax.sharding.Mesh
    model_config: object
    sets: dict
    state: TrainState
    reference_params: Params | None
    reference_fn: Callable | None  # the reference's forward on a batch, run before each step
    step_fn: Callable
    eval_fn: EvalFn | None
    checkpoints: RunCheckpoints
    data_sharding: jax.sharding.NamedSharding
    identity: dict  # kept with every checkpoint (identity.run_identity)


def _set_up(config: ConfigDict, eval_fn: EvalFn | None, devices: Sequence[jax.Device] | None) -> _Run:
    validate(config)
    initialize_distributed(DistributedSettings(**config.distributed))
    require_shared_folder(Path(config.train.output_dir), "config.train.output_dir")
    mesh = mesh_from_config(config.mesh, devices)
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    micro_rows = config.data.batch_size // config.data.microbatches
    if micro_rows % data_parallel:
        raise ConfigError(
            f"config.data.batch_size: {config.data.batch_size} rows in {config.data.microbatches} micro-batches give "
            f"{micro_rows} rows each, which the {data_parallel} data-parallel devices (mesh data x fsdp) do not divide"
        )
    if eval_fn is None and config.train.eval_every and not (config.data.eval_retain.path or config.data.eval_forget.path):
        raise ConfigError(
            "config.train.eval_every: the built-in evaluation needs held-out sets (data.eval_retain.path or "
            "data.eval_forget.path); give one, or set eval_every to 0"
        )
    if eval_fn is None and config.train.best_metric:
        reported = [f"eval/{name}_nll" for name in ("retain", "forget") if config.data[f"eval_{name}"].path]
        if config.train.best_metric not in reported:
            raise ConfigError(f"config.train.best_metric: the built-in evaluation reports {reported}, not {config.train.best_metric!r}")
    identity = run_identity(config)
    stale = saved_run_differences(config.train.output_dir, identity)
    if stale is not None:
        raise ConfigError(
            f"config.train.output_dir: {config.train.output_dir} holds a run (checkpoint of step {stale[0]}) trained "
            f"with other settings ({stale[1]}), which this command would resume as if they were the same: run it "
            "with the run's own settings, or give another output_dir (or delete that one) to train anew"
        )
    checkpoint = Path(config.model.checkpoint)
    options = RuntimeOptions(**config.runtime)
    # The run's checkpoints hold params in the run's dtype, whatever the source checkpoint's.
    meta = replace(load_model_meta(checkpoint), param_dtype=options.param_dtype)
    objective = objective_from_config(config.objective)
    needs = objective.requirements()
    tokenizer = use_chat_template(_tokenizer_for(config.model.checkpoint), config.data.chat_template)
    data_sharding = batch_sharding(mesh)
    layout = ShardLayout(data_shards(config, jax.process_count()), config.data.batch_size)
    owned = layout.shards_for(process_rows(data_sharding, (config.data.batch_size,)))
    sets = _load_sets(config, tokenizer, needs.forget.preferred, layout, owned)

    steps = config.train.steps
    optimizer = make_optimizer(config.optimizer, steps)
    p_shardings = params_shardings(meta.config, mesh, options)
    abstract = abstract_train_state(optimizer, abstract_params(meta.config, options), config.train.seed)
    shardings = train_state_shardings(optimizer, abstract.params, p_shardings, mesh)

    _, _, meta_dir = locate_params(checkpoint)
    checkpoints = RunCheckpoints(
        Path(config.train.output_dir), meta, meta_dir / HF_FILES_DIR, config.train.keep_checkpoints,
        config.train.async_checkpointing, keep_best=bool(config.train.best_metric),
    )
    state = checkpoints.restore_latest(abstract, shardings)
    if state is None:
        params, _ = load_params(checkpoint, p_shardings, options.param_dtype)
        state = jax.jit(lambda p: new_train_state(optimizer, p, config.train.seed), out_shardings=shardings)(params)
    reference_params = None
    if needs.needs_reference:
        # Frozen, so kept in the dtype it is stored in where that is exact (bf16 releases: half the memory under
        # bf16 compute; under fp32 compute it is widened inside the reference's own program, `reference_fn`).
        reference_params, _ = load_params(
            Path(config.model.reference_checkpoint or checkpoint), p_shardings, options.param_dtype, keep_stored_dtype=True
        )

    step = make_train_step(
        meta.config,
        options,
        objective,
        optimizer,
        learning_rate_schedule(config.optimizer, steps),
        config.data.microbatches,
        config.objective.chunk_tokens,
    )
    step_fn = jax.jit(
        step,
        in_shardings=(shardings, data_sharding, None if reference_params is None else p_shardings),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    reference_forward = make_reference_forward(meta.config, options, objective, config.data.microbatches)
    reference_fn = None
    if reference_forward is not None:
        reference_fn = jax.jit(reference_forward, in_shardings=(p_shardings, data_sharding), out_shardings=data_sharding)
    if eval_fn is None and config.train.eval_every:
        eval_fn = _builtin_eval(config, tokenizer, meta.config, options, data_sharding)
    return _Run(
        config, mesh, meta.config, sets, state, reference_params, reference_fn, step_fn, eval_fn, checkpoints, data_sharding,
        identity,
    )


def reference_halves(objective: Objective) -> tuple[str, ...]:
    """The batch halves the frozen reference runs on (NPO's: the forget half; KL-retain adds the retain half)."""
    needs = objective.requirements()
    return tuple(half for half in HALVES if getattr(needs, half).needs_reference)


class _Throughput:
    """Tokens/s, TFLOP/s per device and MFU over the steps since the last report."""

    def __init__(self, model_config, seq_len: int, reference_halves: tuple[str, ...], peak: float):
        """`reference_halves`: the batch halves the frozen reference runs on (NPO's: the forget half alone)."""
        self.model_config, self.seq_len, self.reference_halves, self.peak = model_config, seq_len, reference_halves, peak
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.flops = time.perf_counter(), 0, 0.0

    def add(self, tokens: dict[str, int]) -> None:
        """One step's real tokens per half (preferred-answer twins included)."""
        trained = sum(tokens.values())
        self.tokens += trained
        reference = sum(tokens[half] for half in self.reference_halves)
        self.flops += step_flops(self.model_config, self.seq_len, trained, reference)

    def report(self) -> dict[str, float]:
        elapsed = time.perf_counter() - self.start
        per_device = self.flops / elapsed / jax.device_count()
        out = {"tokens_per_s": self.tokens / elapsed, "tflops_per_device": per_device / 1e12}
        if self.peak:
            out["mfu"] = per_device / self.peak
        self.reset()
        return out


class _BestTracker:
    """Keep-best checkpointing and early stopping on one evaluation metric. Its state is saved with every
    checkpoint and restored with it, so a resumed run neither takes its first evaluation for the best (and
    replaces the best params with worse ones) nor trains on past an early stop."""

    def __init__(self, metric: str, mode: str, patience: int, saved: dict | None = None):
        self.metric, self.mode, self.patience = metric, mode, patience
        saved = saved if saved and saved.get("metric") == metric else {}
        self.best, self.stale = saved.get("best"), saved.get("stale", 0)
        # An early stop holds while the patience (which a resume may raise) is still spent.
        self.stopped = bool(saved.get("stopped_early")) and self.exhausted

    def update(self, value: float) -> bool:
        """True when `value` is the best so far."""
        better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        self.best, self.stale = (value, 0) if better else (self.best, self.stale + 1)
        return better

    @property
    def exhausted(self) -> bool:
        return bool(self.patience) and self.stale >= self.patience

    def to_json(self) -> dict:
        return {"metric": self.metric, "best": self.best, "stale": self.stale, "stopped_early": self.stopped}


def train(config: ConfigDict, eval_fn: EvalFn | None = None, devices: Sequence[jax.Device] | None = None) -> TrainResult:
    """Run (or resume) the training described by `config`, on `devices` (default: all)."""
    run = _set_up(config, eval_fn, devices)
    train_cfg, steps = config.train, config.train.steps
    state, checkpoints = run.state, run.checkpoints
    start_step = step = int(state.step)
    config_json = config_to_json(config)
    logger = MetricsLogger(Path(train_cfg.output_dir), steps, start_step, train_cfg.tensorboard)
    logger.message(f"{'resuming from' if start_step else 'starting at'} step {start_step} of {steps} on mesh {dict(run.mesh.shape)}")
    rows = process_rows(run.data_sharding, (config.data.batch_size,))
    shards = sorted(run.sets["retain"].local)
    print(
        f"process {jax.process_index()} of {jax.process_count()} feeds batch rows {format_spans(rows)} of "
        f"{config.data.batch_size} from data shards {format_spans(shards)} of {run.sets['retain'].layout.count}",
        flush=True,
    )
    throughput = _Throughput(
        run.model_config, config.data.max_length, reference_halves(objective_from_config(config.objective)),
        peak_flops_per_device(train_cfg.peak_flops_per_device),
    )
    saved_progress = checkpoints.progress(start_step) if start_step else None
    best = _BestTracker(train_cfg.best_metric, train_cfg.best_mode, train_cfg.early_stopping_patience, saved_progress)
    if best.stopped:
        logger.message(f"the run stopped early at step {start_step} ({train_cfg.best_metric} had stopped improving): nothing to train")
    preemption = _Preemption()
    metrics_host: dict[str, float] = {}
    preempted = False

    def json_items() -> dict[str, dict]:
        return {"config": config_json, "identity": run.identity, "progress": best.to_json()}

    pending_save = None
    try:
        with activation_sharding(run.mesh):
            while step < steps and not best.stopped:
                batch, tokens = make_batch(run.sets, step, config.data.seed, run.data_sharding)
                if run.reference_fn is not None:
                    batch = with_reference_outputs(batch, run.reference_fn(run.reference_params, batch))
                state, metrics = run.step_fn(state, batch, run.reference_params)
                step += 1
                if step == start_step + 1:  # the first step compiles: leave it out of the throughput
                    jax.block_until_ready(metrics)
                    throughput.reset()
                else:
                    throughput.add(tokens)
                finite = bool(metrics["finite"])
                if not finite or step % train_cfg.log_every == 0 or step == steps:
                    metrics_host = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                    if not finite:
                        raise _diverged(step, metrics_host, checkpoints)
                    if step > start_step + 1:
                        metrics_host.update(throughput.report())
                    logger.log(step, metrics_host)
                logger.advance()
                if pending_save is not None and not checkpoints.saving():
                    logger.message(f"checkpoint step {pending_save} committed")
                    pending_save = None
                if run.eval_fn is not None and train_cfg.eval_every and step % train_cfg.eval_every == 0:
                    results = run.eval_fn(state.params, step)
                    logger.log(step, results)
                    throughput.reset()
                    if train_cfg.best_metric:
                        if train_cfg.best_metric not in results:
                            raise ConfigError(
                                f"config.train.best_metric: the evaluation at step {step} reports no "
                                f"{train_cfg.best_metric!r}, only {sorted(results)}"
                            )
                        if best.update(results[train_cfg.best_metric]):
                            checkpoints.save_best(step, state)
                        if best.exhausted:
                            logger.message(f"early stopping at step {step}: {train_cfg.best_metric} has not improved in {best.patience} evaluations")
                            best.stopped = True
                            break
                if train_cfg.save_every and step % train_cfg.save_every == 0:
                    checkpoints.save(step, state, json_items())  # orbax first finishes the previous save
                    if pending_save is not None:
                        logger.message(f"checkpoint step {pending_save} committed")
                    pending_save = step
                if preemption.requested or checkpoints.reached_preemption(step):
                    logger.message(f"preemption requested: saving step {step} and stopping")
                    preempted = True
                    break
            checkpoints.save(step, state, json_items())
    finally:
        preemption.restore()
        checkpoints.close()
        logger.close()
    logger.message(f"checkpoint step {step} committed")
    return TrainResult(step, start_step, metrics_host, checkpoints.directory, best.stopped, preempted)


def _diverged(step: int, metrics: dict[str, float], checkpoints: RunCheckpoints) -> TrainingDiverged:
    bad = ", ".join(f"{k}={v}" for k, v in metrics.items() if not np.isfinite(v))
    saved = checkpoints.manager.latest_step()
    kept = "no checkpoint was saved yet" if saved is None else f"the last checkpoint (step {saved}) is kept"
    return TrainingDiverged(f"the loss or its gradients are not finite at step {step} ({bad}); the update was not applied and {kept}")
