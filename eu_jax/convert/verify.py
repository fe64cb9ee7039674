"""Compare an eu_jax checkpoint with transformers' PyTorch model on the same prompts.

This is the check to run after any conversion: max |logit difference| and the mean per-token
KL(reference || eu_jax) over real (non-padding) tokens, plus top-1 agreement.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from eu_jax.convert.checkpoint import HF_FILES_DIR, load_model_meta, load_params, locate_params
from eu_jax.convert.hf_import import read_hf_config
from eu_jax.convert.safetensors_io import WeightFormatError, open_hf_weights
from eu_jax.generate import left_pad
from eu_jax.models.state import build_decoder, params_shardings
from eu_jax.parallel.mesh import single_device_mesh

DEFAULT_PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):",
    "Solve for x: 3x + 7 = 22. First,",
    "Once upon a time, in a quiet village by the sea,",
)


@dataclass(frozen=True)
class VerifyReport:
    max_abs_logit_diff: float
    mean_kl: float
    top1_agreement: float
    num_tokens: int

    def passes(self, atol: float, max_kl: float) -> bool:
        return self.max_abs_logit_diff <= atol and self.mean_kl <= max_kl

    def __str__(self) -> str:
        return (
            f"tokens compared: {self.num_tokens}\n"
            f"max |logit diff|: {self.max_abs_logit_diff:.3e}\n"
            f"mean KL per token (reference || eu_jax): {self.mean_kl:.3e}\n"
            f"top-1 agreement: {self.top1_agreement:.2%}"
        )


def check_source(source: Path, allow_pickle: bool = False) -> None:
    """Stop on a missing or damaged source, or pickled weights without the opt-in, before minutes of model work,
    with the same checks and messages as `eu-convert import`."""
    source = Path(source)
    if source.suffix == ".gguf":
        from eu_jax.convert.gguf import open_gguf_weights

        open_gguf_weights(source).close()
        return
    read_hf_config(source)
    if not allow_pickle:  # refuses pickles; with the opt-in transformers reads them, and they are read once
        open_hf_weights(source).close()


def load_reference_model(source: Path, allow_pickle: bool = False):
    """transformers' PyTorch model for a local HF directory or GGUF file, in fp32, no remote code, and pickled
    weights only with `allow_pickle`."""
    import torch
    import transformers

    source = Path(source)
    kwargs = dict(dtype=torch.float32, trust_remote_code=False)
    if source.suffix == ".gguf":
        from eu_jax.convert.gguf import load_with_transformers

        return load_with_transformers(transformers.AutoModelForCausalLM, source, **kwargs).eval()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, use_safetensors=None if allow_pickle else True, **kwargs
        )
    except OSError as err:
        raise WeightFormatError(f"transformers cannot load {source}: {err}") from err
    return model.eval()


def log_softmax64(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: np.ndarray, ours: np.ndarray, mask: np.ndarray) -> VerifyReport:
    """Statistics over positions where mask is true; logits are [batch, seq, vocab]."""
    keep = mask.astype(bool)
    ref, got = reference[keep], ours[keep]
    ref_logp, got_logp = log_softmax64(ref), log_softmax64(got)
    kl = (np.exp(ref_logp) * (ref_logp - got_logp)).sum(-1)
    return VerifyReport(
        max_abs_logit_diff=float(np.abs(ref.astype(np.float64) - got).max()),
        mean_kl=float(kl.mean()),
        top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).mean()),
        num_tokens=int(keep.sum()),
    )


def prompt_token_ids(ckpt: Path, prompts: Sequence[str], vocab_size: int) -> list[list[int]]:
    """Prompts tokenized with the checkpoint's tokenizer, or fixed random ids when it has none."""
    _, _, meta_dir = locate_params(ckpt)
    tokenizer_dir = meta_dir / HF_FILES_DIR
    if (tokenizer_dir / "tokenizer_config.json").exists() or (tokenizer_dir / "tokenizer.json").exists():
        import transformers

        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
        return [tokenizer(p)["input_ids"] for p in prompts]
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab_size, size=8 + 3 * i).tolist() for i in range(len(prompts))]


def verify_checkpoint(
    source: Path, ckpt: Path, prompts: Sequence[str] = DEFAULT_PROMPTS, allow_pickle: bool = False
) -> VerifyReport:
    """Run the prompts through both models (one left-padded batch) and compare the logits."""
    import torch

    check_source(source, allow_pickle)
    mesh = single_device_mesh()
    meta = load_model_meta(ckpt)
    params, _ = load_params(ckpt, params_shardings(meta.config, mesh))
    ids, mask = left_pad(prompt_token_ids(ckpt, prompts, meta.config.vocab_size))
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    ours = np.asarray(build_decoder(meta.config, params)(jnp.asarray(ids), jnp.asarray(mask)).logits)
    reference_model = load_reference_model(source, allow_pickle)
    with torch.no_grad():
        reference = reference_model(
            input_ids=torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask),
            position_ids=torch.as_tensor(positions, dtype=torch.long),
        ).logits.float().numpy()
    return compare_logits(reference, ours, mask)
