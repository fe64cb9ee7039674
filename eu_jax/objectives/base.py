"""What a loss term asks the train step for, what it receives, and the term itself.

A term declares its needs per batch half (token statistics by name, the frozen reference, a residual
layer, preferred answers) so the step runs the reference model or returns hidden states only when the
chosen method reads them (DESIGN.md 5-6).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Literal, Mapping

import flax.struct
import jax

from eu_jax.objectives.token_stats import TokenFn, chunked_token_stats

Kind = Literal["retain", "forget"]
KINDS: tuple[Kind, ...] = ("retain", "forget")


@flax.struct.dataclass
class SideInputs:
    """One half of the batch (retain or forget) as a term sees it.

    mask [B,T]: 1 on tokens that count (already shifted: position t scores token t+1), 0 elsewhere.
    stats: exactly the token statistics the term asked for, {name: [B,T]}.
    hidden / ref_hidden [B,T,D]: policy / reference residual stream at the term's hidden layer.
    preferred: the same prompts with the preferred answer (DPO's winner), built like this side.
    token_count / sequence_count: where this side is one micro-batch of a half-batch, the half-batch's counted
    tokens and sequences with any counted token; means divide by them, so the micro-batches' values add up to
    the half-batch's (a mean of per-micro-batch means would weigh a token by its micro-batch's length).
    """

    mask: jax.Array
    stats: dict[str, jax.Array] = flax.struct.field(default_factory=dict)
    hidden: jax.Array | None = None
    ref_hidden: jax.Array | None = None
    preferred: SideInputs | None = None
    token_count: jax.Array | None = None
    sequence_count: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class SideRequirements:
    """What one batch half must carry.

    token_fns: statistics to compute with `chunked_token_stats`, by the name the term reads.
    reference_logits: the token fns read the reference's logits (run the reference to the end).
    hidden_layer: residual stream to return, transformers' hidden_states indexing (i = after i layers).
    reference_hidden: the reference's residual stream at hidden_layer is needed too.
    preferred: the preferred-answer sequences are needed, with the same token fns and reference logits.
    """

    token_fns: Mapping[str, TokenFn] = dataclasses.field(default_factory=dict)
    reference_logits: bool = False
    hidden_layer: int | None = None
    reference_hidden: bool = False
    preferred: bool = False

    def __post_init__(self):
        if self.reference_hidden and self.hidden_layer is None:
            raise ValueError("SideRequirements: reference_hidden needs a hidden_layer")

    @property
    def needs_reference(self) -> bool:
        return self.reference_logits or self.reference_hidden

    def for_preferred(self) -> SideRequirements:
        """What the preferred-answer sequences of this side must carry."""
        return SideRequirements(token_fns=self.token_fns, reference_logits=self.reference_logits)

    def merge(self, other: SideRequirements) -> SideRequirements:
        for name in self.token_fns.keys() & other.token_fns.keys():
            if self.token_fns[name] != other.token_fns[name]:
                raise ValueError(f"two terms ask for different token statistics under the same name {name!r}")
        layers = {self.hidden_layer, other.hidden_layer} - {None}
        if len(layers) > 1:
            raise ValueError(f"two terms ask for different hidden layers {sorted(layers)} on the same batch half")
        return SideRequirements(
            token_fns={**self.token_fns, **other.token_fns},
            reference_logits=self.reference_logits or other.reference_logits,
            hidden_layer=layers.pop() if layers else None,
            reference_hidden=self.reference_hidden or other.reference_hidden,
            preferred=self.preferred or other.preferred,
        )


@dataclasses.dataclass(frozen=True)
class Requirements:
    retain: SideRequirements = SideRequirements()
    forget: SideRequirements = SideRequirements()

    @property
    def needs_reference(self) -> bool:
        return self.retain.needs_reference or self.forget.needs_reference

    def merge(self, other: Requirements) -> Requirements:
        return Requirements(retain=self.retain.merge(other.retain), forget=self.forget.merge(other.forget))


def make_side_inputs(
    req: SideRequirements,
    mask: jax.Array,
    targets: jax.Array,
    final_hidden: jax.Array,
    kernel: jax.Array,
    *,
    ref_final_hidden: jax.Array | None = None,
    ref_kernel: jax.Array | None = None,
    layer_hidden: jax.Array | None = None,
    ref_layer_hidden: jax.Array | None = None,
    preferred: SideInputs | None = None,
    chunk_tokens: int = 1024,
    counts: tuple[jax.Array, jax.Array] | None = None,
) -> SideInputs:
    """SideInputs holding what `req` asks for and nothing else, with a clear error for what is missing.

    final_hidden/kernel: the policy's final-norm hidden state and [D,V] output projection (likewise
    ref_*); layer_hidden/ref_layer_hidden: residual streams at req.hidden_layer. Reference arrays are
    put under stop_gradient here. counts: the half-batch's (token_count, sequence_count) for a micro-batch.
    """
    given = {
        "ref_final_hidden and ref_kernel": ref_final_hidden is not None and ref_kernel is not None,
        "layer_hidden": layer_hidden is not None,
        "ref_layer_hidden": ref_layer_hidden is not None,
        "preferred": preferred is not None,
    }
    needed = {
        "ref_final_hidden and ref_kernel": req.reference_logits and bool(req.token_fns),
        "layer_hidden": req.hidden_layer is not None,
        "ref_layer_hidden": req.reference_hidden,
        "preferred": req.preferred,
    }
    missing = [name for name in needed if needed[name] and not given[name]]
    if missing:
        raise ValueError(f"make_side_inputs: the objective needs {', '.join(missing)} on this batch half")
    use_ref = needed["ref_final_hidden and ref_kernel"]
    stats = chunked_token_stats(
        req.token_fns,
        final_hidden,
        kernel,
        targets,
        ref_hidden=ref_final_hidden if use_ref else None,
        ref_kernel=ref_kernel if use_ref else None,
        chunk_tokens=chunk_tokens,
    )
    return SideInputs(
        mask=mask,
        stats=stats,
        hidden=layer_hidden if needed["layer_hidden"] else None,
        ref_hidden=jax.lax.stop_gradient(ref_layer_hidden) if needed["ref_layer_hidden"] else None,
        preferred=preferred if needed["preferred"] else None,
        token_count=None if counts is None else counts[0],
        sequence_count=None if counts is None else counts[1],
    )


def _check_number(where: str, key: str, value: Any, default: Any) -> None:
    """A numeric default (int: integer, float: int or float) fixes the argument's type."""
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return
    allowed = int if isinstance(default, int) else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        kind = "an integer" if allowed is int else "a number"
        raise ValueError(f"{where}: argument {key!r} must be {kind}, got {value!r}")


def _check_side(term: str, side_name: str, side: SideInputs | None, req: SideRequirements) -> None:
    """Fail at trace time, naming the term, if a batch half lacks what the term declared."""
    if side is None:
        if req == SideRequirements():
            return
        raise ValueError(f"term {term!r} needs the {side_name} batch half")
    missing = sorted(req.token_fns.keys() - side.stats.keys())
    if missing:
        got = sorted(side.stats)
        raise ValueError(f"term {term!r} needs token statistics {missing} on the {side_name} half; got {got}")
    for field, needed in (("hidden", req.hidden_layer is not None), ("ref_hidden", req.reference_hidden)):
        if needed and getattr(side, field) is None:
            raise ValueError(f"term {term!r} needs {field} (layer {req.hidden_layer}) on the {side_name} half")
    if req.preferred:
        _check_side(term, f"{side_name} preferred", side.preferred, req.for_preferred())


@dataclasses.dataclass(frozen=True)
class Term:
    """A named loss term: retain terms are `loss(retain, **kwargs)`, forget terms
    `loss(forget, retain, **kwargs)`; both return (scalar, {metric: scalar}). Keyword arguments are
    keyword-only in `loss`, with their defaults there; `needs(**kwargs)` reads the resolved ones."""

    name: str
    kind: Kind
    loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    needs: Callable[..., Requirements]
    layer_arg: str | None = None  # the argument that picks the hidden layer, checked against the model's depth

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"term {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")

    def _parameters(self) -> list[inspect.Parameter]:
        n_sides = 1 if self.kind == "retain" else 2
        return list(inspect.signature(self.loss).parameters.values())[n_sides:]

    def resolve_kwargs(self, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """kwargs with defaults filled in; unknown, missing or wrongly typed ones raise ValueError."""
        params = {p.name: p for p in self._parameters()}
        where = f"{self.kind} term {self.name!r}"
        valid = ", ".join(sorted(params)) or "none"
        for key in kwargs:
            if key not in params:
                raise ValueError(f"{where}: unknown argument {key!r}; valid arguments: {valid}")
        resolved = {}
        for key, param in params.items():
            if key not in kwargs and param.default is inspect.Parameter.empty:
                raise ValueError(f"{where}: missing argument {key!r}; valid arguments: {valid}")
            resolved[key] = kwargs.get(key, param.default)
            _check_number(where, key, resolved[key], param.default)
        return resolved

    def requirements(self, **kwargs: Any) -> Requirements:
        return self.needs(**self.resolve_kwargs(kwargs))

    def check_layers(self, kwargs: Mapping[str, Any], num_layers: int) -> None:
        """Refuse a hidden layer the model lacks: the decoder would silently read another one instead.
        The message starts with the argument's name, so callers can prefix where it was set."""
        if self.layer_arg is None:
            return
        layer = self.resolve_kwargs(kwargs)[self.layer_arg]
        if not 0 <= layer <= num_layers:
            raise ValueError(
                f"{self.layer_arg}: {self.kind} term {self.name!r} reads hidden layer {layer}, but a {num_layers}-layer "
                f"model has hidden states 0 to {num_layers} (transformers' hidden_states indexing)"
            )

    def __call__(self, *sides: SideInputs, **kwargs: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
        """The loss and its metrics, prefixed `{kind}/`; the value itself is logged as `{kind}/{name}`."""
        kwargs = self.resolve_kwargs(kwargs)
        req = self.needs(**kwargs)
        side_names = ("retain",) if self.kind == "retain" else ("forget", "retain")
        if len(sides) != len(side_names):
            raise ValueError(f"{self.kind} term {self.name!r} takes the {' and '.join(side_names)} halves")
        for side_name, side in zip(side_names, sides):
            _check_side(self.name, side_name, side, getattr(req, side_name))
        value, extras = self.loss(*sides, **kwargs)
        metrics = {f"{self.kind}/{self.name}": value}
        metrics.update({f"{self.kind}/{key}": metric for key, metric in extras.items()})
        return value, metrics
