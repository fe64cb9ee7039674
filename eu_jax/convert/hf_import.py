"""Import Hugging Face checkpoints (safetensors, opt-in pickles, GGUF) into eu_jax params.

Tensors are read one per conversion thread at a time and each parameter is placed straight into its
sharding on the device mesh, so host memory peaks near one copy of the model plus one stacked parameter.
Every name and shape is checked against the config before any tensor data is read.
"""

from __future__ import annotations

import json
import math
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from eu_jax.convert.checkpoint import ModelMeta, ensure_new_output, save_params_checkpoint, storage_dtype
from eu_jax.convert.keymap import KeyRule, expected_hf_names, is_ignorable, rules_for
from eu_jax.convert.safetensors_io import WeightReader
from eu_jax.convert.threads import conversion_threads
from eu_jax.models.config import ModelConfig, RuntimeOptions, check_model_type, from_hf_config
from eu_jax.models.state import Params, abstract_params, params_shardings
from eu_jax.parallel.mesh import single_device_mesh
from eu_jax.parallel.sharding import DEFAULT_RULES, MeshAxes
from eu_jax.tree_paths import get_path, set_path

# Files copied verbatim from a Hugging Face directory so the export can hand them back.
HF_SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def _describe(config: ModelConfig) -> str:
    return (
        f"{config.model_type} with hidden_size={config.hidden_size}, intermediate_size={config.intermediate_size}, "
        f"{config.num_heads} heads x {config.head_dim}, {config.num_kv_heads} kv heads, vocab {config.vocab_size}"
    )


def check_weight_names_and_shapes(weights: WeightReader, config: ModelConfig, abstract: Params | None = None) -> None:
    """Fail before reading data when a tensor is missing, unexpected, or of the wrong shape.

    `abstract`: the params' shapes when the caller already has them (abstract_params(config)).
    """
    abstract = abstract_params(config) if abstract is None else abstract
    expected = set()
    for rule in rules_for(config):
        our_shape = get_path(abstract, rule.path).shape
        hf_shape = rule.hf_shape(our_shape[1:] if rule.per_layer else our_shape)
        for name in _rule_names(rule, config):
            expected.add(name)
            if name not in weights:
                raise ValueError(f"missing tensor {name}: the checkpoint lacks it but the config ({_describe(config)}) needs it")
            if not jnp.issubdtype(weights.dtype(name), jnp.floating):
                raise ValueError(
                    f"tensor {name} in {weights.file_of(name).name} is {weights.dtype(name)}, but weights must be "
                    "floating point (an integer tensor here is a quantised or corrupt checkpoint)"
                )
            if tuple(weights.shape(name)) != hf_shape:
                raise ValueError(
                    f"tensor {name} in {weights.file_of(name).name} has shape {tuple(weights.shape(name))}, "
                    f"but the config ({_describe(config)}) needs {hf_shape}"
                )
    for name in weights.names():
        if name not in expected and not is_ignorable(name, config):
            raise ValueError(
                f"unexpected tensor {name} in {weights.file_of(name).name}: a {config.model_type} model with this "
                f"config has no such parameter (does the config leave out a bias, norm or untied head?)"
            )


def _rule_names(rule: KeyRule, config: ModelConfig) -> list[str]:
    return [rule.hf_key(i) for i in range(config.num_layers)] if rule.per_layer else [rule.hf_key()]


def _aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an `alignment`-byte boundary.

    jax adopts such a host buffer as a CPU device array without copying it (numpy's own allocations are
    not always so aligned, and each was copied: ~10 s and a second copy in memory for a 1B model)."""
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    offset = -raw.ctypes.data % alignment
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def import_params(
    weights: WeightReader,
    config: ModelConfig,
    options: RuntimeOptions = RuntimeOptions(),
    mesh: Mesh | None = None,
    rules: Mapping[str, MeshAxes] = DEFAULT_RULES,
    progress: bool = False,
    keep_source_dtype: bool = False,
) -> Params:
    """Read every parameter from `weights` into arrays sharded over `mesh` (default: one device).

    `keep_source_dtype`: each parameter in its `storage_dtype` instead of the params dtype, for a checkpoint
    (`load_params` widens it): a bf16 model's import then writes half the bytes (bench/convert.py times it).
    """
    abstract = abstract_params(config, options)
    check_weight_names_and_shapes(weights, config, abstract)
    mesh = mesh or single_device_mesh()
    shardings = params_shardings(config, mesh, options, rules)
    params: Params = {}
    bar = tqdm(total=len(expected_hf_names(config)), desc="import", unit="tensor", disable=not progress)
    with ThreadPoolExecutor(conversion_threads()) as pool:
        for rule in rules_for(config):
            target = get_path(abstract, rule.path)
            names = _rule_names(rule, config)
            dtype = storage_dtype([weights.dtype(name) for name in names], target.dtype) if keep_source_dtype else target.dtype
            host = _aligned_empty(target.shape, dtype)
            hf_shape = rule.hf_shape(target.shape[1:] if rule.per_layer else target.shape)

            def fill(index: int) -> None:  # runs to completion within this rule's iteration
                source = weights.read(names[index]).reshape(hf_shape)
                rule.layout.to_ours_into(source, host[index] if rule.per_layer else host)

            for _ in pool.map(fill, range(len(names))):
                bar.update()
            sharding = get_path(shardings, rule.path)
            set_path(params, rule.path, jax.make_array_from_callback(target.shape, sharding, lambda idx, h=host: h[idx]))
            del host
    bar.close()
    return params


def read_hf_config(model_dir: Path) -> dict:
    """The config.json of a HF directory as transformers completes it, its model type checked before
    transformers sees it (so an unknown one is named, and no remote code is looked for)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir} {'is not a folder' if model_dir.exists() else 'does not exist'}: "
                                "give a Hugging Face model directory or a .gguf file")
    path = model_dir / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir} has no config.json: not a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    check_model_type(raw)  # the rest of the config is checked once AutoConfig has filled in its defaults
    import transformers

    # AutoConfig fills defaults and normalises old keys (rope_scaling -> rope_parameters).
    try:
        config = transformers.AutoConfig.from_pretrained(model_dir, trust_remote_code=False, local_files_only=True)
    except Exception as err:  # e.g. huggingface_hub's field validation of a wrongly typed value
        reason = " ".join(str(err).split())  # its messages span lines
        raise ValueError(f"{path} is not a valid {raw['model_type']} config: {reason}") from None
    return config.to_dict()


def _copy_side_files(model_dir: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (model_dir / name).is_file():
            (dest / name).write_bytes((model_dir / name).read_bytes())


def _check_tokenizer(copied: Path, model_dir: Path) -> None:
    """The tokenizer a checkpoint carries must load (generation, evaluation and the workflows read it), so a
    broken one is named at import, not at its first use; weights without tokenizer files import as they are."""
    import transformers

    files = sorted(path.name for path in copied.iterdir() if path.name != "generation_config.json")
    if not files:
        return
    try:
        transformers.AutoTokenizer.from_pretrained(copied)
    except Exception as err:  # tokenizers' parse errors are plain Exceptions
        reason = " ".join(str(err).split())
        raise ValueError(f"the tokenizer of {model_dir} ({', '.join(files)}) does not load in transformers: {reason}") from None


def import_checkpoint(
    src: Path,
    out: Path,
    options: RuntimeOptions = RuntimeOptions(),
    mesh: Mesh | None = None,
    allow_pickle: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face directory or a .gguf file into an eu_jax params checkpoint at `out`."""
    src, out = Path(src), Path(out)
    ensure_new_output(out)
    with tempfile.TemporaryDirectory() as side_dir:
        side = Path(side_dir) / "hf_files"
        if src.suffix == ".gguf":
            from eu_jax.convert.gguf import (
                gguf_hf_config,
                open_gguf_weights,
                save_gguf_tokenizer,
            )

            # Opened first: its careful header check names a damaged file before transformers parses it.
            gguf_weights = open_gguf_weights(src)
            hf_config = gguf_hf_config(src).to_dict()
            save_gguf_tokenizer(src, side)
            opener = lambda: gguf_weights  # noqa: E731
            config_file = src
        else:
            from eu_jax.convert.safetensors_io import open_hf_weights

            hf_config = read_hf_config(src)
            _copy_side_files(src, side)
            _check_tokenizer(side, src)
            opener = lambda: open_hf_weights(src, allow_pickle=allow_pickle)  # noqa: E731
            config_file = src / "config.json"
        config = from_hf_config(hf_config, str(config_file))
        with opener() as weights:
            params = import_params(weights, config, options, mesh, progress=progress, keep_source_dtype=True)
        meta = ModelMeta(config=config, hf_config=hf_config, param_dtype=options.param_dtype)
        return save_params_checkpoint(out, params, meta, side)

