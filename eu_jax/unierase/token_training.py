"""UniErase stage 1: train only the unlearning token's rows so that, after it, the model refuses.

Each question is followed by the token and the IDK bank's reply for it; the loss is the NLL of the reply
and its end of turn (never of the question, nor of the token itself: which questions lead to the token is
stage 2's job). Everything but the token's embedding row (and its output column when the head is untied)
is frozen by construction: the jitted step differentiates only those vectors, writing them into the
frozen params with `.at[id].set` inside the loss, and Adam's moments exist only for them.

The schedule follows the paper, every phase with its own steps and learning rate (0 steps skips it):
- raw: high learning rate, `question <token> reply` without the chat template;
- mixed: low learning rate, the same with and without the chat template (the token opening the
  assistant's reply); a tokenizer without a template trains on the raw texts only;
- robust: as mixed, with Gaussian noise (`noise_scale` times each kernel's std) added afresh every
  batch to the `mlp.down_proj` kernels of the layers stage 2 will edit, so the token keeps working
  once they change. The noise lives only inside the loss; the saved kernels are the clean ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from eu_jax.setting_rules import AT_LEAST_ONE, POSITIVE_FINITE, SEED, Rule, check_rules, zero_or_more

from eu_jax.convert.checkpoint import (
    HF_FILES_DIR,
    ensure_new_output,
    load_model_meta,
    load_params,
    locate_params,
    save_params_checkpoint,
)
from eu_jax.data import Record
from eu_jax.data.batches import batch_indices, global_batch
from eu_jax.data.chat import use_chat_template
from eu_jax.data.pipeline import LengthPolicy, TokenizedSet, tokenize_records
from eu_jax.files import write_json_atomic
from eu_jax.generate import bucket_length
from eu_jax.generate_cli import load_tokenizer
from eu_jax.models.config import ModelConfig, RuntimeOptions
from eu_jax.models.state import Params, build_decoder, params_shardings
from eu_jax.objectives.token_stats import chunked_token_stats, target_logprob
from eu_jax.parallel.mesh import mesh_from_config
from eu_jax.parallel.sharding import BATCH_AXES, activation_sharding, batch_sharding
from eu_jax.unierase.idk_bank import idk_reply, load_phrases

PHASES = ("raw", "mixed", "robust")
RESULTS_FILE = "unlearning_token.json"
Rows = dict[str, jax.Array]  # {"embed": [embed]} and, untied, {"lm_head": [embed]}


class TokenTrainingError(ValueError):
    """A bad argument or setting of the token training, named in one sentence."""


def get_token_config() -> ConfigDict:
    """Defaults: the paper's high-then-low learning rates, phases sized for a few hundred questions."""
    return ConfigDict(
        {
            "batch_size": 16,
            "max_length": 128,  # tokens per row; longer examples are left out (and counted)
            "seed": 0,
            "log_every": 10,
            "chunk_tokens": 1024,
            "phrases": "",  # a text file of refusals, one per line; "" is the shipped bank
            # Learning rates of prompt tuning, not of fine-tuning: Adam moves the one row by about the learning
            # rate per coordinate and step. On SmolLM2-135M (embedding rows of norm ~3) 1e-3 / 1e-4 for 30 / 20 / 10
            # steps left the row where it started and the model answered after the token as before; 3e-2 / 3e-3
            # made 8 of 10 forget questions answer "I'm not sure." after it.
            "raw": {"steps": 100, "learning_rate": 1e-2},
            "mixed": {"steps": 60, "learning_rate": 1e-3},
            "robust": {"steps": 40, "learning_rate": 1e-3, "noise_scale": 0.1},
            # RuntimeOptions' defaults; the parameter dtype is the checkpoint's own.
            "runtime": {k: v for k, v in dataclasses.asdict(RuntimeOptions()).items() if k != "param_dtype"},
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1},
        }
    )


_PHASES = ("raw", "mixed", "robust")
TRAINING_RULES: tuple[Rule, ...] = (
    ("batch_size", *AT_LEAST_ONE),
    ("max_length", lambda v: v >= 2, "must be at least 2"),
    ("seed", *SEED),
    ("log_every", *AT_LEAST_ONE),
    ("chunk_tokens", *AT_LEAST_ONE),
    *((f"{phase}.steps", *zero_or_more("the phase skipped")) for phase in _PHASES),
    *((f"{phase}.learning_rate", *POSITIVE_FINITE) for phase in _PHASES),
    ("robust.noise_scale", lambda v: 0 <= v < math.inf, "must be 0 or a positive finite number"),
)


def check_token_training(training: ConfigDict, where: str) -> None:
    """Refuse a token-training setting that cannot work, named as the user sets it (`where`), before any work."""
    check_rules(training, TRAINING_RULES, where)


def _log(message: str) -> None:
    if jax.process_index() == 0:
        print(message, flush=True)


# ---- data ------------------------------------------------------------------------------------------


def token_records(questions: Sequence[str], token: str, phrases: Sequence[str]) -> list[Record]:
    """One (question, token + refusal) pair per question; the refusal is the bank's phrase for it."""
    return [
        Record(where=f"question {i + 1}", prompt=q, response=token + idk_reply(q, phrases)) for i, q in enumerate(questions)
    ]


def encode_examples(tokenizer: Any, records: Sequence[Record], token_id: int, max_length: int) -> TokenizedSet:
    """Rows of the project's encoding (chat template when the tokenizer has one), scored on the reply and
    the end of turn: the token's own position is taken out of the loss."""
    policy = LengthPolicy(max_length, overflow="drop")
    loaded = tokenize_records(tokenizer, records, policy, source="unlearning-token questions")
    if loaded.report.dropped:
        _log(f"unlearning token: {loaded.report.dropped} of {len(records)} examples exceed max_length={max_length}; left out")
    data = loaded.data
    return dataclasses.replace(data, loss_mask=(data.loss_mask * (data.input_ids != token_id)).astype(np.int32))


def phase_sets(
    tokenizer: Any, records: Sequence[Record], token_id: int, max_length: int
) -> dict[str, dict[str, np.ndarray]]:
    """Batch arrays per phase: raw texts (no template) first; raw and chat texts together afterwards, or raw
    only when the tokenizer has no chat template. Each set is cut to its longest row (see `_without_padding`)."""
    raw = encode_examples(use_chat_template(copy.deepcopy(tokenizer), "none"), records, token_id, max_length).arrays()
    if not tokenizer.chat_template:
        raw = _without_padding(raw)
        return {"raw": raw, "mixed": raw, "robust": raw}
    chat = encode_examples(tokenizer, records, token_id, max_length).arrays()
    mixed = _without_padding({name: np.concatenate([raw[name], chat[name]]) for name in raw})
    return {"raw": _without_padding(raw), "mixed": mixed, "robust": mixed}


def _without_padding(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Right-padded rows cut to the longest one, rounded up to a bucket length (so few widths compile).

    A question and its refusal are a few dozen tokens, so rows padded to `max_length` (128) made most of
    every step padding: the raw phase's rows of SmolLM2 on TOFU questions hold 19-28 tokens."""
    width = bucket_length(int(arrays["attention_mask"].sum(axis=1).max()))
    return {name: a[:, :width] for name, a in arrays.items()}


# ---- the step ---------------------------------------------------------------------------------------


def params_with_rows(params: Params, rows: Rows, token_id: int) -> Params:
    """The frozen params with the token's trained row(s) written in (in the params' dtype)."""
    out = dict(params)
    out["embed"] = params["embed"].at[token_id].set(rows["embed"].astype(params["embed"].dtype))
    if "lm_head" in rows:
        out["lm_head"] = params["lm_head"].at[:, token_id].set(rows["lm_head"].astype(params["lm_head"].dtype))
    return out


def token_rows(params: Params, token_id: int) -> Rows:
    """The token's current row(s), in fp32 (Adam's updates on a bf16 row would round away)."""
    rows = {"embed": params["embed"][token_id]}
    if "lm_head" in params:
        rows["lm_head"] = params["lm_head"][:, token_id]
    return {name: row.astype(jnp.float32) for name, row in rows.items()}


def with_noisy_down_proj(params: Params, layers: Sequence[int], scale: jax.Array, key: jax.Array) -> Params:
    """The params with N(0, (scale * the kernel's std)^2) noise added to `mlp.down_proj` of each of `layers`."""
    down = params["layers"]["mlp"]["down_proj"]  # [layers, mlp, embed]
    picked = jnp.asarray(layers)
    kernels = down[picked].astype(jnp.float32)
    std = jnp.std(kernels, axis=(1, 2), keepdims=True)
    noisy = kernels + scale * std * jax.random.normal(key, kernels.shape, jnp.float32)
    mlp = dict(params["layers"]["mlp"], down_proj=down.at[picked].set(noisy.astype(down.dtype)))
    return dict(params, layers=dict(params["layers"], mlp=mlp))


@lru_cache(maxsize=4)
def compiled_token_step(
    config: ModelConfig, options: RuntimeOptions, token_id: int, layers: tuple[int, ...], chunk_tokens: int, mesh: Mesh
):
    """jit(step)(rows, opt_state, params, batch, learning_rate, noise_scale, key) -> (rows, opt_state, loss).

    Only `rows` is differentiated. The noise on `layers` is drawn every step (scale 0 outside the robust
    phase adds exactly nothing), so all phases share one compilation, and so do repeated runs."""
    adam = optax.scale_by_adam()

    def loss_fn(rows, params, batch, noise_scale, key):
        params = params_with_rows(params, rows, token_id)
        if layers:
            params = with_noisy_down_proj(params, layers, noise_scale, key)
        model = build_decoder(config, params, options)
        ids, attention = batch["input_ids"], batch["attention_mask"]
        hidden = model(ids, attention, return_logits=False).hidden
        stats = chunked_token_stats(
            {"logp": target_logprob}, hidden[:, :-1], model.unembed_kernel(), ids[:, 1:], chunk_tokens=chunk_tokens
        )
        mask = (batch["loss_mask"][:, 1:] * attention[:, 1:]).astype(jnp.float32)
        return -(stats["logp"] * mask).sum() / jnp.maximum(mask.sum(), 1.0)

    def step(rows, opt_state, params, batch, learning_rate, noise_scale, key):
        loss, grads = jax.value_and_grad(loss_fn)(rows, params, batch, noise_scale, key)
        updates, opt_state = adam.update(grads, opt_state)
        rows = jax.tree.map(lambda row, update: row - learning_rate * update, rows, updates)
        return rows, opt_state, loss

    replicated = NamedSharding(mesh, PartitionSpec())
    return adam, jax.jit(step, out_shardings=(replicated, replicated, replicated))


# ---- the schedule -----------------------------------------------------------------------------------


def _check_arguments(
    model_config: ModelConfig, tokenizer: Any, token_id: int, layers: Sequence[int], config: ConfigDict, mesh: Mesh
) -> str:
    """The token's text, after every argument is checked."""
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is None or not added.special or not 0 <= token_id < model_config.vocab_size:
        raise TokenTrainingError(
            f"token id {token_id} is not a special token added to the checkpoint's tokenizer (add it with add_unlearning_token)"
        )
    bad = [layer for layer in layers if not 0 <= layer < model_config.num_layers]
    if bad:
        raise TokenTrainingError(f"layers {bad} are not layers of this {model_config.num_layers}-layer model")
    if config.robust.steps and not layers:
        raise TokenTrainingError(
            "config.robust.steps > 0 needs the layers stage 2 will edit (layers=...), whose down_proj gets the noise"
        )
    for phase in PHASES:
        if config[phase].steps < 0 or config[phase].learning_rate <= 0:
            raise TokenTrainingError(
                f"config.{phase}: steps must be >= 0 and learning_rate > 0, "
                f"got {config[phase].steps} and {config[phase].learning_rate}"
            )
    data_parallel = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    if config.batch_size < 1 or config.batch_size % data_parallel:
        raise TokenTrainingError(
            f"config.batch_size={config.batch_size} is not a positive multiple of the {data_parallel} data-parallel "
            "devices (mesh data x fsdp)"
        )
    return str(added.content)


def _run_phase(name: str, settings: ConfigDict, step_fn, adam, rows: Rows, params: Params, arrays: dict[str, np.ndarray],
               config: ConfigDict, mesh: Mesh) -> tuple[Rows, dict[str, float]]:
    """`settings.steps` steps from fresh Adam moments; the batches and the noise of step s are fixed by the seed."""
    opt_state = adam.init(rows)
    sharding = batch_sharding(mesh)
    noise_scale = float(settings.get("noise_scale", 0.0))
    key = jax.random.fold_in(jax.random.key(config.seed), PHASES.index(name))
    losses = []
    for s in range(settings.steps):
        indices = batch_indices(len(arrays["input_ids"]), config.batch_size, s, config.seed, stream=(PHASES.index(name),))
        batch = global_batch(arrays, indices, sharding)
        noise_key = jax.random.fold_in(key, s)
        rows, opt_state, loss = step_fn(rows, opt_state, params, batch, settings.learning_rate, noise_scale, noise_key)
        losses.append(loss)
        if (s + 1) % config.log_every == 0 or s + 1 == settings.steps:
            value = float(loss)
            if not np.isfinite(value):
                raise TokenTrainingError(
                    f"the loss became {value} at step {s + 1} of the {name} phase; lower config.{name}.learning_rate"
                )
            _log(f"unlearning token, {name} phase: step {s + 1}/{settings.steps}, loss {value:.4f}")
    values = np.asarray(jax.device_get(losses), np.float64)
    tail = values[-min(config.log_every, len(values)):]
    summary = {"steps": settings.steps, "learning_rate": settings.learning_rate}
    return rows, summary | {"loss_first": float(values[0]), "loss_last": float(tail.mean())}


def train_unlearning_token(
    ckpt: str | Path,
    out_ckpt: str | Path,
    questions: Sequence[str],
    token_id: int,
    layers: Sequence[int] = (),
    config: ConfigDict | None = None,
) -> dict[str, dict[str, float]]:
    """Train the token's rows of `ckpt` on `questions` through the three phases and save `out_ckpt`.

    `layers`: the layers whose `mlp.down_proj` stage 2 will edit (the robust phase's noise goes there).
    Returns per-phase metrics (steps, learning rate, first loss, mean loss of the last `log_every` steps),
    also written to `out_ckpt/unlearning_token.json` with the token, the layers and the config.
    """
    config = get_token_config() if config is None else config
    ckpt, out_ckpt, layers = Path(ckpt), Path(out_ckpt), tuple(sorted({int(layer) for layer in layers}))
    ensure_new_output(out_ckpt)
    if not questions:
        raise TokenTrainingError("no questions to train the unlearning token on")
    mesh = mesh_from_config(config.mesh)
    meta, tokenizer = load_model_meta(ckpt), load_tokenizer(ckpt)
    token = _check_arguments(meta.config, tokenizer, token_id, layers, config, mesh)
    sets = phase_sets(tokenizer, token_records(questions, token, load_phrases(config.phrases)), token_id, config.max_length)
    options = RuntimeOptions(param_dtype=meta.param_dtype, **config.runtime)
    shardings = params_shardings(meta.config, mesh, options)
    params, _ = load_params(ckpt, shardings)

    noisy_layers = layers if config.robust.steps else ()
    adam, step_fn = compiled_token_step(meta.config, options, token_id, noisy_layers, config.chunk_tokens, mesh)
    rows = jax.device_put(token_rows(params, token_id), NamedSharding(mesh, PartitionSpec()))
    metrics = {}
    with activation_sharding(mesh):
        for phase in PHASES:
            if config[phase].steps:
                rows, metrics[phase] = _run_phase(
                    phase, config[phase], step_fn, adam, rows, params, sets[phase], config, mesh
                )
    trained = jax.jit(lambda p, r: params_with_rows(p, r, token_id), out_shardings=shardings)(params, rows)
    save_params_checkpoint(out_ckpt, trained, meta, locate_params(ckpt)[2] / HF_FILES_DIR)
    if jax.process_index() == 0:
        results = {"token": token, "token_id": token_id, "layers": list(layers), "questions": len(questions), "phases": metrics}
        write_json_atomic(out_ckpt / RESULTS_FILE, results | {"config": config.to_dict()})
    return metrics
