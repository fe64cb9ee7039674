"""Retain/forget data: loading (`sources`), chat templates and masks (`chat`), length policy, packing and the
cached loader (`pipeline`, `cache`), deterministic global batches and data shards (`batches`).

Typical use: `load_set(DataSpec(path), tokenizer, LengthPolicy(max_length)).arrays()`.
"""

from eu_jax.data.cache import TokenCache
from eu_jax.data.chat import Encoder, use_chat_template
from eu_jax.data.pipeline import DataReport, LengthPolicy, LoadedSet, TokenizedSet, load_set, pack_examples, tokenize_records
from eu_jax.data.sources import DataError, DataSpec, Record, content_fingerprint, load_records, resolve, with_response

__all__ = [
    "DataError",
    "DataReport",
    "DataSpec",
    "Encoder",
    "LengthPolicy",
    "LoadedSet",
    "Record",
    "TokenCache",
    "TokenizedSet",
    "content_fingerprint",
    "load_records",
    "load_set",
    "pack_examples",
    "resolve",
    "tokenize_records",
    "use_chat_template",
    "with_response",
]
