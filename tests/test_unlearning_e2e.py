"""Exclusive Unlearning end to end on a tiny model that first learns two synthetic domains.

Domain A (retain): single-digit additions. Domain B (to forget): made-up facts "Who is Nalo?" -> one of
six jobs (chance: 1/6). The model is trained on both until it answers them, then writes its own forget
texts through its chat template (eu-selfgen, user turns it writes itself, samples similar to domain A
filtered out), and each method trains from that model on A + those texts. Measured when written
(100 unlearning steps): base A 0.95 / B 1.0 / KL(U||p) 6.3; EU A 0.91 / B 0.0 / KL 0.04; GradDiff
A 0.84 / B 0.0 / KL 12.3 (it pushes the texts' likelihood down, not towards uniform); RetainOnlyFT
A 0.96 / B 0.95 / KL 7.8 (fine-tuning on A alone forgets nothing, so EU's forgetting is its forget term's).
"""

from __future__ import annotations

import random

import pytest

from eu_jax.eval.model import EvalModel
from eu_jax.eval.suite import EvalSuite, get_eval_config
from eu_jax.parallel.mesh import single_device_mesh
from eu_jax.selfgen import SelfGenConfig, self_generate
from eu_jax.train.loop import train
from tests.tiny_run import make_chat_checkpoint, tiny_config, write_jsonl

NAMES = ["Nalo", "Brix", "Quen", "Tavi", "Morp", "Zelk", "Fira", "Dunt", "Olma", "Vesk",
         "Ruba", "Hix", "Kelo", "Sarn", "Plim", "Gudo", "Wena", "Yorl", "Cavi", "Jolt"]
JOBS = ["a baker", "a pilot", "a nurse", "a miner", "a judge", "a tailor"]
CHANCE = 1 / len(JOBS)
METHODS = {"eu": "uniform_kl", "graddiff": "ga", "retain_only": "none"}


def _suite(retain_path, kind: str, forget_texts) -> EvalSuite:
    config = get_eval_config()
    config.retain.update(path=str(retain_path), kind=kind, max_new_tokens=10)
    config.forget_texts.path = str(forget_texts)
    config.probes.enabled = config.harmful.enabled = False
    return EvalSuite(config)


def _measure(world, checkpoint) -> dict[str, float]:
    model = EvalModel.load(checkpoint, single_device_mesh())
    a = world["suite_a"].run(model, judge=None)
    b = world["suite_b"].retain(model)
    return {"a": a["retain"]["accuracy"], "b": b["accuracy"], "kl": a["forget_texts"]["kl_uniform"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The model trained on A and B, its self-generated forget texts, and its scores."""
    import jax

    root = tmp_path_factory.mktemp("e2e")
    domain_a = [{"prompt": f"{x}+{y}=", "response": str(x + y)} for x in range(10) for y in range(10)]
    random.Random(0).shuffle(domain_a)
    domain_b = [{"prompt": f"Who is {n}?", "response": JOBS[i % len(JOBS)]} for i, n in enumerate(NAMES)]
    paths = {name: write_jsonl(root / f"{name}.jsonl", rows)
             for name, rows in (("a", domain_a), ("b", domain_b), ("ab", domain_a + domain_b))}
    one_device = jax.devices()[:1]
    learn = tiny_config({"ckpt": make_chat_checkpoint(root), "retain": paths["ab"], "forget": paths["ab"]}, root / "learn",
                        train={"steps": 400, "log_every": 100}, objective={"forget": "none"},
                        optimizer={"learning_rate": 3e-3, "warmup_steps": 20},
                        data={"batch_size": 16, "max_length": 40}, mesh={"fsdp": 1})
    train(learn, devices=one_device)
    learned = root / "learn" / "checkpoints"

    model = EvalModel.load(learned, single_device_mesh())
    settings = SelfGenConfig(num_samples=96, user_turns="self", max_new_tokens=16, max_prompt_tokens=16,
                             batch_size=32, retain_path=str(paths["a"]), similarity_threshold=0.5)
    self_generate(model.decoder(), model.tokenizer, settings, root / "selfgen.jsonl", model.mesh,
                  eos_ids=model.eos_ids, progress=False)
    rows = (root / "selfgen.jsonl").read_text().splitlines(keepends=True)
    (root / "forget_train.jsonl").write_text("".join(rows[:72]))
    (root / "forget_eval.jsonl").write_text("".join(rows[72:]))
    world = {"root": root, "paths": paths, "learned": learned, "devices": one_device,
             "suite_a": _suite(paths["a"], "number", root / "forget_eval.jsonl"),
             "suite_b": _suite(paths["b"], "text", root / "forget_eval.jsonl")}
    world["base"] = _measure(world, learned)
    return world


def _unlearn(world, method: str) -> dict[str, float]:
    root = world["root"]
    run = {"ckpt": world["learned"], "retain": world["paths"]["a"], "forget": root / "forget_train.jsonl"}
    config = tiny_config(run, root / method, train={"steps": 100, "log_every": 50},
                         objective={"retain": "nll", "forget": METHODS[method], "a": 1.0, "g": 1.0},
                         optimizer={"learning_rate": 1e-3, "warmup_steps": 0},
                         data={"batch_size": 16, "max_length": 48}, mesh={"fsdp": 1})
    train(config, devices=world["devices"])
    return _measure(world, root / method / "checkpoints")


def test_the_model_first_knows_both_domains(world):
    base = world["base"]
    assert base["a"] >= 0.85 and base["b"] >= 0.9, base


def test_eu_keeps_the_retain_domain_and_forgets_the_rest(world):
    base, eu = world["base"], _unlearn(world, "eu")
    assert eu["a"] >= base["a"] - 0.1, (base, eu)
    assert eu["b"] <= CHANCE + 0.1, (base, eu)
    assert eu["kl"] < 0.25 * base["kl"], (base, eu)


def test_graddiff_forgets_without_approaching_uniform(world):
    base, graddiff = world["base"], _unlearn(world, "graddiff")
    assert graddiff["b"] <= CHANCE + 0.1, (base, graddiff)
    assert graddiff["kl"] > 0.5 * base["kl"], (base, graddiff)  # EU's KL falls to ~0; gradient ascent's does not


def test_retain_only_fine_tuning_forgets_nothing(world):
    base, retain_only = world["base"], _unlearn(world, "retain_only")
    assert retain_only["a"] >= base["a"] - 0.1, (base, retain_only)
    assert retain_only["b"] >= 0.75, (base, retain_only)
