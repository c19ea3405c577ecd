"""Device mesh and shardings for one host (or many, after `jax.distributed.initialize`).

Two mesh axes: `data` splits the batch; `fsdp` splits the batch too *and* shards
parameters and optimizer state (each array along its largest dimension divisible
by the axis size), for models that do not fit one device. With `fsdp=1` parameters
are replicated: plain data parallelism. `jax.jit` then partitions every step from
these input shardings (GSPMD); no per-device code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxrl_llm.errors import UserError

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, *, devices=None) -> Mesh:
    """A `(data, fsdp)` mesh with Auto axes; `data=-1` takes every device left over."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp < 1 or len(devices) % fsdp:
        raise UserError(f"`mesh.fsdp`: got {fsdp}, expected a divisor of the {len(devices)} devices.")
    if data == -1:
        data = len(devices) // fsdp
    if data < 1 or data * fsdp > len(devices):
        raise UserError(f"`mesh.data`: got {data}, expected data * fsdp <= {len(devices)} devices (fsdp={fsdp}).")
    grid = np.array(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_sharding(x, mesh: Mesh) -> NamedSharding:
    """Shard a float array's largest dimension divisible by the fsdp size; replicate the rest
    (scalars, counters and PRNG keys, which are tiny and must stay whole)."""
    size = mesh.shape["fsdp"]
    shape = np.shape(x)
    if size == 1 or not shape or not jnp.issubdtype(x.dtype, jnp.floating):
        return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def shard_params(tree, mesh: Mesh):
    """Place a parameter/optimizer pytree according to `param_sharding`."""
    shardings = jax.tree.map(lambda x: param_sharding(x, mesh), tree)
    return jax.device_put(tree, shardings), shardings


def check_batch_divisible(n: int, mesh: Mesh, what: str) -> None:
    devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if n % devices:
        raise UserError(f"`{what}`: got {n} sequences, expected a multiple of the {devices} devices of the mesh "
                        "(each device samples and trains whole rows); change it, or use fewer devices with mesh.data.")
