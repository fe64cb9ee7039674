"""The registry and Objective: names and kwargs are validated with messages that say what to write,
and each method asks the step for exactly what its terms read."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from eu_jax.objectives import (
    Objective,
    Requirements,
    SideInputs,
    SideRequirements,
    Term,
    available_terms,
    get_term,
    make_side_inputs,
)
from eu_jax.objectives import token_stats as ts


def test_available_terms():
    assert available_terms("retain") == ["kl_ref", "nll", "none"]
    assert available_terms("forget") == ["dpo", "ga", "idk_dpo", "none", "npo", "rmu", "simnpo", "undial", "uniform_kl"]


def test_unknown_names_and_kinds_list_the_valid_ones():
    with pytest.raises(ValueError, match="unknown forget term 'gd'; available forget terms: dpo, ga, idk_dpo, none"):
        get_term("forget", "gd")
    with pytest.raises(ValueError, match="unknown retain term 'npo'; available retain terms: kl_ref, nll, none"):
        Objective(retain="npo")
    with pytest.raises(ValueError, match="unknown term kind 'keep'; kinds are retain, forget"):
        available_terms("keep")


def test_idk_dpo_is_dpo_under_its_own_name():
    dpo, idk = get_term("forget", "dpo"), get_term("forget", "idk_dpo")
    assert idk.loss is dpo.loss and idk.needs is dpo.needs and idk.name == "idk_dpo"


def test_unknown_missing_and_mistyped_kwargs_are_refused_by_name():
    with pytest.raises(ValueError, match="forget term 'npo': unknown argument 'betta'; valid arguments: beta"):
        Objective(forget="npo", forget_kwargs={"betta": 0.2})
    with pytest.raises(ValueError, match="retain term 'nll': unknown argument 'beta'; valid arguments: none"):
        Objective(retain="nll", retain_kwargs={"beta": 0.2})
    valid = "alpha, layer, seed, steering_coeff"
    with pytest.raises(ValueError, match=f"forget term 'rmu': unknown argument 'coeff'; valid arguments: {valid}"):
        get_term("forget", "rmu").requirements(coeff=1.0)
    with pytest.raises(ValueError, match="forget term 'rmu': argument 'layer' must be an integer, got 7.0"):
        Objective(forget="rmu", forget_kwargs={"layer": 7.0})
    with pytest.raises(ValueError, match="forget term 'simnpo': argument 'delta' must be a number, got '0.1'"):
        Objective(forget="simnpo", forget_kwargs={"delta": "0.1"})

    def needs_temperature(forget, retain, *, temperature: float):
        return jnp.zeros(()), {}

    term = Term("tempered", "forget", needs_temperature, lambda **_: Requirements())
    with pytest.raises(ValueError, match="forget term 'tempered': missing argument 'temperature'"):
        term.requirements()
    assert term.resolve_kwargs({"temperature": 2}) == {"temperature": 2}


def test_objective_fills_defaults_and_is_hashable():
    objective = Objective(retain="kl_ref", forget="rmu", forget_kwargs={"alpha": 100})
    assert objective.forget_kwargs == {"layer": 8, "steering_coeff": 6.5, "alpha": 100, "seed": 0}
    same = Objective("kl_ref", {}, "rmu", {"alpha": 100, "layer": 8}, a=1.0, g=1.0)
    assert objective == same and hash(objective) == hash(same)
    assert objective != Objective("kl_ref", {}, "rmu", {"alpha": 100, "layer": 6})
    assert Objective() == Objective("nll", {}, "ga", {})  # GradDiff by default


def _summary(side: SideRequirements) -> tuple:
    return (sorted(side.token_fns), side.reference_logits, side.hidden_layer, side.reference_hidden, side.preferred)


NO_SIDE = ([], False, None, False, False)
LOGP = (["logp"], False, None, False, False)
LOG_RATIO = (["logp", "ref_logp"], True, None, False, False)


@pytest.mark.parametrize(
    "retain,forget,forget_kwargs,want_retain,want_forget,needs_reference",
    [
        ("nll", "uniform_kl", {}, LOGP, (["logp", "uniform_kl"], False, None, False, False), False),
        ("nll", "ga", {}, LOGP, LOGP, False),
        ("kl_ref", "npo", {}, (["kl_ref", "logp"], True, None, False, False), LOG_RATIO, True),
        ("none", "simnpo", {}, NO_SIDE, LOGP, False),
        ("nll", "idk_dpo", {}, LOGP, (["logp", "ref_logp"], True, None, False, True), True),
        ("none", "rmu", {"layer": 5}, ([], False, 5, True, False), ([], False, 5, False, False), True),
        ("nll", "rmu", {}, (["logp"], False, 8, True, False), ([], False, 8, False, False), True),
        ("none", "undial", {}, NO_SIDE, (["logp", "undial_ce"], True, None, False, False), True),
        ("none", "none", {}, NO_SIDE, NO_SIDE, False),
    ],
)
def test_requirements_per_method(retain, forget, forget_kwargs, want_retain, want_forget, needs_reference):
    req = Objective(retain, {}, forget, forget_kwargs).requirements()
    assert _summary(req.retain) == want_retain
    assert _summary(req.forget) == want_forget
    assert req.needs_reference == needs_reference


def test_requirements_carry_the_functions_and_undial_beta():
    req = Objective("kl_ref", {}, "undial", {"beta": 3.0}).requirements()
    assert req.retain.token_fns == {"logp": ts.target_logprob, "kl_ref": ts.kl_from_reference}
    assert req.forget.token_fns["undial_ce"] == ts.undial_cross_entropy(3.0)
    preferred = Objective(forget="dpo").requirements().forget.for_preferred()
    assert _summary(preferred) == LOG_RATIO


def test_conflicting_requirements_are_refused():
    with pytest.raises(ValueError, match=r"different hidden layers \[3, 7\]"):
        SideRequirements(hidden_layer=3).merge(SideRequirements(hidden_layer=7))
    with pytest.raises(ValueError, match="different token statistics under the same name 'undial_ce'"):
        a = SideRequirements(token_fns={"undial_ce": ts.undial_cross_entropy(1.0)})
        a.merge(SideRequirements(token_fns={"undial_ce": ts.undial_cross_entropy(2.0)}))
    with pytest.raises(ValueError, match="reference_hidden needs a hidden_layer"):
        SideRequirements(reference_hidden=True)


def test_a_term_missing_its_inputs_says_which():
    mask = jnp.ones((2, 3))
    retain = SideInputs(mask=mask)
    forget = SideInputs(mask=mask, stats={"logp": mask})
    message = r"term 'npo' needs token statistics \['ref_logp'\] on the forget half; got \['logp'\]"
    with pytest.raises(ValueError, match=message):
        Objective(forget="npo")(retain.replace(stats={"logp": mask}), forget)
    hidden = SideInputs(mask=mask, hidden=jnp.ones((2, 3, 4)))
    with pytest.raises(ValueError, match=r"term 'rmu' needs ref_hidden \(layer 8\) on the retain half"):
        Objective(retain="none", forget="rmu")(hidden, hidden)
    with pytest.raises(ValueError, match="term 'dpo' needs the forget preferred batch half"):
        stats = {"logp": mask, "ref_logp": mask}
        Objective(retain="none", forget="dpo")(retain, SideInputs(mask=mask, stats=stats))


def test_make_side_inputs_names_what_the_objective_lacks_and_keeps_only_what_it_needs():
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    mask, targets = jnp.ones((2, 3)), jnp.zeros((2, 3), jnp.int32)
    req = Objective(forget="npo").requirements()
    with pytest.raises(ValueError, match="needs ref_final_hidden and ref_kernel on this batch half"):
        make_side_inputs(req.forget, mask, targets, hidden, kernel)
    rmu = Objective(forget="rmu").requirements()
    with pytest.raises(ValueError, match="needs layer_hidden, ref_layer_hidden on this batch half"):
        make_side_inputs(rmu.retain, mask, targets, hidden, kernel)
    extra = dict(layer_hidden=hidden, ref_final_hidden=hidden, ref_kernel=kernel)
    side = make_side_inputs(req.retain, mask, targets, hidden, kernel, **extra)
    assert set(side.stats) == {"logp"} and side.hidden is None and side.ref_hidden is None and side.preferred is None


@pytest.mark.parametrize("layer", [-1, 5, 100])
def test_rmu_layer_outside_the_model_is_refused_by_name_with_the_valid_range(layer):
    rmu = get_term("forget", "rmu")
    message = rf"^layer: forget term 'rmu' reads hidden layer {layer}, but a 4-layer model has hidden states 0 to 4"
    with pytest.raises(ValueError, match=message):
        rmu.check_layers({"layer": layer}, num_layers=4)
    for valid in (0, 4):
        rmu.check_layers({"layer": valid}, num_layers=4)
    with pytest.raises(ValueError, match="hidden layer 8, but a 4-layer model"):  # the default, WMDP's
        rmu.check_layers({}, num_layers=4)


def test_terms_without_a_hidden_layer_have_no_depth_to_check():
    for kind in ("retain", "forget"):
        for name in available_terms(kind):
            if name != "rmu":
                assert get_term(kind, name).layer_arg is None
                get_term(kind, name).check_layers({}, num_layers=0)
