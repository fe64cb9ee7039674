"""Tiny random Hugging Face models of every supported family, built with transformers' own classes."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, max_position_embeddings=512)

FAMILIES = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2),
    "llama3_rope": lambda: transformers.LlamaConfig(
        **COMMON,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "llama_biases": lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True
    ),
    # A window shorter than the test sequences, so the sliding-window mask really matters.
    "mistral": lambda: transformers.MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=24),
    "smollm_tied_mqa": lambda: transformers.LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, rope_theta=100000.0
    ),
}


def build_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A random model whose every weight (biases and norm scales too) is far from its init value,
    so a mapping mistake anywhere shows in the logits. `overrides` change config fields (e.g. num_hidden_layers)."""
    torch.manual_seed(seed)
    config = FAMILIES[family]()
    for name, value in overrides.items():
        setattr(config, name, value)
    config.pad_token_id, config.bos_token_id, config.eos_token_id = 0, 1, 2
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)
    return model


def save_hf_model(family: str, directory: Path, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    model = build_hf_model(family, seed, **overrides)
    model.save_pretrained(directory)
    return model


CHAR_SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]


def save_char_tokenizer(directory: Path, chat_template: str | None = None) -> transformers.PreTrainedTokenizerFast:
    """A character-level tokenizer (ids 0-3 special, then printable ASCII), saved like a real one, with
    `chat_template` if given."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors

    vocab = {token: i for i, token in enumerate(CHAR_SPECIALS + [chr(c) for c in range(32, 127)])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    wrapped.chat_template = chat_template
    wrapped.save_pretrained(directory)
    return wrapped
