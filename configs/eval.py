"""`eu-eval --config=configs/eval.py --config.checkpoint=runs/eu --config.base=ckpt/base \
    --config.eval.retain.path=data/retain/heldout.jsonl --config.eval.forget_texts.path=data/forget/eval.jsonl`

Every field and its default is in `eu_jax/eval/suite.py` (`get_command_config`, and `get_eval_config`
for the `eval` section).
"""

from eu_jax.eval.suite import get_command_config


def get_config():
    return get_command_config()
