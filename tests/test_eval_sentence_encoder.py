"""The JAX sentence encoder vs transformers' PyTorch BertModel with sentence-transformers' mean pooling,
on tiny random BERTs and on the real all-MiniLM-L6-v2 from its PyPI wheel."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from eu_jax.convert.safetensors_io import WeightFormatError
from eu_jax.eval.sentence_encoder import EncoderFolderError, SentenceEncoder, fetch_minilm

TINY_MAX_SEQ_LENGTH = 20  # not a power of two, so the longest bucket is capped by truncation
TINY_TEXTS = [
    "the cat sat on the mat.",
    "dog",
    "a dog and a cat, on a mat!",
    " ".join(["the cat sat on the mat"] * 6),  # longer than TINY_MAX_SEQ_LENGTH: truncated
    "quick brown fox",
]
MODULES = {
    "Transformer": "sentence_transformers.models.Transformer",
    "Pooling": "sentence_transformers.models.Pooling",
    "Normalize": "sentence_transformers.models.Normalize",
}


def reference_embeddings(model, tokenizer, texts, max_length, normalize):
    """sentence-transformers' computation in torch: last hidden state, masked mean, optional L2 normalise."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


def write_tiny_folder(root: Path, layout: str):
    """A sentence-transformers folder around a random tiny BERT, every weight moved off its init value.

    "bare": a BertModel at the top level, with Normalize. "bert_prefix": a BertForMaskedLM (tensor names
    start with "bert.") in a 0_Transformer subfolder, as older sentence-transformers saved it, without Normalize.
    """
    torch.manual_seed(0)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "dog", "and"]
    words += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase] + list(".,!?")
    config = transformers.BertConfig(
        vocab_size=len(words) + 3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        layer_norm_eps=1e-3,  # far from the 1e-12 default, so a wrong eps shows
    )
    if layout == "bare":
        model, encoder, transformer_path = transformers.BertModel(config), None, ""
    else:
        model = transformers.BertForMaskedLM(config)
        encoder, transformer_path = model.bert, "0_Transformer"
    model.eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.2 * torch.randn_like(param))
    transformer_dir = root / transformer_path
    model.save_pretrained(transformer_dir)
    tokenizer = transformers.BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    tokenizer.save_pretrained(transformer_dir)
    (transformer_dir / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TINY_MAX_SEQ_LENGTH}))
    pooling = {
        "word_embedding_dimension": 32,
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (root / "1_Pooling").mkdir()
    (root / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    kinds = ["Transformer", "Pooling"] + (["Normalize"] if layout == "bare" else [])
    paths = [transformer_path, "1_Pooling", "2_Normalize"]
    modules = [{"idx": i, "name": str(i), "path": paths[i], "type": MODULES[k]} for i, k in enumerate(kinds)]
    (root / "modules.json").write_text(json.dumps(modules))
    return (encoder or model), tokenizer


LAYOUTS = ["bare", "bert_prefix"]


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """layout -> (folder, torch reference encoder, tokenizer)."""
    folders = {}
    for layout in LAYOUTS:
        root = tmp_path_factory.mktemp(layout)
        folders[layout] = (root, *write_tiny_folder(root, layout))
    return folders


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_bert_matches_torch_mean_pooling(tiny_folders, layout):
    root, reference, tokenizer = tiny_folders[layout]
    if layout == "bert_prefix":  # the key layout this case exists for
        with safe_open(root / "0_Transformer" / "model.safetensors", "np") as weights:
            assert "bert.embeddings.word_embeddings.weight" in weights.keys()
    encoder = SentenceEncoder.from_folder(root)
    normalize = layout == "bare"
    expected = reference_embeddings(reference, tokenizer, TINY_TEXTS, TINY_MAX_SEQ_LENGTH, normalize).numpy()
    got = encoder.encode(TINY_TEXTS, batch_size=2)  # batches of 2, 2 and 1 in three length buckets
    assert got.dtype == np.float32 and got.shape == (len(TINY_TEXTS), 32)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert encoder.encode([]).shape == (0, 32)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_similarity_is_torch_cosine(tiny_folders, layout):
    root, reference, tokenizer = tiny_folders[layout]
    encoder = SentenceEncoder.from_folder(root)
    expected = reference_embeddings(reference, tokenizer, TINY_TEXTS, TINY_MAX_SEQ_LENGTH, normalize=False)
    a, b = TINY_TEXTS[:2], TINY_TEXTS[2:3] + TINY_TEXTS[4:]  # the lengths of the encode test's first batches
    cosine = torch.nn.functional.cosine_similarity(expected[:2], expected[[2, 4]]).numpy()
    np.testing.assert_allclose(encoder.similarity(a, b, batch_size=2), cosine, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="2 a_texts and 1 b_texts"):
        encoder.similarity(a, b[:1])
    with pytest.raises(TypeError, match=r"texts\[1\] is a NoneType"):
        encoder.encode(["fine", None])


def _set_json(path: Path, **changes) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _add_dense_module(root: Path) -> None:
    modules = json.loads((root / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (root / "modules.json").write_text(json.dumps(modules))


BAD_FOLDERS = {
    "relu": (
        lambda root: _set_json(root / "config.json", hidden_act="relu"),
        EncoderFolderError,
        r"config\.json sets hidden_act to 'relu'",
    ),
    "cls_pooling": (
        lambda root: _set_json(
            root / "1_Pooling" / "config.json", pooling_mode_cls_token=True, pooling_mode_mean_tokens=False
        ),
        EncoderFolderError,
        r"1_Pooling/config\.json turns on pooling modes \['pooling_mode_cls_token'\]",
    ),
    "dense_module": (
        _add_dense_module,
        EncoderFolderError,
        r"modules\.json lists modules \['Transformer', 'Pooling', 'Normalize', 'Dense'\]",
    ),
    "wrong_shape": (
        lambda root: _set_json(root / "config.json", intermediate_size=48),
        WeightFormatError,
        r"model\.safetensors has tensor 'encoder\.layer\.0\.intermediate\.dense\.weight' of shape \[64, 32\]",
    ),
}


@pytest.mark.parametrize("case", BAD_FOLDERS)
def test_bad_folder_is_refused_naming_the_file(case, tiny_folders, tmp_path):
    mutate, error, message = BAD_FOLDERS[case]
    folder = shutil.copytree(tiny_folders["bare"][0], tmp_path / "folder")
    mutate(folder)
    with pytest.raises(error, match=message):
        SentenceEncoder.from_folder(folder)


# ----------------------------------------------------------------------------------------------- real MiniLM

MINILM_TEXTS = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Unlearning removes knowledge from a trained language model. " * 30,  # over 256 tokens: truncated
]


@pytest.fixture(scope="module")
def minilm():
    folder = fetch_minilm()
    return folder, SentenceEncoder.from_folder(folder)


def test_minilm_matches_torch(minilm):
    folder, encoder = minilm
    max_length = json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"]
    assert max_length == 256  # below the tokenizer's 512, so the long text really tests the truncation length
    reference = transformers.BertModel.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    expected = reference_embeddings(reference, tokenizer, MINILM_TEXTS, max_length, normalize=True).numpy()
    got = encoder.encode(MINILM_TEXTS)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_minilm_paraphrase_is_closer_than_unrelated(minilm):
    _, encoder = minilm
    scores = encoder.similarity(MINILM_TEXTS[:1] * 2, MINILM_TEXTS[1:3])
    paraphrase, unrelated = scores
    assert paraphrase > 0.6 and unrelated < 0.2
