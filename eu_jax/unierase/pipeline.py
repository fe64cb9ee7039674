"""UniErase end to end on one checkpoint: unlearning token (stage 1), then the null-space edit (stage 2).

    OUTPUT/token/   the base model with `<unlearn_0>` added and its rows trained (stage 1)
    OUTPUT/model/   stage 1's model with the edited down_proj kernels, plus unierase_edits.npz
    OUTPUT/unierase.json   what each stage did: losses, edit rounds, null-space sizes, parameters changed, time

A checkpoint that already has the token (e.g. an earlier run's OUTPUT/model) skips stage 1, and its
unierase_edits.npz makes the new edits sequential ones that protect the earlier. Each stage's folder is
written under a temporary name and renamed when complete, so a rerun after an interruption redoes only
the unfinished stage: OUTPUT/token is reused only while what it was trained from (OUTPUT/token/
unierase_inputs.json: the checkpoint's params, the questions, the refusals, the token and its training
settings) is the same, and trained again otherwise. Stage 2 keeps nothing between runs but the finished
OUTPUT/model, which a rerun refuses to replace.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
from ml_collections import ConfigDict

from eu_jax.convert.checkpoint import HF_FILES_DIR, MODEL_META_FILE, load_model_meta, locate_params, save_params_checkpoint
from eu_jax.data import DataSpec, Encoder, Record, load_records
from eu_jax.data.cache import digest
from eu_jax.eval.model import EvalModel
from eu_jax.eval.probes import load_probes
from eu_jax.files import write_json_atomic
from eu_jax.parallel.mesh import mesh_from_config
from eu_jax.train.config import config_to_json
from eu_jax.train.identity import describe_differences, identity_differences, params_identity
from eu_jax.unierase.covariance import cached_key_second_moments, checkpoint_fingerprint, null_space_projector
from eu_jax.unierase.edit import Editor, check_edit_config, get_edit_config, load_edit_state, sample_context_prefixes, save_edit_state
from eu_jax.unierase.requests import EditRequest
from eu_jax.unierase.idk_bank import load_phrases
from eu_jax.unierase.token_training import check_token_training, get_token_config, token_records, train_unlearning_token
from eu_jax.unierase.vocab import VocabError, add_unlearning_token

RESULTS_FILE = "unierase.json"
TOKEN_INPUTS_FILE = "unierase_inputs.json"  # in OUTPUT/token: what stage 1 trained it from
# Token-training settings that decide how fast or where stage 1 runs, not the token it trains (as a training
# run's identity leaves them out, eu_jax/train/identity.py); the refusal phrases count by content, not by path.
TOKEN_TRAINING_FREE = ("mesh", "runtime", "chunk_tokens", "log_every", "phrases")


def get_unierase_config() -> ConfigDict:
    """The `eu-unierase` command's settings (configs/unierase.py)."""
    return ConfigDict(
        {
            "checkpoint": "",  # the model to unlearn from (eu_jax checkpoint or training run)
            "output": "",  # run folder (see the module docstring)
            "forget": {"path": "", "split": "train", "format": "auto", "prompt_field": "prompt",
                       "response_field": "response", "messages_field": "messages", "max_examples": 0},
            # Texts whose MLP keys the edit must leave alone: these files ("," separated) plus the shipped
            # general-knowledge probes; at most max_tokens tokens. refusals: also each forget question followed
            # by the token and its refusal (stage 1's texts), counted on the reply only, so the edit that makes
            # the question emit the token does not fire again inside the refusal.
            "retained": {"paths": "", "probes": True, "max_tokens": 100_000, "refusals": True},
            "token": {"name": "<unlearn_0>", "init": "mean", "pad_to_multiple": 1, "training": get_token_config()},
            "edit": get_edit_config(),
            "mesh": {"data": 1, "fsdp": -1, "tensor": 1, "dcn_data": 1, "dcn_fsdp": 1, "dcn_tensor": 1},
            "distributed": {"coordinator_address": "", "num_processes": 0, "process_id": -1, "local_device_ids": ""},
        }
    )


def forget_questions(config: ConfigDict) -> list[str]:
    """The user turns to unlearn: each record's prompt (pairs) or first user message (chats)."""
    section = config.forget
    if not section.path:
        raise ValueError("config.forget.path is required: the questions to unlearn (pairs or messages data)")
    spec = DataSpec(**{k: section[k] for k in section.keys()})
    questions = []
    for record in load_records(spec):
        if record.prompt is not None:
            questions.append(record.prompt)
        elif record.messages is not None and any(role == "user" for role, _ in record.messages):
            questions.append(next(content for role, content in record.messages if role == "user"))
        else:
            raise ValueError(f"{record.where}: a forget record needs a prompt or a user turn to unlearn")
    return questions


def retained_records(config: ConfigDict) -> list[Record]:
    records = [Record(where=f"probe {p.id}", prompt=p.prompt, response=p.answer) for p in load_probes()] if config.retained.probes else []
    for path in [p.strip() for p in config.retained.paths.split(",") if p.strip()]:
        records.extend(load_records(DataSpec(path=path)))
    if not records:
        raise ValueError("no retained texts for the null space: set config.retained.paths or keep config.retained.probes")
    return records


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(f"unierase: {message}", flush=True)


def _report_round(record: dict[str, Any]) -> None:
    _say(f"edit round {record['round']}: {record['requests']} questions, mean target NLL "
         f"{np.mean(record['target_nll_before']):.2f} -> {np.mean(record['target_nll_after']):.2f} "
         f"(the target residuals reached {np.mean(record['target_nll_at_z_star']):.2f})")


def _complete(folder: Path) -> bool:
    return (folder / MODEL_META_FILE).is_file()


def _build_atomically(folder: Path, build: Callable[[Path], Any]) -> Any:
    """build(partial folder), then rename it to `folder`; a leftover partial folder is discarded first."""
    partial = folder.with_name(folder.name + ".partial")
    if jax.process_index() == 0:
        shutil.rmtree(partial, ignore_errors=True)
    result = build(partial)
    if jax.process_index() == 0:
        partial.rename(folder)
    return result


def _has_token(checkpoint: Path, token: str) -> bool:
    """Whether the checkpoint's tokenizer has `token` as a special token added to it (by an earlier run's stage 1).
    A name it has otherwise, as an ordinary entry or as one of its own special tokens (bos, eos, ...), is refused:
    stage 1 would skip it as already trained, and stage 2 would edit the questions to answer with it."""
    from eu_jax.generate_cli import load_tokenizer

    tokenizer = load_tokenizer(checkpoint)
    token_id = tokenizer.get_vocab().get(token)
    if token_id is None:
        return False
    added = tokenizer.added_tokens_decoder.get(token_id)
    if added is None or not added.special or token in tokenizer.all_special_tokens:
        raise VocabError(f"config.token.name={token!r} is already a token of {checkpoint}'s tokenizer (id {token_id}), "
                         "not an unlearning token added to it; choose another name")
    return True


def token_stage_inputs(config: ConfigDict, questions: list[str], layers: list[int]) -> dict[str, Any]:
    """What decides stage 1's model: the checkpoint's params, the questions and refusals the token is trained on,
    the token's name, start and padding, its training settings, and the layers the robust phase adds noise to."""
    token, training = config.token, config.token.training
    return {
        "checkpoint": params_identity(config.checkpoint),
        "forget": {"content": digest(questions)},
        "refusals": {"content": digest(load_phrases(training.phrases))},
        "token": {"name": token.name, "init": token.init, "pad_to_multiple": token.pad_to_multiple},
        "training": {k: v for k, v in config_to_json(training).items() if k not in TOKEN_TRAINING_FREE},
        "noised_layers": list(layers) if training.robust.steps else [],
    }


def _inputs_differences(folder: Path, inputs: dict[str, Any]) -> str:
    """How `inputs` differ from those `folder` was trained from, in one clause ("" when they are the same). A
    token without that record (an earlier eu_jax's) is refused, not replaced: its training is not thrown away
    on a guess, nor reused for settings it may not match."""
    path = folder / TOKEN_INPUTS_FILE
    if not path.is_file():
        raise FileExistsError(
            f"{folder} holds a trained token with no {TOKEN_INPUTS_FILE} saying what it was trained from (an earlier "
            "eu_jax made it): delete it to train the token again, or choose a new config.output"
        )
    return describe_differences(identity_differences(json.loads(path.read_text()), inputs))


def stage_one(config: ConfigDict, questions: list[str], layers: list[int], out: Path) -> tuple[Path, dict[str, Any]]:
    """The checkpoint with a trained unlearning token: the input itself when it already has the token, an earlier
    run's OUT/token when it was trained from the same inputs, else trained now."""
    source, token = Path(config.checkpoint), config.token.name
    if _has_token(source, token):
        return source, {"skipped": f"{source} already has {token}"}
    folder, inputs = out / "token", token_stage_inputs(config, questions, layers)
    if _complete(folder):
        differences = _inputs_differences(folder, inputs)
        if not differences:
            return folder, {"reused": str(folder)}
        _say(f"{folder} was trained from another checkpoint or settings ({differences}): training the token again")
        if jax.process_index() == 0:
            shutil.rmtree(folder)
    start = time.perf_counter()
    training = config.token.training
    training.mesh = config.mesh

    def build(partial: Path) -> dict[str, Any]:
        grown = out / "token_grown.partial"
        if jax.process_index() == 0:
            shutil.rmtree(grown, ignore_errors=True)
        token_id = add_unlearning_token(source, grown, token, config.token.init, config.token.pad_to_multiple, mesh_from_config(config.mesh))
        metrics = train_unlearning_token(grown, partial, questions, token_id, layers, training)
        if jax.process_index() == 0:
            shutil.rmtree(grown, ignore_errors=True)
            write_json_atomic(partial / TOKEN_INPUTS_FILE, inputs)
        return {"token_id": token_id, "phases": metrics}

    summary = _build_atomically(folder, build)
    return folder, {**summary, "seconds": time.perf_counter() - start}


def stage_two(config: ConfigDict, checkpoint: Path, questions: list[str], layers: list[int], out: Path) -> dict[str, Any]:
    """Edit `checkpoint` so each question makes the model answer with the token; saved as OUT/model."""
    start = time.perf_counter()
    cfg = config.edit
    model = EvalModel.load(checkpoint, mesh_from_config(config.mesh))
    encoder = Encoder(model.tokenizer)
    corpus = encoder.encode_many(retained_records(config))
    fingerprint, counted = checkpoint_fingerprint(checkpoint), 0
    moments, tokens = cached_key_second_moments(fingerprint, model.config, model.params, model.mesh,
                                                corpus, layers, config.retained.max_tokens)
    if config.retained.refusals:
        texts = token_records(questions, config.token.name, load_phrases(config.token.training.phrases))
        replies, counted = cached_key_second_moments(fingerprint, model.config, model.params, model.mesh,
                                                     encoder.encode_many(texts), layers,
                                                     config.retained.max_tokens, replies_only=True)
        moments, tokens = (moments * tokens + replies * counted) / (tokens + counted), tokens + counted
    projections = [null_space_projector(m, cfg.nullspace_energy) for m in moments]
    _say(f"null space of {tokens} retained tokens' keys, layers {layers}: {[dim for _, dim in projections]} of "
         f"{model.config.intermediate_size} dimensions")
    prefixes = sample_context_prefixes(model.decoder(), model.tokenizer, model.mesh, cfg.contexts.count, cfg.contexts.length, cfg.contexts.seed)
    state = load_edit_state(locate_params(checkpoint)[2], layers, model.config.intermediate_size)
    editor = Editor(model.config, model.params, model.tokenizer, model.mesh, cfg, np.stack([p for p, _ in projections]), state, prefixes)
    editor.edit([EditRequest(prompt=q, target=config.token.name) for q in questions], on_round=_report_round)
    hf_files = locate_params(checkpoint)[2] / HF_FILES_DIR

    def build(partial: Path) -> None:
        save_params_checkpoint(partial, editor.params, load_model_meta(checkpoint), hf_files if hf_files.is_dir() else None)
        if jax.process_index() == 0:
            save_edit_state(editor.state, partial)

    _build_atomically(out / "model", build)
    f, d = model.config.intermediate_size, model.config.hidden_size
    return {
        "layers": layers, "retained_tokens": tokens, "refusal_tokens": counted, "null_space_dims": [dim for _, dim in projections],
        "context_prefixes": prefixes, "rounds": editor.state.log,
        "params_changed": len(layers) * f * d, "params_changed_share": len(layers) * f * d / model.config.num_params,
        "seconds": time.perf_counter() - start,
    }


def check_settings(config: ConfigDict) -> list[int]:
    """The edit layers, once the settings that would otherwise fail after stage 1's training, or quietly edit
    nothing, are checked: each refusal is one sentence naming its setting."""
    if not config.token.name.strip():
        raise ValueError("config.token.name is empty: name the unlearning token to add (e.g. <unlearn_0>)")
    check_token_training(config.token.training, "config.token.training")
    return check_edit_settings(config.edit, load_model_meta(Path(config.checkpoint)).config.num_layers, "config.edit")


def check_edit_settings(edit: ConfigDict, num_layers: int, where: str) -> list[int]:
    """`check_edit_config`, its refusal naming the setting as the user sets it (`where`.key)."""
    try:
        return check_edit_config(edit, num_layers)
    except ValueError as err:
        raise ValueError(f"{where}.{err}") from None


def run_unierase(config: ConfigDict) -> Path:
    """Both stages; returns OUTPUT/model. Refuses an output whose edited model already exists."""
    if not config.checkpoint or not config.output:
        raise ValueError("config.checkpoint and config.output are required")
    out = Path(config.output)
    if (out / "model").exists():
        raise FileExistsError(f"{out / 'model'} already exists; choose a new config.output")
    layers = check_settings(config)
    out.mkdir(parents=True, exist_ok=True)
    questions = forget_questions(config)
    token_ckpt, token_summary = stage_one(config, questions, layers, out)
    edit_summary = stage_two(config, token_ckpt, questions, layers, out)
    if jax.process_index() == 0:
        write_json_atomic(out / RESULTS_FILE, {"questions": len(questions), "token": token_summary, "edit": edit_summary,
                                               "config": config_to_json(config)})
    return out / "model"
