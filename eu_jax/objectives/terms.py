"""The retain and forget loss terms, each a pure function of SideInputs plus keyword arguments.

Token-level terms average over masked tokens of the whole half-batch; sequence-level terms (NPO,
SimNPO, DPO) sum over each sequence's masked tokens and average over the sequences that have any.
Masked positions are excluded with `where`, so even NaN there cannot reach the loss.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from eu_jax.objectives import token_stats as ts
from eu_jax.objectives.base import Requirements, SideInputs, SideRequirements, Term

Metrics = dict[str, jax.Array]


def _masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask > 0, values * mask, 0.0)


def _safe_divide(num: jax.Array, den: jax.Array) -> jax.Array:
    """num/den, and 0 where den is 0 (then num is 0 too: nothing counted)."""
    return num / jnp.where(den > 0, den, 1.0)


def token_mean(values: jax.Array, side: SideInputs) -> jax.Array:
    """Mask-weighted mean over every counted token of the side's half-batch (0 when none counts)."""
    count = jnp.sum(side.mask) if side.token_count is None else side.token_count
    return _safe_divide(jnp.sum(_masked(values, side.mask)), count)


def sequence_sum(values: jax.Array, mask: jax.Array) -> jax.Array:
    """[B]: each sequence's mask-weighted sum over its tokens."""
    return jnp.sum(_masked(values, mask), axis=-1)


def sequence_mean(values: jax.Array, side: SideInputs) -> jax.Array:
    """Mean of per-sequence values [B] over the side's sequences with at least one counted token."""
    valid = jnp.sum(side.mask, axis=-1) > 0
    count = jnp.sum(valid) if side.sequence_count is None else side.sequence_count
    return _safe_divide(jnp.sum(jnp.where(valid, values, 0.0)), count)


def _fixed(requirements: Requirements) -> Callable[..., Requirements]:
    """`needs` for a term whose requirements do not depend on its arguments."""
    return lambda **_: requirements


LOGP = {"logp": ts.target_logprob}
LOGP_AND_REF = {"logp": ts.target_logprob, "ref_logp": ts.reference_target_logprob}


# ---- retain terms ---------------------------------------------------------------------------------


def no_retain(retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """No retain term (e.g. RMU, which carries its own)."""
    return jnp.zeros((), jnp.float32), {}


def nll(retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """Supervised fine-tuning NLL on the retain data (Exclusive Unlearning's and GradDiff's retain term)."""
    return -token_mean(retain.stats["logp"], retain), {}


def kl_ref(retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """Mean over tokens of KL(p_ref || p): stay close to the frozen model on retain data (KL-retain,
    as in Maini et al. 2024, TOFU)."""
    return token_mean(retain.stats["kl_ref"], retain), {"mean_logp": token_mean(retain.stats["logp"], retain)}


# ---- forget terms ---------------------------------------------------------------------------------


def no_forget(forget: SideInputs, retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """No forget term (plain fine-tuning baseline)."""
    return jnp.zeros((), jnp.float32), {}


def ga(forget: SideInputs, retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """Gradient ascent (Jang et al. 2023): minus the forget NLL, i.e. the mean target log-prob.
    Unbounded below, which is why NPO and Exclusive Unlearning's KL exist."""
    return token_mean(forget.stats["logp"], forget), {}


def npo(forget: SideInputs, retain: SideInputs, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
    """NPO (Zhang et al. 2024): -(2/beta) mean_seq log sigmoid(-beta * r), r = sum_t (log p - log p_ref).
    A bounded, adaptively weighted gradient ascent; the gradient tends to GA's as beta -> 0."""
    mask = forget.mask
    log_ratio = sequence_sum(forget.stats["logp"] - forget.stats["ref_logp"], mask)
    loss = -(2.0 / beta) * sequence_mean(jax.nn.log_sigmoid(-beta * log_ratio), forget)
    return loss, {"mean_logp": token_mean(forget.stats["logp"], forget), "log_ratio": sequence_mean(log_ratio, forget)}


def simnpo(
    forget: SideInputs, retain: SideInputs, *, beta: float = 2.5, delta: float = 0.0
) -> tuple[jax.Array, Metrics]:
    """SimNPO (Fan et al. 2024): reference-free NPO on the length-normalised NLL,
    -(2/beta) mean_seq log sigmoid(beta * (nll_seq / len_seq - delta))."""
    mask = forget.mask
    mean_nll = _safe_divide(-sequence_sum(forget.stats["logp"], mask), jnp.sum(mask, axis=-1))
    loss = -(2.0 / beta) * sequence_mean(jax.nn.log_sigmoid(beta * (mean_nll - delta)), forget)
    return loss, {"mean_logp": token_mean(forget.stats["logp"], forget)}


def dpo(forget: SideInputs, retain: SideInputs, *, beta: float = 0.1) -> tuple[jax.Array, Metrics]:
    """DPO (Rafailov et al. 2023) with the preferred answer as winner and the forget answer as loser:
    -(2/beta) mean_seq log sigmoid(beta * (r_w - r_l)), r = sum_t (log p - log p_ref). With "I don't
    know" answers as winners this is IdK-DPO (Maini et al. 2024, TOFU)."""
    win = forget.preferred
    margin = sequence_sum(win.stats["logp"] - win.stats["ref_logp"], win.mask) - sequence_sum(
        forget.stats["logp"] - forget.stats["ref_logp"], forget.mask
    )
    loss = -(2.0 / beta) * sequence_mean(jax.nn.log_sigmoid(beta * margin), forget)
    return loss, {"mean_logp": token_mean(forget.stats["logp"], forget), "margin": sequence_mean(margin, forget)}


def uniform_kl(forget: SideInputs, retain: SideInputs) -> tuple[jax.Array, Metrics]:
    """Exclusive Unlearning's forget term: mean over tokens of KL(U || p), pushing every next-token
    distribution on self-generated text towards uniform. Bounded below by 0, unlike GA."""
    return token_mean(forget.stats["uniform_kl"], forget), {"mean_logp": token_mean(forget.stats["logp"], forget)}


def rmu_control_vector(seed: int, dim: int) -> jax.Array:
    """RMU's fixed direction: uniform [0,1) entries, normalised to unit length (as in the WMDP code)."""
    u = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float32)
    return u / jnp.linalg.norm(u)


def _token_mse(values: jax.Array, target: jax.Array, side: SideInputs) -> jax.Array:
    diff = values.astype(jnp.float32) - target.astype(jnp.float32)
    return token_mean(jnp.mean(diff * diff, axis=-1), side)


def rmu(
    forget: SideInputs,
    retain: SideInputs,
    *,
    layer: int = 8,  # WMDP's layer_id=7 hooks the output of decoder layer 7: hidden_states[8]
    steering_coeff: float = 6.5,
    alpha: float = 1200.0,
    seed: int = 0,
) -> tuple[jax.Array, Metrics]:
    """RMU (Li et al. 2024, WMDP): steer forget activations at `layer` to steering_coeff * u for a fixed
    random unit u, and keep retain activations at the reference's: mse_forget + alpha * mse_retain.
    `layer` indexes transformers' hidden_states (WMDP's layer_id L hooks layers[L], i.e. hidden_states[L+1])."""
    target = steering_coeff * rmu_control_vector(seed, forget.hidden.shape[-1])
    forget_mse = _token_mse(forget.hidden, target, forget)
    retain_mse = _token_mse(retain.hidden, retain.ref_hidden, retain)
    return forget_mse + alpha * retain_mse, {"forget_mse": forget_mse, "retain_mse": retain_mse}


def undial(forget: SideInputs, retain: SideInputs, *, beta: float = 10.0) -> tuple[jax.Array, Metrics]:
    """UNDIAL (Dong et al. 2024): self-distillation towards the reference with the forget token's logit
    lowered by beta; mean over tokens of the cross-entropy. Bounded, so it does not collapse like GA."""
    return token_mean(forget.stats["undial_ce"], forget), {"mean_logp": token_mean(forget.stats["logp"], forget)}


def _rmu_needs(*, layer: int, **_) -> Requirements:
    return Requirements(
        retain=SideRequirements(hidden_layer=layer, reference_hidden=True),
        forget=SideRequirements(hidden_layer=layer),
    )


def _undial_needs(*, beta: float) -> Requirements:
    token_fns = {**LOGP, "undial_ce": ts.undial_cross_entropy(beta)}
    return Requirements(forget=SideRequirements(token_fns=token_fns, reference_logits=True))


def _retain_stats(token_fns: Mapping[str, ts.TokenFn], reference: bool = False) -> Callable[..., Requirements]:
    return _fixed(Requirements(retain=SideRequirements(token_fns=token_fns, reference_logits=reference)))


def _forget_stats(
    token_fns: Mapping[str, ts.TokenFn], reference: bool = False, preferred: bool = False
) -> Callable[..., Requirements]:
    side = SideRequirements(token_fns=token_fns, reference_logits=reference, preferred=preferred)
    return _fixed(Requirements(forget=side))


_DPO = Term("dpo", "forget", dpo, _forget_stats(LOGP_AND_REF, reference=True, preferred=True))

TERMS: tuple[Term, ...] = (
    Term("none", "retain", no_retain, _fixed(Requirements())),
    Term("nll", "retain", nll, _retain_stats(LOGP)),
    Term("kl_ref", "retain", kl_ref, _retain_stats({**LOGP, "kl_ref": ts.kl_from_reference}, reference=True)),
    Term("none", "forget", no_forget, _fixed(Requirements())),
    Term("ga", "forget", ga, _forget_stats(LOGP)),
    Term("npo", "forget", npo, _forget_stats(LOGP_AND_REF, reference=True)),
    Term("simnpo", "forget", simnpo, _forget_stats(LOGP)),
    _DPO,
    dataclasses.replace(_DPO, name="idk_dpo"),  # the data pipeline supplies "I don't know" winners
    Term("uniform_kl", "forget", uniform_kl, _forget_stats({**LOGP, "uniform_kl": ts.kl_to_uniform})),
    Term("rmu", "forget", rmu, _rmu_needs, layer_arg="layer"),
    Term("undial", "forget", undial, _undial_needs),
)
