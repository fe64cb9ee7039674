"""`eu-unierase --config=configs/unierase.py --config.checkpoint=ckpt/base --config.forget.path=forget.jsonl \
    --config.output=runs/unierase`

Every field and its default is in `eu_jax/unierase/pipeline.py` (`get_unierase_config`), with the token
training's in `eu_jax/unierase/token_training.py` and the edit's in `eu_jax/unierase/edit.py`.
"""

from eu_jax.unierase.pipeline import get_unierase_config


def get_config():
    return get_unierase_config()
