"""The built-in held-out NLL evaluation (`train.eval_every`) against transformers' PyTorch model."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from eu_jax.convert.export import export_checkpoint
from eu_jax.data.pipeline import LengthPolicy, load_set
from eu_jax.data.sources import DataSpec
from eu_jax.train import loop
from eu_jax.train.evaluation import make_nll_eval
from eu_jax.train.loop import train
from tests.tiny_run import make_tiny_run, tiny_config, write_jsonl


def torch_nll(model_dir, arrays: dict[str, np.ndarray]) -> float:
    """Token-weighted NLL of the scored (loss-mask) tokens, all rows in one forward."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids, attention = (torch.from_numpy(arrays[k]).long() for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = torch.from_numpy(arrays["loss_mask"][:, 1:] * arrays["attention_mask"][:, 1:]).double()
    return float(-(logp * mask).sum() / mask.sum())


def test_held_out_nll_matches_pytorch_over_padded_micro_batch_forwards(tmp_path, monkeypatch):
    tiny = make_tiny_run(tmp_path / "tiny")
    # 11 rows with answers of 1 to 11 characters: the mean must weight rows by their scored tokens, and
    # 11 rows fill three forwards of 4 rows (batch 8 per half in 4 micro-batches: 2 + 2 rows) with 1 empty one,
    # each forward's rows split over 2 data-parallel devices.
    held_out = {
        "retain": write_jsonl(tmp_path / "eval_retain.jsonl", [{"prompt": f"{i}+{i}=", "response": "9" * i} for i in range(1, 12)]),
        "forget": write_jsonl(tmp_path / "eval_forget.jsonl", [{"prompt": f"Who is {i}?", "response": "Q" * i} for i in range(1, 12)]),
    }
    config = tiny_config(tiny, tmp_path / "run", train={"steps": 1, "eval_every": 1}, data={"microbatches": 4},
                         mesh={"data": 2, "fsdp": 1, "tensor": 1})
    for name, path in held_out.items():
        config.data[f"eval_{name}"].path = str(path)
    rows_per_forward = []

    def recording(*args, **kwargs):  # the rows one training forward runs: 2 + 2 (not the batch's 8 per half)
        rows_per_forward.append(args[3])
        return make_nll_eval(*args, **kwargs)

    monkeypatch.setattr(loop, "make_nll_eval", recording)
    train(config, devices=jax.devices()[:2])
    assert rows_per_forward == [4]

    export_checkpoint(tmp_path / "run" / "checkpoints", tmp_path / "hf", progress=False)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    reported = {k: v for record in records for k, v in record.items() if k.startswith("eval/")}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "tiny" / "hf")
    for name in held_out:
        spec = DataSpec.from_mapping(config.data[f"eval_{name}"])
        arrays = load_set(spec, tokenizer, LengthPolicy(config.data.max_length), cache=False).data.arrays()
        assert len(arrays["input_ids"]) == 11
        assert reported[f"eval/{name}_nll"] == pytest.approx(torch_nll(tmp_path / "hf", arrays), rel=1e-5)
