"""The generation and conversion benchmarks run end to end on tiny shapes, and what their tables claim holds.

Greedy decoding must give transformers' tokens, every conversion step must be timed, and every goal must
carry a verdict (the scripts run as users start them: `tests/bench_runner.py`).
"""

from __future__ import annotations

from tests.bench_runner import assert_every_goal_has_a_verdict, run_bench, table


def test_generate_matches_transformers_tokens():
    out = run_bench("generate.py", "--batches", "2", "--new-tokens", "4", "--runs", "1")
    ours = next(r for r in table(out, "Batch", "Side") if r["Side"] == "eu_jax")
    assert ours["Same tokens"] == "2/2"
    (floor,) = table(out, "Batch", "Weight products alone, XLA ms")
    assert float(floor["Weight products alone, XLA ms"]) > 0 and float(floor["Weight products alone, PyTorch ms"]) > 0
    sampled = table(out, "Batch", "Sampling")
    assert len({r["Sampling"] for r in sampled}) == 2 and {r["Side"] for r in sampled} == {"eu_jax", "transformers"}
    assert all(float(r["Seconds"]) > 0 and r["Batch"] == "2" for r in sampled)


def test_convert_reports_every_step():
    out = run_bench("convert.py", "--layers", "1", "--runs", "1")
    steps = {r["Step"]: r for r in table(out, "Step")}
    assert set(steps) == {"read", "import", "load", "copy bf16", "export bf16", "copy fp32", "export fp32"}
    assert all(float(r["Seconds"]) > 0 for r in steps.values())
    assert_every_goal_has_a_verdict(out)
