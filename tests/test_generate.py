"""The sampler against independent references: transformers' generate, NumPy sampling distributions,
greedy continuations with known cut points, one device vs eight, and the `eu-generate` command line."""

from __future__ import annotations

import functools
import io
import shutil
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
import torch
from scipy import stats

import eu_jax.generate_cli as cli
from eu_jax.convert.checkpoint import HF_FILES_DIR, load_params
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.generate import SamplingConfig, bucket_length, filter_logits, generate, shared_prefix_length
from eu_jax.models import llama
from eu_jax.models.state import build_decoder, params_shardings
from eu_jax.parallel.mesh import make_mesh
from tests.tiny_models import save_char_tokenizer, save_hf_model

PROMPTS = [[5, 17, 33, 80, 120, 9], [40, 41], [200, 3, 77, 150]]
# Short, so a two-turn chat still fits the smallest prompt bucket (one compilation for the CLI tests).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'][0] }}:{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}a:{% endif %}"
)
NEW_TOKENS = 16  # one value everywhere: each distinct max_new_tokens is a compilation
SAMPLES = 2048  # rows of one prompt, one new token each: the empirical next-token distribution


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama with a char tokenizer and chat template, imported into an eu_jax checkpoint."""
    root = tmp_path_factory.mktemp("generate")
    hf = save_hf_model("llama", root / "hf")
    tokenizer = save_char_tokenizer(root / "hf", CHAT_TEMPLATE)
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    params, meta = load_params(root / "ckpt")
    return SimpleNamespace(
        root=root, ckpt=root / "ckpt", hf=hf, tokenizer=tokenizer, config=meta.config,
        decoder=build_decoder(meta.config, params),
    )


def greedy(model, prompts, max_new_tokens=NEW_TOKENS, **kwargs):
    return generate(model, prompts, SamplingConfig(max_new_tokens=max_new_tokens), **kwargs)


@pytest.fixture(params=["whole_cache", "cache_in_prefixes"])
def cache_reads(request, monkeypatch):
    """Decoding steps read the whole cache (these tests' caches are short), or one of 16 prefixes of it (3
    slots apart here), as long caches are read (`llama.cache_prefixes`); the sampler is traced again."""
    if request.param == "cache_in_prefixes":
        monkeypatch.setattr(llama, "cache_prefixes", functools.partial(llama.cache_prefixes, most=16, multiple=1, min_slots=1))
    jax.clear_caches()
    yield request.param
    jax.clear_caches()


# ----------------------------------------------------------------------------------------- greedy


@pytest.mark.parametrize("backend", ["cpu", "tpu"])
def test_greedy_matches_transformers_generate_on_left_padded_batch(tiny, backend, cache_reads, monkeypatch):
    """On CPU the layers' weights are sliced once before the decoding loop; elsewhere inside each step."""
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    jax.clear_caches()  # trace the sampler again under this backend's choice
    assert_greedy_matches(greedy(tiny.decoder, PROMPTS, eos_token_ids=[2]).completions, transformers_greedy(tiny, PROMPTS))


def transformers_greedy(tiny, prompts, max_new_tokens=NEW_TOKENS):
    """transformers' greedy continuations of the prompts, left-padded into one batch."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = torch.as_tensor(prompt), 1
    with torch.no_grad():
        out = tiny.hf.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)
    return out[:, width:].tolist()


def assert_greedy_matches(completions, expected):
    for row, completion in enumerate(completions):
        assert completion.tokens == expected[row][: len(completion.tokens)]
        if completion.finish_reason == "eos":
            assert completion.tokens[-1] == 2 and completion.content == completion.tokens[:-1]
        else:
            assert completion.finish_reason == "length" and len(completion.tokens) == NEW_TOKENS


# A template-like beginning of 70 tokens (no EOS, no padding id) and requests of different lengths after it.
TEMPLATE = [int(t) for t in np.random.default_rng(7).integers(3, 256, 70)]
TEMPLATED_PROMPTS = [TEMPLATE + [60], TEMPLATE + [61, 62, 63, 64, 65], TEMPLATE + list(range(100, 112))]


def test_shared_beginnings_are_cut_to_a_step_and_short_of_the_last_token():
    assert shared_prefix_length(TEMPLATED_PROMPTS) == 64
    assert shared_prefix_length([TEMPLATE[:65], TEMPLATE[:65]]) == 64  # identical prompts keep their last token
    assert shared_prefix_length([TEMPLATE[:64], TEMPLATE[:64]]) == 0  # 63 shareable tokens: 32 once cut, under 64
    assert shared_prefix_length([TEMPLATE + [1], [9] + TEMPLATE]) == 0
    assert shared_prefix_length(TEMPLATED_PROMPTS[:1]) == 0


def test_prompts_sharing_a_beginning_match_transformers_generate(tiny, cache_reads):
    assert_greedy_matches(greedy(tiny.decoder, TEMPLATED_PROMPTS, eos_token_ids=[2]).completions,
                          transformers_greedy(tiny, TEMPLATED_PROMPTS))


def test_prompt_lengths_are_bucketed():
    assert [bucket_length(n) for n in (1, 32, 33, 64, 65, 100, 300)] == [32, 32, 40, 64, 80, 112, 320]


@pytest.mark.parametrize("seed", [-1, 2**32, 2**40])
def test_seeds_outside_uint32_are_refused_by_name(seed):
    with pytest.raises(ValueError, match=rf"^seed={seed} must be in \[0, 2\*\*32 - 1\]$"):
        SamplingConfig(NEW_TOKENS, temperature=1.0, seed=seed)
    assert SamplingConfig(NEW_TOKENS, temperature=1.0, seed=2**32 - 1).seed == 2**32 - 1


@pytest.mark.parametrize("temperature", [-0.5, float("nan"), float("inf")])
def test_temperatures_that_are_not_finite_and_non_negative_are_refused(temperature):
    with pytest.raises(ValueError, match=rf"^temperature={temperature} must be a finite number >= 0 \(0 is greedy\)$"):
        SamplingConfig(NEW_TOKENS, temperature=temperature)


# ----------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingConfig(NEW_TOKENS, temperature=1.0, top_k=1, seed=4),
        SamplingConfig(NEW_TOKENS, temperature=1.0, top_p=1e-6, seed=4),
    ],
    ids=["top_k_1", "top_p_tiny"],
)
def test_filters_that_keep_one_token_equal_greedy(tiny, sampling):
    assert generate(tiny.decoder, PROMPTS, sampling).tokens == greedy(tiny.decoder, PROMPTS).tokens


def test_seeds_reproduce_and_differ_and_rows_do_not_depend_on_the_batch(tiny):
    def sample(seed, prompts=PROMPTS):
        return generate(tiny.decoder, prompts, SamplingConfig(NEW_TOKENS, temperature=1.0, seed=seed)).tokens

    first = sample(7)
    assert sample(7) == first
    assert sample(8) != first
    # Row 0 draws the same tokens next to other prompts: keys depend on (seed, step, row) only.
    assert sample(7, [PROMPTS[0], PROMPTS[2], PROMPTS[1]])[0] == first[0]


def reference_kept(
    logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0, margin: float = 1e-5
) -> tuple[np.ndarray, bool]:
    """One row's kept tokens by sorting in NumPy float64 (ties at a cut-off all kept), and whether the
    nucleus edge lies more than `margin` from top_p, so float32 sums cannot decide it the other way."""
    z = logits.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    keep = (z >= z[order[(top_k or len(z)) - 1]]) & np.isfinite(z)
    if top_p >= 1:
        return keep, True
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    probs /= probs.sum()
    above = np.array([probs[z > value].sum() for value in z])  # mass strictly above each token
    keep &= above < top_p
    return keep, bool(np.abs(above[np.isfinite(z)] - top_p).min() > margin)


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int = 0, top_p: float = 1.0) -> np.ndarray:
    """Next-token probabilities in NumPy float64: softmax(logits / T) cut to the top k, then to the nucleus."""
    keep, clear = reference_kept(logits, temperature, top_k, top_p, margin=1e-3)
    assert clear, "nucleus edge too close to call"
    z = logits.astype(np.float64) / temperature
    probs = np.where(keep, np.exp(z - z.max()), 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 7, 1.0), (1.0, 0, 0.8), (1.3, 40, 0.5), (1.0, 1, 0.3)])
def test_filter_logits_keeps_what_sorting_keeps(temperature, top_k, top_p):
    # Logits on a coarse grid (many ties at every cut-off), a wide range, and some tokens already at -inf.
    rng = np.random.default_rng(3)
    logits = np.round(rng.normal(0, 3, (64, 500)) * 4) / 4
    logits[:, rng.choice(500, 50, replace=False)] = -np.inf
    logits[0] = 2.0  # all tied
    logits = logits.astype(np.float32)
    filtered = np.asarray(
        jax.jit(filter_logits)(logits, np.float32(temperature), np.int32(top_k), np.float32(top_p))
    )
    checked = 0
    for row, got in zip(logits, filtered):
        want, clear = reference_kept(row, temperature, top_k, top_p)
        if clear:
            np.testing.assert_array_equal(np.isfinite(got), want)
            np.testing.assert_allclose(got[want], row[want] / np.float32(temperature), rtol=1e-6)
            checked += 1
    assert checked >= 48


def chi_square_p_value(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson's test on the support of `probs`, pooling bins expected below 5 counts into one."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed_bins = np.append(counts[big], counts[~big].sum())
    expected_bins = np.append(expected[big], expected[~big].sum())
    if expected_bins[-1] < 5:  # too small to stand alone: merge into the last big bin
        observed_bins = np.append(observed_bins[:-2], observed_bins[-2:].sum())
        expected_bins = np.append(expected_bins[:-2], expected_bins[-2:].sum())
    return float(stats.chisquare(observed_bins, expected_bins).pvalue)


@pytest.fixture(scope="module")
def next_token_logits(tiny):
    with torch.no_grad():
        return tiny.hf(torch.as_tensor([PROMPTS[0]])).logits[0, -1].numpy()


@pytest.mark.parametrize(
    "temperature, top_k, top_p, ignored",
    [
        (0.7, 0, 1.0, dict(temperature=1.0)),
        (1.0, 5, 1.0, dict(top_k=0)),
        (1.0, 0, 0.5, dict(top_p=1.0)),
        (1.5, 12, 0.5, dict(top_k=0)),  # top-p acts on what top-k kept, renormalised
    ],
    ids=["temperature", "top_k", "top_p", "top_k_then_top_p"],
)
def test_sampled_frequencies_follow_the_filtered_softmax(tiny, next_token_logits, temperature, top_k, top_p, ignored):
    # A fixed seed makes the test deterministic; the p-value bound is its false-alarm rate over seeds.
    sampling = SamplingConfig(1, temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
    drawn = [c.tokens[0] for c in generate(tiny.decoder, [PROMPTS[0]] * SAMPLES, sampling).completions]
    counts = np.bincount(drawn, minlength=tiny.config.vocab_size)
    settings = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    expected = reference_distribution(next_token_logits, **settings)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the top-k / nucleus"
    assert chi_square_p_value(counts, expected) > 1e-4
    # The same check rejects the distribution one gets when the setting is ignored, so it can fail.
    wrong = reference_distribution(next_token_logits, **{**settings, **ignored})
    assert counts[wrong == 0].sum() > 0 or chi_square_p_value(counts, wrong) < 1e-6


# ----------------------------------------------------------------------------------------- stopping


def find_endings(rows: list[list[int]]):
    """From greedy continuations: an EOS token that first appears at step >= 1 of row 0 and nowhere in
    rows 1-2, and a 2-token stop sequence that first appears in row 1 and nowhere in rows 0 (before the
    EOS) and 2. Returns (eos, eos_step, stop, stop_end_step)."""
    eos_candidates = [(i, t) for i, t in enumerate(rows[0]) if i >= 1 and t not in rows[0][:i] + rows[1] + rows[2]]
    assert eos_candidates, "the tiny model's greedy output gives no usable EOS token; change PROMPTS"
    eos_step, eos = eos_candidates[0]

    def bigrams(tokens):
        return {tuple(tokens[i : i + 2]) for i in range(len(tokens) - 1)}

    for j in range(1, len(rows[1]) - 1):
        stop = tuple(rows[1][j - 1 : j + 1])
        if stop not in bigrams(rows[1][:j]) | bigrams(rows[0][: eos_step + 1]) | bigrams(rows[2]) and eos not in stop:
            return eos, eos_step, list(stop), j
    raise AssertionError("no usable stop sequence in the tiny model's greedy output; change PROMPTS")


def test_eos_and_stop_sequences_end_rows_independently(tiny):
    rows = greedy(tiny.decoder, PROMPTS).tokens
    eos, eos_step, stop, stop_end = find_endings(rows)
    never = [[255, 254, 253], [254]]  # unmatched stops of other lengths share the padded stop array
    result = greedy(tiny.decoder, PROMPTS, eos_token_ids=[eos], stop_sequences=[never[0], stop, never[1]])
    first, second, third = result.completions
    assert first.tokens == rows[0][: eos_step + 1] and first.finish_reason == "eos"
    assert first.content == rows[0][:eos_step]
    assert second.tokens == rows[1][: stop_end + 1] and second.finish_reason == "stop"
    assert second.content == rows[1][: stop_end - 1] and second.tokens[-2:] == stop
    assert third.tokens == rows[2] and third.finish_reason == "length" and third.content == rows[2]


# ----------------------------------------------------------------------------------------- sharded


@pytest.fixture(scope="module")
def sharded(tiny):
    """The tiny model's params loaded straight into their shardings on an 8-device mesh: (mesh, decoder)."""
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    params, _ = load_params(tiny.ckpt, params_shardings(tiny.config, mesh))
    assert len(params["layers"]["mlp"]["up_proj"].sharding.device_set) == 8
    return mesh, build_decoder(tiny.config, params)


def test_eight_device_mesh_gives_the_single_device_tokens(tiny, sharded, cache_reads):
    mesh, decoder = sharded
    expected = greedy(tiny.decoder, PROMPTS, eos_token_ids=[2]).completions
    assert greedy(decoder, PROMPTS, eos_token_ids=[2], mesh=mesh).completions == expected


def test_eight_device_mesh_shares_a_beginning_as_one_device_does(tiny, sharded):
    # The shared beginning is prefilled once per data-parallel shard (4 here) and repeated over its rows.
    mesh, decoder = sharded
    expected = greedy(tiny.decoder, TEMPLATED_PROMPTS, eos_token_ids=[2]).completions
    assert greedy(decoder, TEMPLATED_PROMPTS, eos_token_ids=[2], mesh=mesh).completions == expected


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (20, 0.9)], ids=["unfiltered", "top_k_and_top_p"])
def test_eight_device_mesh_samples_the_single_device_tokens(tiny, sharded, top_k, top_p):
    # The cut-off searches and the draw run on sharded logits: same keys per (seed, step, row), same tokens.
    mesh, decoder = sharded
    sampling = SamplingConfig(NEW_TOKENS, temperature=1.0, top_k=top_k, top_p=top_p, seed=3)
    expected = generate(tiny.decoder, PROMPTS, sampling).tokens
    assert generate(decoder, PROMPTS, sampling, mesh=mesh).tokens == expected
    assert expected != greedy(tiny.decoder, PROMPTS).tokens


# ----------------------------------------------------------------------------------------- command line


def run_cli(argv, capsys, stdin: str | None = None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_prompt_prints_the_greedy_chat_answer(tiny, capsys):
    code, out, err = run_cli([tiny.ckpt, "--prompt", "hi there", "--max-new-tokens", NEW_TOKENS], capsys)
    assert code == 0
    prompt = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi there"}], add_generation_prompt=True, return_dict=False
    )
    # In a batch of three only to reuse a compilation; rows do not depend on each other.
    completion = greedy(tiny.decoder, [prompt, *PROMPTS[1:]], eos_token_ids=[2]).completions[0]
    assert out == tiny.tokenizer.decode(completion.content, skip_special_tokens=True) + "\n"
    assert f"[{len(completion.tokens)} tokens, finished by {completion.finish_reason}]" in err


def test_cli_chat_keeps_history_until_reset(tiny, capsys, monkeypatch):
    seen = []

    def spy(model, prompts, *args):
        seen.append(prompts[0])
        return generate(model, prompts, *args)

    monkeypatch.setattr(cli, "generate", spy)
    code, out, _ = run_cli(
        [tiny.ckpt, "--chat", "--max-new-tokens", NEW_TOKENS], capsys, "hi\nyo\n/reset\nhi\n/exit\nnever\n", monkeypatch
    )
    assert code == 0
    answers = out.split("\n")[:-1]
    assert len(seen) == 3 and len(answers) == 3
    turn = tiny.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    assert seen[0] == seen[2] == turn
    assert seen[1][: len(turn)] == turn and len(seen[1]) > len(turn) + len("yo")  # history is in the prompt
    assert answers[0] == answers[2]  # greedy, same conversation after the reset


def test_cli_errors_are_one_line_and_exit_2(tiny, tmp_path, capsys):
    code, _, err = run_cli([tmp_path / "missing", "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err
    bare = tmp_path / "bare"
    shutil.copytree(tiny.ckpt, bare)
    shutil.rmtree(bare / HF_FILES_DIR)
    code, _, err = run_cli([bare, "--prompt", "x"], capsys)
    assert code == 2 and err.count("\n") == 1 and "has no tokenizer" in err
    code, _, err = run_cli([tiny.ckpt, "--prompt", "x", "--stop", "", "--raw"], capsys)
    assert code == 2 and err.count("\n") == 1 and "empty stop string" in err
