"""UniErase: a learned unlearning token plus closed-form, null-space-projected MLP edits.

Stage 1 (`vocab`, `idk_bank`, `token_training`): add `<unlearn_0>` to the vocabulary and train only its
rows so that, once the model has emitted it, an "I don't know"-style reply follows.
Stage 2 (`tracing`, `covariance`, `edit`): AlphaEdit-style edits of `mlp.down_proj` in a band of
early-middle layers, so that forget questions make the model emit the token, while keys of retained
knowledge (the null space of their covariance) see no change.
"""
