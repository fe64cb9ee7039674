"""One table from logical axis names to mesh axes, and the shardings it gives parameters.

Every parameter dimension has a logical name (see eu_jax/models/llama.py). A name with no rule
is an error rather than a silent replication, and so is a dimension the mesh does not divide.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eu_jax.tree_paths import set_path

MeshAxes = str | tuple[str, ...] | None

BATCH_AXES = ("data", "fsdp")

DEFAULT_RULES: Mapping[str, MeshAxes] = {
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
}


def logical_to_spec(names: Sequence[str], rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> PartitionSpec:
    missing = [n for n in names if n not in rules]
    if missing:
        raise ValueError(f"no sharding rule for logical axis {missing[0]!r} (axes {tuple(names)})")
    return PartitionSpec(*(rules[n] for n in names))


def _check_divisible(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    for dim, axes in zip(shape, spec):
        if axes is None:
            continue
        size = 1
        for axis in (axes,) if isinstance(axes, str) else axes:
            size *= mesh.shape[axis]
        if dim % size:
            raise ValueError(f"parameter {path} has a dimension of {dim} that mesh axes {axes} ({size} devices) do not divide")


def state_shardings(abstract_state: nnx.State, mesh: Mesh, rules: Mapping[str, MeshAxes] = DEFAULT_RULES) -> Any:
    """Pure dict of NamedShardings matching `nnx.to_pure_dict(abstract_state)`."""

    def sharding_for(path, variable) -> NamedSharding:
        names = variable.get_metadata().get("out_sharding")
        dotted = "/".join(str(p) for p in path)
        if names is None:
            raise ValueError(f"parameter {dotted} has no logical axis names")
        spec = logical_to_spec(names, rules)
        _check_divisible(dotted, variable.shape, spec, mesh)
        return NamedSharding(mesh, spec)

    shardings: dict[str, Any] = {}
    for path, variable in nnx.to_flat_state(abstract_state):
        set_path(shardings, path, sharding_for(path, variable))
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches split over the data-parallel axes, sequence replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))



_ACTIVATION_MESH: ContextVar[Mesh | None] = ContextVar("activation_mesh", default=None)


@contextmanager
def activation_sharding(mesh: Mesh) -> Iterator[None]:
    """Within this context, traced model code pins activations' batch axis over `mesh`."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def activation_mesh() -> Mesh | None:
    """The mesh of the enclosing `activation_sharding`, if any (for code that must map over its devices)."""
    return _ACTIVATION_MESH.get()


def _constrain(x: jax.Array, spec: PartitionSpec) -> jax.Array:
    mesh = activation_mesh()
    return x if mesh is None else jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def gather_replicated(x: jax.Array) -> jax.Array:
    """All-gather a sharded parameter before an op XLA cannot partition well (embedding lookup)."""
    return _constrain(x, PartitionSpec())


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (batch) axis to the data-parallel mesh axes.

    Only inside `activation_sharding`, so the model runs unchanged without a mesh. Without the
    constraint XLA's propagation can pick odd layouts (e.g. RoPE tables split on head_dim).
    """
    return _constrain(x, PartitionSpec(BATCH_AXES))


def to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array that every process holds in full."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) global array on every process."""
    if array.is_fully_addressable:
        return np.asarray(jax.device_get(array))
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
