"""The device mesh: named axes `data`, `fsdp`, `tensor`, sized by the config."""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh

AXES = ("data", "fsdp", "tensor")


def mesh_shape(data: int = -1, fsdp: int = 1, tensor: int = 1, num_devices: int | None = None) -> tuple[int, int, int]:
    """Resolve one -1 entry to the rest of the devices and check the product."""
    n = num_devices if num_devices is not None else jax.device_count()
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n % known:
            raise ValueError(f"mesh {dict(zip(AXES, sizes))}: {n} devices do not divide by {known}")
        sizes[sizes.index(-1)] = n // known
    if math.prod(sizes) != n:
        raise ValueError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, {n} are present")
    return tuple(sizes)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
    """A mesh over all devices (all processes), or over `devices` (e.g. a TPU topology's, for
    compile-only), laid out by `jax.make_mesh` for the interconnect."""
    shape = mesh_shape(data, fsdp, tensor, None if devices is None else len(devices))
    # Auto axes: the compiler propagates shardings from jit's in/out shardings and our constraints
    # (recent JAX defaults make_mesh to Explicit axes, a different programming model).
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES), devices=devices)
