"""UniErase's new token: tokenizer, grown embedding / head, sharding padding, and export to transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from tokenizers import AddedToken

from eu_jax.convert.checkpoint import HF_FILES_DIR, load_params
from eu_jax.convert.export import export_checkpoint
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.models.state import build_decoder
from eu_jax.parallel.mesh import make_mesh
from eu_jax.unierase.vocab import VocabError, add_unlearning_token
from tests.tiny_models import COMMON, save_char_tokenizer, save_hf_model
from tests.tiny_run import QA_TEMPLATE, make_tiny_run

TOKEN = "<unlearn_0>"
VOCAB = COMMON["vocab_size"]
FAMILIES = ["smollm_tied_mqa", "qwen2"]  # tied and untied output head


def save_full_char_tokenizer(directory) -> None:
    """The character tokenizer filled with reserved special tokens up to the model's vocabulary (as Llama 3
    reserves its spare ids), so that a new token needs a new row."""
    tokenizer = save_char_tokenizer(directory)
    reserved = [AddedToken(f"<reserved_{i}>", special=True, normalized=False) for i in range(VOCAB - len(tokenizer))]
    tokenizer.add_tokens(reserved, special_tokens=True)
    tokenizer.chat_template = QA_TEMPLATE
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module", params=FAMILIES)
def source(request, tmp_path_factory):
    """(root, family, original PyTorch model, eu_jax checkpoint) with a tokenizer as large as the vocabulary."""
    root = tmp_path_factory.mktemp(request.param)
    model = save_hf_model(request.param, root / "hf")
    save_full_char_tokenizer(root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    return root, request.param, model, root / "ckpt"


@pytest.fixture(scope="module")
def grown(source):
    root, _, _, ckpt = source
    return add_unlearning_token(ckpt, root / "grown"), root / "grown"


def _logits(ckpt, ids: np.ndarray) -> np.ndarray:
    params, meta = load_params(ckpt)
    return np.asarray(build_decoder(meta.config, params)(ids).logits)


IDS = np.array([[1, 40, 77, 84, 9, 45, 68, 23, 31, 90], [1, 8, 60, 61, 62, 63, 64, 65, 66, 67]], np.int32)


def test_grown_checkpoint_keeps_the_original_logits(source, grown):
    _, _, model, _ = source
    token_id, ckpt = grown
    ours = _logits(ckpt, IDS)
    with torch.no_grad():
        reference = model(torch.from_numpy(IDS).long()).logits.numpy()
    assert token_id == VOCAB and ours.shape[-1] == VOCAB + 1
    np.testing.assert_allclose(ours[..., :VOCAB], reference, atol=1e-4)


def _mean_direction_at_mean_norm(rows: np.ndarray) -> np.ndarray:
    mean = rows.astype(np.float64).mean(axis=0)
    return mean / np.linalg.norm(mean) * np.linalg.norm(rows.astype(np.float64), axis=1).mean()


def test_new_row_is_the_mean_direction_of_the_old_rows_and_nothing_else_changes(source, grown):
    _, family, _, src = source
    token_id, ckpt = grown
    old, _ = load_params(src)
    new, meta = load_params(ckpt)
    assert meta.config.vocab_size == meta.hf_config["vocab_size"] == VOCAB + 1
    np.testing.assert_array_equal(new["embed"][:VOCAB], old["embed"])
    np.testing.assert_allclose(new["embed"][token_id], _mean_direction_at_mean_norm(old["embed"]), atol=1e-5)
    if family == "qwen2":
        np.testing.assert_array_equal(new["lm_head"][:, :VOCAB], old["lm_head"])
        np.testing.assert_allclose(new["lm_head"][:, token_id], _mean_direction_at_mean_norm(old["lm_head"].T), atol=1e-5)
    else:
        assert "lm_head" not in new
    np.testing.assert_array_equal(new["layers"]["mlp"]["down_proj"], old["layers"]["mlp"]["down_proj"])


def test_grown_tokenizer_knows_the_token_as_special(grown):
    token_id, ckpt = grown
    tokenizer = transformers.AutoTokenizer.from_pretrained(ckpt / HF_FILES_DIR)
    assert tokenizer.convert_tokens_to_ids(TOKEN) == token_id
    ids = tokenizer(f"Who?{TOKEN}No.", add_special_tokens=False)["input_ids"]
    assert token_id in ids and len(ids) == len("Who?No.") + 1
    assert TOKEN not in tokenizer.decode(ids, skip_special_tokens=True)
    assert tokenizer.chat_template == QA_TEMPLATE


def test_row_can_start_from_a_named_token(source, tmp_path):
    _, family, _, src = source
    token_id = add_unlearning_token(src, tmp_path / "grown", init="?")
    old, _ = load_params(src)
    new, _ = load_params(tmp_path / "grown")
    question_mark = 4 + ord("?") - 32  # the character tokenizer: 4 specials, then printable ASCII
    np.testing.assert_array_equal(new["embed"][token_id], old["embed"][question_mark])
    if family == "qwen2":
        np.testing.assert_array_equal(new["lm_head"][:, token_id], old["lm_head"][:, question_mark])


def test_export_reloads_in_transformers_with_the_grown_vocabulary(grown, tmp_path):
    token_id, ckpt = grown
    export_checkpoint(ckpt, tmp_path / "hf", progress=False)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.get_input_embeddings().weight.shape[0] == model.get_output_embeddings().weight.shape[0] == VOCAB + 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.convert_tokens_to_ids(TOKEN) == token_id
    ids = np.concatenate([IDS, np.full((2, 1), token_id, np.int32), IDS[:, 1:4]], axis=1)  # the new token as input
    with torch.no_grad():
        reloaded = model(torch.from_numpy(ids).long()).logits.numpy()
    np.testing.assert_allclose(reloaded, _logits(ckpt, ids), atol=1e-4)


def test_a_spare_row_is_reused_without_growing(tmp_path):
    """The plain character tokenizer has 99 tokens for 256 rows: the token takes row 99."""
    src = make_tiny_run(tmp_path)["ckpt"]
    token_id = add_unlearning_token(src, tmp_path / "grown")
    old, _ = load_params(src)
    new, meta = load_params(tmp_path / "grown")
    assert token_id == 99 and meta.config.vocab_size == VOCAB
    np.testing.assert_allclose(new["embed"][99], _mean_direction_at_mean_norm(old["embed"][:99]), atol=1e-5)
    unchanged = np.arange(VOCAB) != 99
    np.testing.assert_array_equal(new["embed"][unchanged], old["embed"][unchanged])


@pytest.mark.parametrize("source", ["qwen2"], indirect=True)  # MQA's one KV head cannot split over tensor=2
def test_padding_for_a_tensor_parallel_mesh(source, tmp_path):
    _, _, _, src = source
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    with pytest.raises(VocabError, match="257 rows cannot be split over the mesh's 2 tensor-parallel devices; pass pad_to_multiple=2"):
        add_unlearning_token(src, tmp_path / "unpadded", mesh=mesh)
    token_id = add_unlearning_token(src, tmp_path / "padded", pad_to_multiple=4, mesh=mesh)
    new, meta = load_params(tmp_path / "padded")
    assert token_id == VOCAB and meta.config.vocab_size == new["embed"].shape[0] == VOCAB + 4
    np.testing.assert_array_equal(new["embed"][VOCAB + 1 :], 0.0)
    assert np.abs(new["embed"][token_id]).sum() > 0


def test_bad_requests_fail_clearly_and_write_nothing(source, grown, tmp_path):
    _, _, _, src = source
    with pytest.raises(VocabError, match=r"token '<s>' is already in the tokenizer .* \(id 1\)"):
        add_unlearning_token(src, tmp_path / "a", token="<s>")
    with pytest.raises(VocabError, match="already in the tokenizer"):
        add_unlearning_token(grown[1], tmp_path / "b")  # the same token twice
    with pytest.raises(VocabError, match=r"init='ab' is neither 'mean' nor a single token .* encodes to 2 tokens"):
        add_unlearning_token(src, tmp_path / "c", init="ab")
    assert not any((tmp_path / name).exists() for name in "abc")
    with pytest.raises(FileExistsError, match="is a folder that is not empty"):
        add_unlearning_token(src, grown[1])
