"""eu_jax against transformers' PyTorch models, for every supported family."""

from __future__ import annotations

import dataclasses
import functools
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from eu_jax.convert.checkpoint import load_params
from eu_jax.convert.export import export_checkpoint, hf_tensors
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.generate import greedy_generate
from eu_jax.models.config import REMAT_POLICIES, RuntimeOptions
from eu_jax.models import llama
from eu_jax.models.llama import KVCache
from eu_jax.models.state import build_decoder
from eu_jax.tree_paths import get_path
from tests.tiny_models import FAMILIES, save_hf_model

# A left-padded and a right-padded row next to a full one.
INPUT_IDS = np.random.default_rng(0).integers(3, 256, size=(3, 12))
ATTENTION_MASK = np.ones((3, 12), np.int64)
ATTENTION_MASK[1, :4] = 0
ATTENTION_MASK[2, 9:] = 0


def hf_forward(model, **kwargs):
    with torch.no_grad():
        return model(
            input_ids=torch.as_tensor(BATCH.input_ids),
            attention_mask=torch.as_tensor(BATCH.attention_mask),
            position_ids=torch.as_tensor(BATCH.positions),
            **kwargs,
        )


def imported_family(name, tmp_path_factory):
    root = tmp_path_factory.mktemp(name)
    model = save_hf_model(name, root / "hf")
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    params, meta = load_params(root / "ckpt")
    return SimpleNamespace(name=name, root=root, hf=model, params=params, config=meta.config)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory):
    return imported_family(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """The family with the most features (q/k norms, odd head_dim): for family-independent options."""
    return imported_family("qwen3", tmp_path_factory)


def eu_logits(family, options=RuntimeOptions(), **kwargs):
    decoder = build_decoder(family.config, family.params, options)
    out = decoder(jnp.asarray(INPUT_IDS), jnp.asarray(ATTENTION_MASK), **kwargs)
    return out


def test_logits_match_transformers_on_padded_batch(family):
    reference = hf_forward(family.hf).logits.numpy()
    ours = np.asarray(eu_logits(family).logits)
    valid = ATTENTION_MASK.astype(bool)
    assert np.abs(reference - ours)[valid].max() < 1e-4


@pytest.mark.parametrize(
    "options",
    [RuntimeOptions(scan_layers=False), RuntimeOptions(remat="full"), RuntimeOptions(scan_layers=False, remat="dots")],
    ids=["loop", "scan_remat_full", "loop_remat_dots"],
)
def test_layer_iteration_and_remat_give_the_same_logits(qwen3, options):
    reference = np.asarray(eu_logits(qwen3).logits)
    np.testing.assert_allclose(np.asarray(eu_logits(qwen3, options).logits), reference, atol=1e-5)


@dataclasses.dataclass(frozen=True)
class TokenBatch:
    """Rows of token ids with their padding, positions, next-token targets and the weights of the positions
    whose target is a real token."""

    input_ids: np.ndarray
    attention_mask: np.ndarray

    @property
    def positions(self) -> np.ndarray:
        return np.clip(np.cumsum(self.attention_mask, axis=1) - 1, 0, None)

    @property
    def targets(self) -> np.ndarray:
        return np.roll(self.input_ids, -1, axis=1)

    @property
    def target_weights(self) -> np.ndarray:
        weights = (self.attention_mask * np.roll(self.attention_mask, -1, axis=1)).astype(np.float32)
        weights[:, -1] = 0
        return weights


BATCH = TokenBatch(INPUT_IDS, ATTENTION_MASK)


def torch_next_token_loss(model, batch=BATCH):
    """transformers' logits, summed next-token NLL and every parameter's gradient (by HF name)."""
    model.zero_grad(set_to_none=True)
    logits = model(
        input_ids=torch.as_tensor(batch.input_ids),
        attention_mask=torch.as_tensor(batch.attention_mask),
        position_ids=torch.as_tensor(batch.positions),
    ).logits
    picked = torch.log_softmax(logits, -1).gather(-1, torch.as_tensor(batch.targets)[..., None])[..., 0]
    loss = -(picked * torch.as_tensor(batch.target_weights)).sum()
    loss.backward()
    grads = {name: p.grad.numpy().copy() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return logits.detach().numpy(), float(loss.detach()), grads


def eu_next_token_loss(family, options, batch=BATCH):
    """The same loss through eu_jax: (value, logits) and the params' gradients."""

    def loss(params):
        decoder = build_decoder(family.config, params, options)
        z = decoder(jnp.asarray(batch.input_ids), jnp.asarray(batch.attention_mask)).logits
        log_p = jnp.take_along_axis(jax.nn.log_softmax(z, -1), jnp.asarray(batch.targets)[..., None], axis=-1)[..., 0]
        return -(log_p * batch.target_weights).sum(), z

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(family.params)


def assert_every_gradient_matches(family, grads, torch_grads):
    """Every parameter's gradient, mapped to its Hugging Face tensor by the export's key map, against autograd's."""
    ours = {t.name: t.load() for t in hf_tensors(lambda path: np.asarray(get_path(grads, path)), family.config, grads, np.float32)}
    assert set(ours) == set(torch_grads)
    for name, expected in torch_grads.items():
        scale = max(np.abs(expected).max(), 1e-3)
        np.testing.assert_allclose(ours[name] / scale, expected / scale, atol=1e-4, err_msg=name)


def test_block_causal_attention_matches_transformers(family):
    """Queries 5 at a time (blocks of 5, 5 and 2) against keys up to each block's end: logits and the
    gradient of a next-token loss reaching the embedding, both against transformers' full attention."""
    valid = ATTENTION_MASK.astype(bool)
    logits, torch_loss, torch_grads = torch_next_token_loss(family.hf)
    (value, ours), grads = eu_next_token_loss(family, RuntimeOptions(attention_block=5))
    assert np.abs(logits - np.asarray(ours))[valid].max() < 1e-4
    np.testing.assert_allclose(float(value), torch_loss, rtol=1e-5)
    embed_name = next(name for name in torch_grads if name.endswith("embed_tokens.weight"))
    np.testing.assert_allclose(np.asarray(grads["embed"]), torch_grads[embed_name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("remat", REMAT_POLICIES)
def test_every_gradient_matches_transformers_under_each_remat_policy(qwen3, remat):
    """Rematerialisation changes what the backward pass keeps, never its result: every parameter's gradient,
    mapped to its Hugging Face tensor by the export's key map, against transformers' autograd."""
    _, torch_loss, torch_grads = torch_next_token_loss(qwen3.hf)
    (value, _), grads = eu_next_token_loss(qwen3, RuntimeOptions(remat=remat, attention_block=5))
    np.testing.assert_allclose(float(value), torch_loss, rtol=1e-5)
    assert_every_gradient_matches(qwen3, grads, torch_grads)


def test_each_remat_policy_keeps_less_for_the_backward_pass(qwen3):
    """XLA's account of the compiled gradient: "dots" keeps the matmul outputs only, "full" only each layer's
    input, "none" every intermediate (so the option reaches the layer scan)."""
    ids = jnp.asarray(np.random.default_rng(1).integers(3, 256, size=(4, 64)))

    def temporaries(remat):
        def loss(params):
            return jnp.mean(build_decoder(qwen3.config, params, RuntimeOptions(remat=remat))(ids).logits ** 2)

        return jax.jit(jax.grad(loss)).lower(qwen3.params).compile().memory_analysis().temp_size_in_bytes

    kept = {remat: temporaries(remat) for remat in REMAT_POLICIES}
    assert kept["full"] < kept["dots"] < kept["none"], kept


def test_hidden_states_match_transformers(qwen3):
    reference = hf_forward(qwen3.hf, output_hidden_states=True).hidden_states
    layers = tuple(range(len(reference)))  # the last, after every layer, is taken after the final norm
    ours = eu_logits(qwen3, hidden_layers=layers).hidden_states
    valid = ATTENTION_MASK.astype(bool)
    for slot, layer in enumerate(layers):
        assert np.abs(reference[layer].numpy() - np.asarray(ours[slot]))[valid].max() < 1e-4


def test_export_reloads_bit_identical(family, tmp_path):
    export_checkpoint(family.root / "ckpt", tmp_path / "hf", progress=False)
    reloaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original = family.hf.state_dict()
    assert set(reloaded.state_dict()) == set(original)
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    valid = ATTENTION_MASK.astype(bool)
    diff = hf_forward(reloaded.eval()).logits.numpy() - np.asarray(eu_logits(family).logits)
    assert np.abs(diff)[valid].max() < 1e-5


def test_greedy_decoding_matches_transformers_generate(family):
    prompts = [INPUT_IDS[0, :7].tolist(), INPUT_IDS[1, :3].tolist()]
    decoder = build_decoder(family.config, family.params)
    ours = greedy_generate(decoder, prompts, max_new_tokens=20, eos_token_ids=[2], pad_id=0)
    ids = torch.zeros((2, 7), dtype=torch.long)
    mask = torch.zeros((2, 7), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, 7 - len(prompt) :] = torch.as_tensor(prompt)
        mask[row, 7 - len(prompt) :] = 1
    with torch.no_grad():
        generated = family.hf.generate(
            ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=2, pad_token_id=0
        )[:, 7:].tolist()
    for row, tokens in enumerate(ours):
        assert tokens == generated[row][: len(tokens)]
        assert len(tokens) == 20 or tokens[-1] == 2


@pytest.mark.parametrize("spare_slots", [0, 20], ids=["full_cache", "cache_read_in_prefixes"])
@pytest.mark.parametrize(
    "prefill", ["call", "prefill_scanned", "prefill_unrolled"], ids=["prompt_through_cache", "prefill", "prefill_unrolled"]
)
def test_one_token_cached_steps_match_transformers_logits(family, spare_slots, prefill, monkeypatch):
    """Prefill left-padded prompts, then feed the rest of the rows one token per step through the KV cache
    (the decoding path: one query per row); every step's logits against transformers' forward of the whole
    padded sequence. Sequences of 12 run past Mistral's window of 5. The prompts go in through `__call__`
    with the cache, or through `Decoder.prefill` (the sampler's way: a forward without a cache, its layers
    scanned or unrolled, whose keys and values then fill a new cache).

    With spare slots the cache is read in prefixes of 4 slots (`cache_prefixes`), so the steps cross prefix
    boundaries; the spare slots hold NaN values (put there before the prompts' call, or after `prefill`), which
    any read of a slot past the prefix in use would carry into the logits (a masked slot's zero probability
    times NaN is NaN)."""
    monkeypatch.setattr(llama, "cache_prefixes", functools.partial(llama.cache_prefixes, multiple=1, min_slots=1))
    ids, mask, prompt = INPUT_IDS[:2], ATTENTION_MASK[:2], 5  # row 1 holds 4 padding tokens on the left
    decoder = build_decoder(family.config, family.params, RuntimeOptions(scan_layers=prefill != "prefill_unrolled"))
    seq = ids.shape[1]

    def spoil_spare_slots(cache: KVCache) -> KVCache:
        return cache.replace(v=tuple(v.at[:, :, seq:].set(jnp.nan) for v in cache.v))

    # Jitted, as the sampler runs them (op by op, the steps compiled thousands of small programs per test).
    through_cache = jax.jit(lambda ids, mask, cache: decoder(ids, mask, cache=cache))
    prompts = jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt])
    if prefill == "call":
        out = through_cache(*prompts, spoil_spare_slots(KVCache.init(family.config, 2, seq + spare_slots)))
    else:
        out = jax.jit(decoder.prefill, static_argnums=2)(*prompts, seq + spare_slots)
        out = out.replace(cache=spoil_spare_slots(out.cache))
    steps = [out.logits[:, -1]]
    for t in range(prompt, seq):
        out = through_cache(jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), out.cache)
        steps.append(out.logits[:, 0])
    with torch.no_grad():
        theirs = family.hf(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.numpy()
    ours = np.stack([np.asarray(s) for s in steps], axis=1)  # logits at positions prompt-1 .. 11
    np.testing.assert_allclose(ours, theirs[:, prompt - 1 :], atol=1e-4)


def test_prefill_refuses_a_cache_shorter_than_its_prompts(family):
    decoder = build_decoder(family.config, family.params)
    with pytest.raises(ValueError, match="cache of 4 slots cannot hold prompts of 5 tokens"):
        decoder.prefill(jnp.asarray(INPUT_IDS[:, :5]), jnp.asarray(ATTENTION_MASK[:, :5]), 4)


def test_a_call_with_a_cache_refuses_tokens_past_its_last_slot(family):
    decoder = build_decoder(family.config, family.params)
    ids, mask = jnp.asarray(INPUT_IDS[:2]), jnp.asarray(ATTENTION_MASK[:2])
    cache = decoder(ids[:, :6], mask[:, :6], cache=KVCache.init(family.config, 2, 8)).cache
    with pytest.raises(ValueError, match="KV cache of 8 slots, 6 of them in use, cannot take 4 more tokens"):
        decoder(ids[:, 6:10], mask[:, 6:10], cache=cache)
    with pytest.raises(ValueError, match="KV cache of 8 slots, 0 of them in use, cannot take 9 more tokens"):
        jax.jit(lambda ids, mask, cache: decoder(ids, mask, cache=cache))(ids[:, :9], mask[:, :9], KVCache.init(family.config, 2, 8))


@pytest.mark.parametrize(
    "slots, prefixes",
    [(12, (12,)), (255, (255,)), (256, tuple(range(32, 257, 32))), (552, (80, 160, 240, 320, 400, 480, 552)),
     (4096, tuple(range(512, 4097, 512)))],
)
def test_cache_prefixes_cover_long_caches_in_at_most_eight_aligned_steps(slots, prefixes):
    assert llama.cache_prefixes(slots) == prefixes


@pytest.mark.parametrize("attention_block", [256, 4], ids=["one_block", "blocks_of_4"])
def test_packed_rows_equal_separate_rows(qwen3, attention_block):
    """Two examples packed into one row with segment ids give the logits of each alone (vs transformers)."""
    first, second = INPUT_IDS[0, :5], INPUT_IDS[1, :7]
    packed = np.concatenate([first, second])[None]
    segments = np.array([[1] * 5 + [2] * 7])
    decoder = build_decoder(qwen3.config, qwen3.params, RuntimeOptions(attention_block=attention_block))
    got = np.asarray(decoder(jnp.asarray(packed), segment_ids=jnp.asarray(segments)).logits)[0]
    with torch.no_grad():
        alone = [qwen3.hf(input_ids=torch.as_tensor(x[None])).logits[0].numpy() for x in (first, second)]
    np.testing.assert_allclose(got, np.concatenate(alone), atol=1e-4)
