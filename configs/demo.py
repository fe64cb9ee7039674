"""The Exclusive Unlearning workflow (`make demo`, `make compare`): an experiment plus a `workflow` section.

    python -m eu_jax.demo --config=configs/demo.py                       # SmolLM2-135M on this CPU
    python -m eu_jax.demo --config=configs/demo.py:model=llama3_2_1b,hardware=gpu_1host \
        --config.model.checkpoint=ckpt/llama3_2_1b

The text after ':' is an experiment spec (configs/experiment.py); the method is EU unless it names one
(compare runs every method in workflow.methods from the same config). On the `cpu` hardware preset
the sizes shrink so the whole demo finishes in about 15 minutes on a 2-core CPU; on accelerators the
model preset's batch and sequence length apply and the data sets grow.
"""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parent


def _experiment():
    from eu_jax.files import load_python_file

    return load_python_file(CONFIGS / "experiment.py")


def get_config(spec: str = ""):
    from eu_jax.workflow import workflow_section

    config, hardware = _experiment().with_workflow(spec, "workflow", workflow_section())
    config.train.log_every = 2
    if hardware == "cpu":
        config.train.steps = 30
        config.data.batch_size = 4
        config.data.max_length = 96  # self-generated texts here are about 80 tokens
        config.train.async_checkpointing = False  # nothing else to overlap with on 2 cores
        config.workflow.selfgen.update(train=48, eval=16, relearn=24, max_new_tokens=40, max_prompt_tokens=20,
                                       batch_size=48)
        config.workflow.eval.batch_size = 24
        config.workflow.eval.harmful.update(templates="raw,STAN", per_set=6)  # STAN: the shortest DAN template
    else:
        config.train.steps = 200
        config.workflow.domain.update(train_size=4000, heldout_size=200)
        config.workflow.selfgen.update(train=2000, eval=200, relearn=200, max_new_tokens=256, batch_size=64)
        config.workflow.eval.harmful.per_set = 50
        config.workflow.relearn.update(steps=50, eval_every=10)
    return config
