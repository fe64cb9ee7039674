"""GGUF checkpoints (llama.cpp) read as Hugging Face-named tensors in Hugging Face layout.

The converter consumes (HF name, array) pairs; this module gives a GGUF file the same reader interface as
`safetensors_io.HFWeights`, dequantising one tensor at a time so peak memory stays near one tensor.
Quantised tensors come out as float32; F32, F16 and BF16 ones in their own dtype, which the import keeps
when the params dtype holds it exactly (as it does for safetensors).
Config and tokenizer come from transformers' own GGUF support, which is also the reference for the weights.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.gguf_reader import ReaderTensor
from gguf.quants import dequantize

from eu_jax.convert.safetensors_io import WeightFormatError, WeightReader

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# GGUF tensor stem -> Hugging Face module path; ".weight" / ".bias" carry over unchanged.
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# Per block, "blk.N.<stem>" -> "model.layers.N.<path>".
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# GGUF architecture -> whether llama.cpp permuted q/k rows for its rotary layout. As in transformers'
# TENSOR_PROCESSORS, only "llama" is permuted (llama.cpp also writes Mistral models as "llama").
_ARCHITECTURES = {"llama": True, "qwen2": False, "qwen3": False}
# Unquantised float types: read as they are stored. Every other type dequantises to float32.
_FLOAT_TYPES = {
    GGMLQuantizationType.F32: np.dtype(np.float32),
    GGMLQuantizationType.F16: np.dtype(np.float16),
    GGMLQuantizationType.BF16: np.dtype(ml_dtypes.bfloat16),
}
# Tensors llama.cpp precomputes from the config (Llama 3 rope scaling); transformers recomputes them.
_DERIVED = {"rope_freqs.weight"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


class GGUFWeights(WeightReader):
    """Read-only view over a GGUF file's tensors under Hugging Face names. Use `open_gguf_weights`."""

    def __init__(self, path: Path, reader: GGUFReader):
        self.path = path
        self._reader = reader
        architecture = _architecture(path, reader)
        self._tensors: dict[str, ReaderTensor] = {}
        self._rotary_heads: dict[str, int] = {}  # permuted q/k tensor -> heads to un-permute with
        heads = _head_counts(reader, architecture) if _ARCHITECTURES[architecture] else {}
        for tensor in reader.tensors:
            if tensor.name in _DERIVED:
                continue
            name = _hf_name(tensor.name)
            if name is None:
                raise WeightFormatError(
                    f"{path} has tensor {tensor.name!r}, which has no Hugging Face name for a "
                    f"{architecture} model"
                )
            self._tensors[name] = tensor
            stem = tensor.name.split(".")[-2]
            if stem in heads:
                self._rotary_heads[name] = heads[stem]

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dimensions fastest-varying first; numpy (and Hugging Face) the other way round.
        return tuple(int(d) for d in reversed(self._tensor(name).shape))

    def dtype(self, name: str) -> np.dtype:
        return _FLOAT_TYPES.get(self._tensor(name).tensor_type, np.dtype(np.float32))

    def file_of(self, name: str) -> Path:
        self._tensor(name)
        return self.path

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors as `read` returns them (quantised ones dequantised to float32)."""
        return sum(self.dtype(name).itemsize * int(t.n_elements) for name, t in self._tensors.items())

    def read(self, name: str) -> np.ndarray:
        """A fresh array of `dtype(name)` in Hugging Face layout; only this tensor is dequantised."""
        tensor = self._tensor(name)
        try:
            if tensor.tensor_type in _FLOAT_TYPES:  # the reader gives BF16 as raw bytes
                array = tensor.data.view(self.dtype(name)).reshape(self.shape(name))
            else:
                array = dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError:
            raise WeightFormatError(
                f"{self.path} has tensor {tensor.name!r} of GGUF type {tensor.tensor_type.name}, "
                "which the gguf package cannot dequantise"
            ) from None
        if name in self._rotary_heads:
            array = _unpermute_rows(array, self._rotary_heads[name])
        # Unquantised tensors come back as views of the read-only memory map.
        return array.copy() if np.may_share_memory(array, self._reader.data) else array

    def close(self) -> None:
        """Drop the memory map (numpy unmaps it once no array refers to it)."""
        self._tensors = {}
        self._reader = None

    def _tensor(self, name: str) -> ReaderTensor:
        tensor = self._tensors.get(name)
        if tensor is None:
            raise WeightFormatError(f"Tensor {name!r} is not in the weights of {self.path}")
        return tensor


def open_gguf_weights(path: str | Path) -> GGUFWeights:
    """Open a GGUF file, checking its architecture and tensor names up front (no tensor data is read)."""
    path = Path(path)
    return GGUFWeights(path, _open_reader(path))


def gguf_hf_config(path: str | Path) -> PretrainedConfig:
    """The Hugging Face config transformers derives from the GGUF metadata.

    transformers sets tie_word_embeddings from the absence of ``output.weight``, which is llama.cpp's own rule.
    """
    from transformers import AutoConfig

    return load_with_transformers(AutoConfig, Path(path))


def save_gguf_tokenizer(path: str | Path, out_dir: str | Path) -> None:
    """Save the tokenizer (with its chat template) and a generation_config.json derived from the GGUF, so that
    `AutoTokenizer.from_pretrained(out_dir)` works offline without the GGUF."""
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = load_with_transformers(AutoTokenizer, Path(path))
    tokenizer.save_pretrained(str(out_dir))
    # The tokenizer's special ids come from the same tokenizer.ggml.* fields the config reads.
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if special["bos_token_id"] is not None or special["eos_token_id"] is not None:
        GenerationConfig(**{k: v for k, v in special.items() if v is not None}).save_pretrained(str(out_dir))


def load_with_transformers(auto_class: type, path: Path, **kwargs):
    """`auto_class.from_pretrained` on a local GGUF file, with errors that name the file.

    transformers' own GGUF parser fails on a file cut short with struct.error; `open_gguf_weights` checks the
    file more carefully, so callers open it first where they can (the import does).
    """
    _check_magic(path)
    try:
        return auto_class.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True, **kwargs)
    except (ValueError, OSError, struct.error) as err:
        raise WeightFormatError(f"transformers cannot read {path}: {err}") from err


def _check_magic(path: Path) -> None:
    if path.is_dir():
        raise WeightFormatError(f"{path} is a folder, not a GGUF file")
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise WeightFormatError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


def _open_reader(path: Path) -> GGUFReader:
    _check_magic(path)
    try:
        return GGUFReader(path)
    except (ValueError, IndexError, KeyError) as err:
        raise WeightFormatError(f"{path} is a corrupt, truncated or unsupported GGUF file ({err})") from err


def _architecture(path: Path, reader: GGUFReader) -> str:
    field = reader.get_field("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture not in _ARCHITECTURES:
        raise WeightFormatError(
            f"{path} has GGUF architecture {architecture!r}, which eu_jax does not support "
            f"(supported: {', '.join(_ARCHITECTURES)})"
        )
    return architecture


def _head_counts(reader: GGUFReader, architecture: str) -> dict[str, int]:
    """Heads each permuted tensor stem was permuted with: q with the query heads, k with the key/value heads.

    A file without head_count_kv has as many kv heads as query heads, as in llama.cpp (transformers instead
    skips the un-permutation then, which would load such a file wrongly).
    """
    heads = reader.get_field(f"{architecture}.attention.head_count").contents()
    kv_field = reader.get_field(f"{architecture}.attention.head_count_kv")
    return {"attn_q": heads, "attn_k": kv_field.contents() if kv_field is not None else heads}


def _hf_name(gguf_name: str) -> str | None:
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_NAMES and suffix in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    match = _BLOCK.fullmatch(gguf_name)
    if match and match[2] in _BLOCK_NAMES:
        return f"model.layers.{match[1]}.{_BLOCK_NAMES[match[2]]}.{match[3]}"
    return None


def _unpermute_rows(array: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order for its rotary layout, exactly as transformers' LlamaTensorProcessor.

    llama.cpp stores each head's rows as (dim, 2) pairs interleaved; Hugging Face keeps the two rotary halves
    contiguous, (2, dim). Weights and biases alike: rows are the first axis.
    """
    dim = array.shape[0] // n_heads // 2
    return array.reshape(n_heads, dim, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
