"""The Hugging Face config adapter: both RoPE spellings, and clear refusals of unsupported math."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from eu_jax.models.config import UnsupportedModelError, from_hf_config
from eu_jax.models.rope import inverse_frequencies

BASE = dict(
    model_type="llama",
    vocab_size=32,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_old_rope_keys_and_transformers5_rope_parameters_give_the_same_config():
    old = from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}})
    older = from_hf_config({**BASE, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **LLAMA3}})
    new = from_hf_config({**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}})
    assert old == older == new
    assert new.rope.type == "llama3" and new.rope.theta == 500000.0 and new.rope.factor == 8.0


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3},
    ],
    ids=["default", "linear", "llama3"],
)
def test_inverse_frequencies_match_transformers(rope_parameters):
    hf_config = transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, rope_parameters=rope_parameters, max_position_embeddings=131072)
    rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hf_config)
    expected = rotary.inv_freq.to(torch.float32).numpy()
    np.testing.assert_allclose(inverse_frequencies(from_hf_config(hf_config).rope, 16), expected, rtol=1e-6)


def test_family_specific_flags():
    qwen2 = from_hf_config(transformers.Qwen2Config(**{k: v for k, v in BASE.items() if k != "model_type"}))
    assert qwen2.qkv_bias and not qwen2.o_bias and not qwen2.qk_norm
    qwen3 = from_hf_config(transformers.Qwen3Config(**{k: v for k, v in BASE.items() if k != "model_type"}, head_dim=40))
    assert qwen3.qk_norm and qwen3.head_dim == 40
    mistral = from_hf_config(transformers.MistralConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, sliding_window=4096))
    assert mistral.sliding_window == 4096
    llama = from_hf_config({**BASE, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True})
    assert llama.qkv_bias and llama.o_bias and llama.mlp_bias and llama.tie_word_embeddings
    # transformers' Llama attends over every position whatever a sliding_window key says.
    assert from_hf_config({**BASE, "sliding_window": 4}).sliding_window is None


def test_raw_config_defaults_are_transformers():
    """A raw config.json dict that leaves head_dim out gets the value transformers gives it."""
    raw = {k: v for k, v in BASE.items() if k != "head_dim"}
    for model_type, config_class in (("qwen3", transformers.Qwen3Config), ("llama", transformers.LlamaConfig)):
        expected = config_class(**{k: v for k, v in raw.items() if k != "model_type"}).head_dim
        assert from_hf_config({**raw, "model_type": model_type}).head_dim == expected


def test_param_count_matches_transformers():
    for cfg in (
        transformers.LlamaConfig(**{k: v for k, v in BASE.items() if k != "model_type"}, tie_word_embeddings=True),
        transformers.Qwen3Config(**{k: v for k, v in BASE.items() if k != "model_type"}, head_dim=40),
        transformers.Qwen2Config(**{k: v for k, v in BASE.items() if k != "model_type"}),
    ):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
        assert from_hf_config(cfg).num_params == model.num_parameters()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model_type": "gpt2"}, "model_type 'gpt2' .* is not supported"),
        ({"model_type": "mixtral"}, "model_type 'mixtral'"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE scaling type 'yarn'"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "RoPE scaling type 'dynamic'"),
        ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
        ({"num_local_experts": 8}, "mixture-of-experts"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 16}, "some layers only"),
        ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16}, "use_sliding_window=True"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads=3"),
    ],
)
def test_unsupported_features_stop_with_their_name(changes, message):
    with pytest.raises(UnsupportedModelError, match=message):
        from_hf_config({**BASE, **changes})


# The training config's `validate`: values that cannot work stop at start-up in one sentence naming the key.


@pytest.fixture
def train_config(tmp_path):
    """A config `validate` accepts: a 2-layer checkpoint's metadata (no arrays) and two tiny data files."""
    from eu_jax.convert.checkpoint import PARAMS_ITEM, ModelMeta, write_model_meta
    from eu_jax.train.config import get_default_config

    ckpt = tmp_path / "ckpt"
    (ckpt / PARAMS_ITEM).mkdir(parents=True)
    write_model_meta(ckpt, ModelMeta(from_hf_config(BASE), BASE))
    config = get_default_config()
    config.model.checkpoint, config.train.output_dir = str(ckpt), str(tmp_path / "run")
    for name in ("retain", "forget"):
        (tmp_path / f"{name}.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
        config.data[name].path = str(tmp_path / f"{name}.jsonl")
    return config


def test_train_config_fixture_is_valid(train_config):
    from eu_jax.train.config import validate

    validate(train_config)
    train_config.objective.update(forget="rmu", retain="none", forget_kwargs={"layer": 2})  # the last hidden state
    validate(train_config)
    train_config.objective.forget_kwargs.layer = 0  # the embeddings
    validate(train_config)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"train.keep_checkpoints": 0}, r"config\.train\.keep_checkpoints: must be at least 1"),
        ({"train.log_every": 0}, r"config\.train\.log_every: must be at least 1"),
        ({"train.save_every": -1}, r"config\.train\.save_every: must be 0 \(off\) or a positive"),
        ({"train.eval_every": -5}, r"config\.train\.eval_every: must be 0 \(off\) or a positive"),
        ({"train.early_stopping_patience": -1, "train.eval_every": 1}, r"config\.train\.early_stopping_patience: must be 0"),
        ({"train.best_metric": "eval/retain_nll"}, r"config\.train\.best_metric: needs train\.eval_every > 0"),
        (
            {"train.best_metric": "eval/retain_nll", "train.early_stopping_patience": 2},
            r"config\.train\.best_metric: needs train\.eval_every > 0",
        ),
        (
            {"train.early_stopping_patience": 2, "train.eval_every": 1},
            r"config\.train\.early_stopping_patience: needs train\.best_metric",
        ),
        ({"mesh.data": 0}, r"config\.mesh\.data: must be a positive size or -1 .*not 0"),
        ({"mesh.tensor": -2}, r"config\.mesh\.tensor: must be a positive size or -1 .*not -2"),
        ({"mesh.dcn_fsdp": 0}, r"config\.mesh\.dcn_fsdp: must be a positive number of slices, not 0"),
        ({"mesh.dcn_data": -1}, r"config\.mesh\.dcn_data: must be a positive number of slices, not -1"),
        ({"mesh.data": -1}, r"config\.mesh\.fsdp: only one of mesh\.data, mesh\.fsdp may be -1"),
        ({"data.batch_size": 0}, r"config\.data\.batch_size: must be at least 1, not 0"),
        ({"data.seed": -1}, r"config\.data\.seed: must be 0 or more, not -1"),
        ({"train.seed": -3}, r"config\.train\.seed: must be 0 or more, not -3"),
        ({"data.max_length": 100000}, r"config\.data\.max_length: 100000 tokens exceed the model's max_position_embeddings \(2048\)"),
        ({"objective.chunk_tokens": 0}, r"config\.objective\.chunk_tokens: must be at least 1, not 0"),
        ({"objective.g": float("nan")}, r"config\.objective\.g: must be a finite weight, not nan"),
        ({"objective.a": float("inf")}, r"config\.objective\.a: must be a finite weight, not inf"),
        ({"optimizer.learning_rate": float("inf")}, r"config\.optimizer\.learning_rate: must be positive and finite, not inf"),
        ({"optimizer.b1": 1.5}, r"config\.optimizer\.b1: must be within \[0, 1\) .*not 1\.5"),
        ({"optimizer.b2": 1.0}, r"config\.optimizer\.b2: must be within \[0, 1\) .*not 1\.0"),
        ({"optimizer.b1": -0.1}, r"config\.optimizer\.b1: must be within \[0, 1\)"),
        ({"optimizer.eps": -1.0}, r"config\.optimizer\.eps: must be positive and finite, not -1\.0"),
        ({"optimizer.eps": 0.0}, r"config\.optimizer\.eps: must be positive and finite, not 0\.0"),
        ({"optimizer.weight_decay": -0.01}, r"config\.optimizer\.weight_decay: must be 0 \(off\) or positive"),
        ({"optimizer.grad_clip_norm": -1.0}, r"config\.optimizer\.grad_clip_norm: must be positive, not -1\.0"),
        ({"optimizer.grad_clip_norm": 0.0}, r"config\.optimizer\.grad_clip_norm: must be positive, not 0\.0"),
        ({"optimizer.end_lr_ratio": -3.0}, r"config\.optimizer\.end_lr_ratio: must be within \[0, 1\] .*not -3\.0"),
        ({"optimizer.end_lr_ratio": 1.5}, r"config\.optimizer\.end_lr_ratio: must be within \[0, 1\] .*not 1\.5"),
        ({"optimizer.warmup_steps": -1}, r"config\.optimizer\.warmup_steps: must be within \[0, train\.steps\]"),
    ],
)
def test_bad_train_values_are_refused_naming_the_key(train_config, changes, message):
    from eu_jax.train.config import ConfigError, validate

    for key, value in changes.items():
        section, name = key.split(".")
        train_config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        validate(train_config)


def test_optimizer_and_objective_bounds_are_accepted(train_config):
    from eu_jax.train.config import validate

    train_config.optimizer.update(b1=0.0, weight_decay=0.0, end_lr_ratio=0.0)
    train_config.data.max_length = 2048  # the model's max_position_embeddings
    validate(train_config)
    train_config.optimizer.end_lr_ratio = 1.0
    validate(train_config)


def test_a_non_finite_term_argument_is_refused(train_config):
    from eu_jax.train.config import ConfigError, validate

    train_config.objective.update(forget="npo", forget_kwargs={"beta": float("nan")})
    with pytest.raises(ConfigError, match=r"^config\.objective\.forget_kwargs\.beta: must be finite, not nan$"):
        validate(train_config)


@pytest.mark.parametrize("below", ["", "sub/run"], ids=["the file", "a folder under it"])
def test_an_output_dir_that_is_a_file_is_refused(train_config, tmp_path, below):
    from eu_jax.train.config import ConfigError, validate

    train_config.train.output_dir = str(tmp_path / "retain.jsonl" / below)
    with pytest.raises(ConfigError, match=rf"^config\.train\.output_dir: '{tmp_path / 'retain.jsonl'}' is not a folder$"):
        validate(train_config)


@pytest.mark.parametrize(
    "section, key, message",
    [
        ("train", "stepz", r"^config\.train\.stepz: unknown key; did you mean 'steps'\?$"),
        ("data.retain", "pathh", r"^config\.data\.retain\.pathh: unknown key; did you mean 'path'\?$"),
        ("", "trian", r"^config\.trian: unknown key; did you mean 'train'\?$"),
        ("optimizer", "zzz", r"^config\.optimizer\.zzz: unknown key; known keys here: b1, b2, end_lr_ratio, eps, "),
    ],
)
def test_unknown_keys_set_in_a_config_file_are_refused(train_config, section, key, message):
    """ConfigDict refuses unknown keys only on the command line; a config file can add any."""
    from eu_jax.train.config import ConfigError, validate

    target = train_config
    for name in filter(None, section.split(".")):
        target = target[name]
    target[key] = 3
    with pytest.raises(ConfigError, match=message):
        validate(train_config)


def test_term_arguments_and_command_sections_are_not_unknown_keys(train_config):
    """A term's kwargs are its own (checked by the term), and the workflow commands add their own section."""
    from ml_collections import ConfigDict

    from eu_jax.train.config import validate

    train_config.objective.update(forget="npo", forget_kwargs={"beta": 0.2})
    train_config.workflow = ConfigDict({"methods": "eu,npo"})
    train_config.tofu = ConfigDict({"methods": "eu"})
    validate(train_config)


def test_keep_best_and_early_stopping_with_evaluations_are_accepted(train_config):
    from eu_jax.train.config import validate

    train_config.train.update(eval_every=5, best_metric="eval/retain_nll", early_stopping_patience=2)
    validate(train_config)


@pytest.mark.parametrize("layer", [3, 100, -1])
def test_rmu_layer_outside_the_model_is_refused_with_the_valid_range(train_config, layer):
    from eu_jax.train.config import ConfigError, validate

    train_config.objective.update(forget="rmu", retain="none", forget_kwargs={"layer": layer})
    message = rf"^config\.objective\.forget_kwargs\.layer: .*hidden layer {layer}, but a 2-layer model has hidden states 0 to 2"
    with pytest.raises(ConfigError, match=message):
        validate(train_config)


def test_rmu_layer_check_names_a_checkpoint_without_metadata(train_config, tmp_path):
    from eu_jax.train.config import ConfigError, validate

    (tmp_path / "empty").mkdir()
    train_config.model.checkpoint = str(tmp_path / "empty")
    train_config.objective.update(forget="rmu", retain="none")
    with pytest.raises(ConfigError, match=r"^config\.model\.checkpoint: .* is not an eu_jax checkpoint"):
        validate(train_config)


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"data": 0, "fsdp": -1}, "mesh axis 'data' has size 0"),
        ({"data": -2, "fsdp": -1}, "mesh axis 'data' has size -2"),
        ({"data": 2, "tensor": -3}, "mesh axis 'tensor' has size -3"),
    ],
)
def test_mesh_sizes_are_positive_or_minus_one(spec, message):
    from eu_jax.parallel.mesh import resolve_mesh_shape

    with pytest.raises(ValueError, match=message):
        resolve_mesh_shape(spec, 8)
    assert resolve_mesh_shape({"data": 2, "fsdp": -1}, 8) == (2, 4, 1)


def test_dcn_mesh_sizes_are_positive():
    import jax

    from eu_jax.parallel.mesh import make_mesh

    with pytest.raises(ValueError, match="DCN mesh axis 'data' has size -1"):
        make_mesh({"data": -1}, jax.devices()[:1], dcn_spec={"data": -1})


def test_run_identity_holds_the_resolved_number_of_data_shards(train_config):
    """data.shards 0 is one shard per process: the identity keeps the count the batches are drawn with, so
    a run resumed on another number of processes (another data order) is told apart."""
    from eu_jax.train.identity import run_identity

    assert run_identity(train_config)["data"]["shards"] == 1  # one process here
    train_config.data.shards = 2
    assert run_identity(train_config)["data"]["shards"] == 2


@pytest.mark.parametrize(
    "saved, current, differences",
    [
        ({"params": "/r/params"}, {"params": "/r/params@17"}, []),  # recorded before commit times: the same folder
        ({"params": "/r/params@16"}, {"params": "/r/params@17"}, ["params: /r/params@16 -> /r/params@17"]),
        ({"params": "/r/params"}, {"params": "/s/params@17"}, ["params: /r/params -> /s/params@17"]),
        ({"params": "/r/4/state#ab"}, {"params": "/r/4/state#cd"}, ["params: /r/4/state#ab -> /r/4/state#cd"]),
        ({"data": {"shards": 0}}, {"data": {"shards": 2}}, []),  # recorded before the count was resolved
        ({"data": {"shards": 1}}, {"data": {"shards": 2}}, ["data.shards: 1 -> 2"]),
    ],
)
def test_identities_recorded_before_exact_values_still_match(saved, current, differences):
    from eu_jax.train.identity import identity_differences

    assert identity_differences(saved, current) == differences
