"""Device meshes from a spec such as {"data": -1, "fsdp": 1, "tensor": 1} (-1 takes what is left)."""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor")


def resolve_mesh_shape(spec: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """Sizes for MESH_AXES in order, with at most one -1 filled from the device count."""
    unknown = set(spec) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh spec has unknown axes {sorted(unknown)}; the axes are {', '.join(MESH_AXES)}")
    sizes = [int(spec.get(axis, 1)) for axis in MESH_AXES]
    for axis, size in zip(MESH_AXES, sizes):  # 0 would divide by zero below, and other negatives flip the sign
        if size < 1 and size != -1:
            raise ValueError(f"mesh axis '{axis}' has size {size}; a size is positive, or -1 for the remaining devices")
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh spec {dict(spec)} has more than one -1 axis")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ValueError(f"mesh spec {dict(spec)} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh spec {dict(spec)} needs {math.prod(sizes)} devices but {num_devices} are in use")
    return tuple(sizes)


def make_mesh(
    spec: Mapping[str, int] | None = None,
    devices: Sequence[jax.Device] | None = None,
    dcn_spec: Mapping[str, int] | None = None,
) -> Mesh:
    """A mesh over `devices` (default: all) laid out by JAX's topology-aware mesh utilities.

    `spec` sizes the axes within one slice (ICI); `dcn_spec` how many slices each axis spans (multi-slice
    TPU; else processes: several GPU hosts, or CPU processes). The mesh axis size is the product of the two.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(int((dcn_spec or {}).get(axis, 1)) for axis in MESH_AXES)
    for axis, size in zip(MESH_AXES, dcn):
        if size < 1:
            raise ValueError(f"DCN mesh axis '{axis}' has size {size}; it must be a positive number of slices")
    if math.prod(dcn) > 1:
        return Mesh(_hybrid_device_mesh(spec, dcn, devices), MESH_AXES)
    shape = resolve_mesh_shape(spec or {"data": -1}, len(devices))
    if len(devices) == 1:
        return Mesh(np.array(devices).reshape(shape), MESH_AXES)
    return Mesh(mesh_utils.create_device_mesh(shape, devices), MESH_AXES)


def _dcn_granules(devices: Sequence[jax.Device]) -> tuple[str, int]:
    """What the DCN axes span, and how many: TPU slices where the devices' slice_index values differ, else
    processes (multi-process CPU and GPU devices report slice_index 0 in every process, or none at all)."""
    slices = {getattr(device, "slice_index", 0) for device in devices}
    if len(slices) > 1:
        return "slices", len(slices)
    return "processes", len({device.process_index for device in devices})


def _hybrid_device_mesh(spec: Mapping[str, int] | None, dcn: tuple[int, ...], devices: list[jax.Device]) -> np.ndarray:
    """Devices laid out with each granule (slice or process) a block of the ICI shape `spec`, the blocks
    arranged in the DCN shape `dcn`."""
    kind, count = _dcn_granules(devices)
    if math.prod(dcn) != count:
        sizes = ", ".join(f"mesh.dcn_{axis}={size}" for axis, size in zip(MESH_AXES, dcn))
        raise ValueError(f"{sizes}: their product, {math.prod(dcn)}, must equal the number of {kind} the devices are in, {count}")
    if len(devices) % count:
        raise ValueError(f"{len(devices)} devices do not split evenly over {count} {kind}")
    ici = resolve_mesh_shape(spec or {"data": -1}, len(devices) // count)
    return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=kind == "processes")


def single_device_mesh() -> Mesh:
    return make_mesh({"data": 1}, jax.devices()[:1])


def parse_mesh_spec(text: str) -> dict[str, int]:
    """'data=2,fsdp=-1' -> {'data': 2, 'fsdp': -1} (the form command lines use)."""
    spec = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise ValueError(f"mesh spec '{text}' is not of the form axis=size,... (e.g. data=1,fsdp=-1)")
        spec[axis.strip()] = int(size)
    return spec


def mesh_from_config(section: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The mesh of a config's `mesh` section: ICI sizes `data`/`fsdp`/`tensor`, DCN sizes `dcn_<axis>`."""
    return make_mesh(
        {axis: section[axis] for axis in MESH_AXES},
        devices,
        dcn_spec={axis: section.get(f"dcn_{axis}", 1) for axis in MESH_AXES},
    )
