"""`eu-selfgen` on a tiny random checkpoint: unique rows with provenance, reproducibility, resuming after
an interruption (including a line cut mid-way) or with a smaller or larger target, refusing a re-imported
model or retain data with other content, dedup and filter counts, the "self" user turns, seeds wrapping at
2**32, the multi-process split and merge, and the command line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from types import SimpleNamespace

import datasets
import pytest

from eu_jax.convert.checkpoint import load_params
from eu_jax.convert.hf_import import import_checkpoint
from eu_jax.data.sources import DataSpec, load_records
from eu_jax.models.state import build_decoder
from eu_jax.selfgen import (
    NgramTfidfSimilarity,
    SelfGenConfig,
    SelfGenError,
    build_parser,
    checkpoint_provenance,
    main,
    meta_path,
    retain_setting,
    self_generate,
    shard_path,
)
from tests.test_generate import CHAT_TEMPLATE
from tests.tiny_models import save_char_tokenizer, save_hf_model

NEW = 12  # one max_new_tokens (and prompt length) everywhere: one compilation per batch size
BASE = SelfGenConfig(num_samples=10, batch_size=4, max_new_tokens=NEW, max_prompt_tokens=NEW, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("selfgen")
    save_hf_model("llama", root / "hf")
    tokenizer = save_char_tokenizer(root / "hf", CHAT_TEMPLATE)
    import_checkpoint(root / "hf", root / "ckpt", progress=False)
    params, meta = load_params(root / "ckpt")
    return SimpleNamespace(root=root, ckpt=root / "ckpt", tokenizer=tokenizer, model=build_decoder(meta.config, params))


def run(tiny, out, config=BASE, **kwargs):
    kwargs.setdefault("model_info", checkpoint_provenance(tiny.ckpt))
    return self_generate(tiny.model, tiny.tokenizer, config, out, progress=False, **kwargs)


def rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """An uninterrupted run of BASE: the file the other runs are compared with."""
    out = tmp_path_factory.mktemp("ref") / "samples.jsonl"
    return SimpleNamespace(out=out, report=run(tiny, out))


def test_unique_rows_with_provenance_that_load_as_pairs(tiny, reference):
    data = rows(reference.out)
    assert len(data) == 10 == reference.report.kept
    assert len({d["response"] for d in data}) == 10
    assert all(d["prompt"] == "Write something." and d["response"] for d in data)
    assert [d["batch"] for d in data] == [0] * 4 + [1] * 4 + [2] * 2
    meta = json.loads(meta_path(reference.out).read_text())
    assert meta["model"]["checkpoint"] == str(tiny.ckpt.absolute()) and len(meta["model"]["model_meta_sha256"]) == 64
    assert meta["settings"]["seed"] == 3 and meta["settings"]["temperature"] == 1.0 and meta["eu_jax_version"]
    assert meta["counts"]["generated"] == 12 and meta["counts"]["kept"] == 10 and meta["complete"]
    records = load_records(DataSpec(str(reference.out), format="pairs"))
    assert [(r.prompt, r.response) for r in records] == [(d["prompt"], d["response"]) for d in data]


def test_same_seed_same_file_other_seed_other_samples(tiny, reference, tmp_path):
    run(tiny, tmp_path / "again.jsonl")
    assert (tmp_path / "again.jsonl").read_bytes() == reference.out.read_bytes()
    run(tiny, tmp_path / "other.jsonl", dataclasses.replace(BASE, seed=4))
    assert rows(tmp_path / "other.jsonl")[0]["response"] != rows(reference.out)[0]["response"]


def test_resume_after_smaller_target_and_cut_line_equals_uninterrupted_run(tiny, reference, tmp_path):
    out = tmp_path / "resumed.jsonl"
    first = run(tiny, out, dataclasses.replace(BASE, num_samples=6))
    assert first.kept == 6 and len(rows(out)) == 6
    text = out.read_text()
    out.write_text(text[: len(text) - 7])  # the last line cut mid-way, as by a kill during a write
    second = run(tiny, out)
    assert second.resumed_from_batch == 1 and second.batches == 2
    assert out.read_bytes() == reference.out.read_bytes()
    counts = [json.loads(meta_path(path).read_text())["counts"] for path in (out, reference.out)]
    assert counts[0] == counts[1]


def test_a_finished_file_is_kept_as_it_is_for_the_same_target(tiny, reference, tmp_path, monkeypatch):
    out = tmp_path / "done.jsonl"
    for path in (out, meta_path(out)):
        path.write_bytes((reference.out if path == out else meta_path(reference.out)).read_bytes())

    def no_sampling(*args):
        raise AssertionError("a finished file was sampled again")

    monkeypatch.setattr("eu_jax.selfgen._Sampler.sample", no_sampling)
    again = run(tiny, out)
    assert again.kept == 10 and again.batches == 0 and again.generated == 12
    assert out.read_bytes() == reference.out.read_bytes()
    assert meta_path(out).read_bytes() == meta_path(reference.out).read_bytes()
    monkeypatch.undo()
    larger = run(tiny, out, dataclasses.replace(BASE, num_samples=12))  # redoes the batch cut to 10
    assert larger.resumed_from_batch == 2 and rows(out)[:8] == rows(reference.out)[:8] and len(rows(out)) == 12


def test_a_smaller_target_cuts_the_file_to_what_a_run_of_that_size_writes(tiny, reference, tmp_path, monkeypatch):
    fresh = tmp_path / "fresh6.jsonl"
    run(tiny, fresh, dataclasses.replace(BASE, num_samples=6))
    out = tmp_path / "cut.jsonl"
    for path in (out, meta_path(out)):
        path.write_bytes((reference.out if path == out else meta_path(reference.out)).read_bytes())
    monkeypatch.setattr("eu_jax.selfgen._Sampler.sample", lambda *args: pytest.fail("the rows were sampled again"))
    smaller = run(tiny, out, dataclasses.replace(BASE, num_samples=6))
    assert smaller.kept == 6 and smaller.batches == 0
    assert out.read_bytes() == fresh.read_bytes()  # the same first rows: sampling is deterministic per batch
    assert meta_path(out).read_bytes() == meta_path(fresh).read_bytes()  # num_samples 6, counts, the cut batch
    monkeypatch.undo()
    larger = run(tiny, out)  # continues from the batch cut to 6, as after a fresh run of 6
    assert larger.resumed_from_batch == 1 and out.read_bytes() == reference.out.read_bytes()
    assert meta_path(out).read_bytes() == meta_path(reference.out).read_bytes()


def test_resume_after_an_exception_between_batches(tiny, reference, tmp_path):
    out = tmp_path / "killed.jsonl"

    def interrupt(batch):
        if batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tiny, out, after_batch=interrupt)
    assert len(rows(out)) == 8
    with open(out, "a") as f:
        f.write('{"prompt": "half a ro')  # and a partial line after the complete batches
    assert run(tiny, out).resumed_from_batch == 2
    assert out.read_bytes() == reference.out.read_bytes()


def test_resume_refuses_other_settings(tiny, reference, tmp_path):
    out = tmp_path / "s.jsonl"
    out.write_bytes(reference.out.read_bytes())
    meta_path(out).write_bytes(meta_path(reference.out).read_bytes())
    with pytest.raises(SelfGenError, match="other settings"):
        run(tiny, out, dataclasses.replace(BASE, temperature=0.5))


def test_a_workflow_samples_again_a_file_written_with_other_settings(tiny, reference, tmp_path, capsys):
    cooler = dataclasses.replace(BASE, temperature=0.5)
    fresh = tmp_path / "fresh.jsonl"
    run(tiny, fresh, cooler)
    out = tmp_path / "s.jsonl"
    out.write_bytes(reference.out.read_bytes())
    meta_path(out).write_bytes(meta_path(reference.out).read_bytes())
    assert run(tiny, out, cooler, replace_stale=True).resumed_from_batch == 0
    assert f"{out} was written with other settings: temperature (s.jsonl.meta.json): sampling it again" in capsys.readouterr().out
    assert out.read_bytes() == fresh.read_bytes() and meta_path(out).read_bytes() == meta_path(fresh).read_bytes()


def test_resume_refuses_a_model_imported_again_in_the_same_folder(tiny, tmp_path):
    """Other weights imported from the same folder into the same folder keep the checkpoint's path and model
    meta: the params identity (the time the import was committed) tells them apart."""
    hf, ckpt, out = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "m.jsonl"
    shutil.copytree(tiny.root / "hf", hf)
    import_checkpoint(hf, ckpt, progress=False)
    model_meta = (ckpt / "eu_jax_model.json").read_bytes()
    run(tiny, out, dataclasses.replace(BASE, num_samples=6), model_info=checkpoint_provenance(ckpt))
    written = out.read_bytes()
    save_hf_model("llama", hf, seed=1)
    shutil.rmtree(ckpt)
    import_checkpoint(hf, ckpt, progress=False)
    assert (ckpt / "eu_jax_model.json").read_bytes() == model_meta
    with pytest.raises(SelfGenError, match="other model: params "):
        run(tiny, out, model_info=checkpoint_provenance(ckpt))
    assert out.read_bytes() == written


def test_retain_set_is_compared_by_content_not_path(tiny, reference, tmp_path):
    data = rows(reference.out)
    retain, moved = tmp_path / "retain.jsonl", tmp_path / "moved" / "retain.jsonl"
    retain.write_text("".join(json.dumps({"text": d["response"]}) + "\n" for d in data[:3]))
    out = tmp_path / "r.jsonl"
    config = dataclasses.replace(BASE, num_samples=6, retain_path=str(retain), similarity_threshold=0.99)
    run(tiny, out, config)
    moved.parent.mkdir()
    retain.rename(moved)  # the same content elsewhere: the same filter, so the run resumes
    resumed = run(tiny, out, dataclasses.replace(config, num_samples=10, retain_path=str(moved)))
    assert resumed.resumed_from_batch > 0 and resumed.kept == 10
    assert json.loads(meta_path(out).read_text())["retain_path"] == str(moved)
    moved.write_text(json.dumps({"text": data[3]["response"]}) + "\n")  # other content at the same path
    with pytest.raises(SelfGenError, match="other settings: retain "):
        run(tiny, out, dataclasses.replace(config, num_samples=12, retain_path=str(moved)))


def test_keyword_and_similarity_filters_drop_matching_samples(tiny, reference, tmp_path):
    data = rows(reference.out)
    keyword = next(c for c in data[0]["response"] if c.isalnum())
    report = run(tiny, tmp_path / "kw.jsonl", dataclasses.replace(BASE, filter_keywords=(keyword.upper(),)))
    kept = rows(tmp_path / "kw.jsonl")
    assert report.filtered_keywords > 0 and len(kept) == 10
    assert not any(keyword.lower() in d["response"].lower() for d in kept)

    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps({"text": d["response"]}) + "\n" for d in data[:3]))
    config = dataclasses.replace(BASE, retain_path=str(retain), similarity_threshold=0.99)
    report = run(tiny, tmp_path / "sim.jsonl", config)
    assert report.filtered_similarity == 3
    assert not {d["response"] for d in data[:3]} & {d["response"] for d in rows(tmp_path / "sim.jsonl")}


def test_retain_sets_are_recorded_as_absolute_paths_and_hub_names_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "retain.jsonl").write_text('{"text": "x"}\n')
    assert retain_setting("retain.jsonl") == str(tmp_path / "retain.jsonl")
    assert retain_setting("org/retain_set") == "org/retain_set"  # resolved later as a hub dataset
    with pytest.raises(ValueError, match="missing.jsonl: no such file"):
        retain_setting("missing.jsonl")


def test_ngram_similarity_ranks_overlap():
    sim = NgramTfidfSimilarity(["the cat sat on the mat", "stock prices fell sharply"])
    scores = sim(["the cat sat on a mat", "quantum chromodynamics", "The  CAT sat on the mat"])
    assert scores[2] == pytest.approx(1.0) and scores[0] > 0.5 > scores[1]


def test_duplicates_are_counted(tiny, tmp_path):
    config = dataclasses.replace(BASE, num_samples=2, top_k=1, max_batches=2)  # top_k 1: all rows alike
    report = run(tiny, tmp_path / "dup.jsonl", config)
    assert (report.kept, report.duplicates, report.generated, report.batches) == (1, 7, 8, 2)
    assert json.loads(meta_path(tmp_path / "dup.jsonl").read_text())["complete"] is False


def test_self_mode_answers_a_user_turn_the_model_wrote(tiny, tmp_path):
    config = dataclasses.replace(BASE, num_samples=4, user_turns="self", min_chars=0)
    report = run(tiny, tmp_path / "self.jsonl", config)
    data = rows(tmp_path / "self.jsonl")
    prompts = [d["prompt"] for d in data]
    assert report.kept == 4 and sum(bool(p) for p in prompts) >= 2 and len(set(prompts)) >= 2
    assert "Write something." not in prompts
    assert report.tokens > sum(len(d["response"]) for d in data)  # the question pass sampled tokens too
    assert json.loads(meta_path(tmp_path / "self.jsonl").read_text())["settings"]["user_turns"] == "self"


def test_seed_instructions_cycle_over_rows(tiny, tmp_path):
    config = dataclasses.replace(BASE, num_samples=6, user_turns="seeds", seed_instructions=("a?", "b?", "c?"))
    run(tiny, tmp_path / "seeds.jsonl", config)
    data = rows(tmp_path / "seeds.jsonl")
    assert len(data) == 6 and all(d["prompt"] == "abc"[(4 * d["batch"] + d["row"]) % 3] + "?" for d in data)
    assert {d["prompt"] for d in data} == {"a?", "b?", "c?"}


def test_per_batch_seeds_wrap_at_2_32(tiny, tmp_path):
    run(tiny, tmp_path / "last.jsonl", dataclasses.replace(BASE, num_samples=6, seed=2**32 - 1))
    run(tiny, tmp_path / "zero.jsonl", dataclasses.replace(BASE, num_samples=4, seed=0))
    second_batch = [(d["row"], d["response"]) for d in rows(tmp_path / "last.jsonl") if d["batch"] == 1]
    assert len(second_batch) == 2  # batch 1 of seed 2**32 - 1 samples with seed 0
    assert second_batch == [(d["row"], d["response"]) for d in rows(tmp_path / "zero.jsonl")][:2]


def test_processes_split_batches_and_process_0_merges(tiny, reference, tmp_path):
    out = tmp_path / "multi.jsonl"
    for p in (1, 0):  # process 0 merges, so it runs last here (a barrier orders them in a real run)
        run(tiny, out, process_index=p, process_count=2)
    shards = [rows(shard_path(out, p, 2)) for p in (0, 1)]
    assert [len(s) for s in shards] == [5, 5]  # ceil(10 / 2) each
    assert {d["batch"] % 2 for d in shards[0]} == {0} and {d["batch"] % 2 for d in shards[1]} == {1}
    merged = rows(out)
    assert len(merged) == 10 and merged == sorted(shards[0] + shards[1], key=lambda d: (d["batch"], d["row"]))
    # batch b samples with seed + b whichever process runs it
    expected = {(d["batch"], d["row"]): d for d in rows(reference.out)}
    shared = [d for d in merged if (d["batch"], d["row"]) in expected]
    assert len(shared) >= 9 and shared == [expected[d["batch"], d["row"]] for d in shared]
    assert json.loads(meta_path(out).read_text())["counts"]["kept"] == 10


def test_cli_missing_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "o.jsonl"), "--num-samples", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("eu-selfgen: error:") and "nope" in err


def test_cli_seeds_mode_needs_a_file(tiny, tmp_path, capsys):
    argv = [str(tiny.ckpt), str(tmp_path / "o.jsonl"), "--num-samples", "3", "--user-turns", "seeds"]
    assert main(argv) == 2
    assert "--seed-instructions" in capsys.readouterr().err


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_cli_seed_out_of_range_is_named_as_given(tiny, tmp_path, capsys, seed):
    assert main([str(tiny.ckpt), str(tmp_path / "o.jsonl"), "--num-samples", "3", "--seed", str(seed)]) == 2
    err = capsys.readouterr().err
    assert err == f"eu-selfgen: error: seed={seed} must be in [0, 2**32 - 1]\n"


def test_cli_seed_instructions_not_utf8_names_the_file(tiny, tmp_path, capsys):
    seeds = tmp_path / "seeds.txt"
    seeds.write_bytes("caf\u00e9?\n".encode("latin-1"))
    argv = [str(tiny.ckpt), str(tmp_path / "o.jsonl"), "--num-samples", "3", "--user-turns", "seeds",
            "--seed-instructions", str(seeds)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eu-selfgen: error: {seeds} is not UTF-8 text")


@pytest.mark.parametrize("target", ["saved dataset", "file", "folder"])
def test_cli_refuses_an_existing_arrow_target_before_anything_loads(tmp_path, capsys, target):
    arrow = tmp_path / "arrow"
    if target == "saved dataset":
        datasets.Dataset.from_list([{"prompt": "p", "response": "r"}] * 3).save_to_disk(str(arrow))
    elif target == "file":
        arrow.write_text("kept")
    else:
        arrow.mkdir()
        (arrow / "notes.txt").write_text("kept")
    before = {p: p.read_bytes() for p in [arrow, *arrow.rglob("*")] if p.is_file()}
    capsys.readouterr()  # the save's progress bar
    # A missing checkpoint: the error names --arrow only if the target is checked before the model loads.
    assert main([str(tmp_path / "nope"), str(tmp_path / "o.jsonl"), "--num-samples", "3", "--arrow", str(arrow)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"eu-selfgen: error: --arrow: {arrow} is ")
    assert {p: p.read_bytes() for p in [arrow, *arrow.rglob("*")] if p.is_file()} == before


def test_cli_refuses_a_retain_url_and_keeps_hub_names(tmp_path, capsys):
    argv = [str(tmp_path / "ckpt"), str(tmp_path / "o.jsonl"), "--num-samples", "3", "--retain"]
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "gs://b/r.jsonl"])
    assert stopped.value.code == 2 and "error: argument --retain: 'gs://b/r.jsonl' is a URL" in capsys.readouterr().err
    assert build_parser().parse_args([*argv, "org/retain_set"]).retain == "org/retain_set"


def test_cli_writes_samples(tiny, tmp_path):
    out = tmp_path / "cli.jsonl"
    argv = [str(tiny.ckpt), str(out), "--num-samples", "5", "--batch-size", "4", "--max-new-tokens", str(NEW),
            "--seed", "3", "--no-progress", "--arrow", str(tmp_path / "arrow")]
    assert main(argv) == 0
    data = rows(out)
    assert len(data) == 5 and data == rows_prefix(tmp_path, tiny)
    assert len(load_records(DataSpec(str(tmp_path / "arrow"), format="pairs"))) == 5


def rows_prefix(tmp_path, tiny):
    run(tiny, tmp_path / "api.jsonl", dataclasses.replace(BASE, num_samples=5))
    return rows(tmp_path / "api.jsonl")


def test_cli_on_two_real_processes_merges_what_one_process_writes(tiny, tmp_path):
    """jax.distributed with two processes: each samples its batches, process 0 merges after a barrier."""
    import sys

    from tests.test_multiprocess import run_two_processes

    flags = ["--num-samples", "8", "--batch-size", "4", "--max-new-tokens", str(NEW), "--seed", "3", "--no-progress"]
    assert main([str(tiny.ckpt), str(tmp_path / "one.jsonl"), *flags]) == 0

    def command(pid, address):
        env = [f"JAX_COORDINATOR_ADDRESS={address}", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={pid}"]
        return ["env", *env, sys.executable, "-m", "eu_jax.selfgen", str(tiny.ckpt), str(tmp_path / "two.jsonl"), *flags]

    for code, output in run_two_processes(command):
        assert code == 0, output[-3000:]
    assert [len(rows(shard_path(tmp_path / "two.jsonl", p, 2))) for p in (0, 1)] == [4, 4]
    assert rows(tmp_path / "two.jsonl") == rows(tmp_path / "one.jsonl")
