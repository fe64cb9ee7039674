"""The relearning attack: fine-tune an unlearned model briefly on off-domain data, then measure again.

Unlearning that only hides knowledge comes back after a few steps of ordinary fine-tuning on related
(even unrelated) data; Exclusive Unlearning's authors name this as its weakness. The attack is plain
SFT (retain NLL, no forget term) from the unlearned weights, with the run's own engine and mesh, and
an optional light evaluation every few steps to draw the relearning curve.
"""

from __future__ import annotations

import copy
from pathlib import Path


from ml_collections import ConfigDict




def relearn_config(
    unlearn_config: ConfigDict, unlearned_checkpoint: str | Path, data_path: str, steps: int, learning_rate: float,
    output_dir: str | Path, eval_every: int = 0,
) -> ConfigDict:
    """The unlearning run's config (model, mesh, dtypes, batch) turned into `steps` of SFT on `data_path`."""
    config = copy.deepcopy(unlearn_config)
    config.model.checkpoint = str(unlearned_checkpoint)
    config.model.reference_checkpoint = ""
    config.objective.update(retain="nll", forget="none", a=1.0, g=1.0)
    config.objective.retain_kwargs, config.objective.forget_kwargs = ConfigDict(), ConfigDict()  # update() would merge
    for half in ("retain", "forget"):  # the forget half is never scored; it must still name data
        config.data[half].update(path=str(data_path), format="auto", max_examples=0, pack=False)
    for name in ("eval_retain", "eval_forget"):
        config.data[name].path = ""
    config.optimizer.update(learning_rate=learning_rate, schedule="constant", warmup_steps=0)
    config.train.update(steps=steps, output_dir=str(output_dir), eval_every=eval_every, save_every=0,
                        keep_checkpoints=1, best_metric="", early_stopping_patience=0)
    return config
