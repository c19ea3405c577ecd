"""Mesh construction and shardings (see `mesh.py`)."""

from jaxrl_llm.parallel.mesh import (
    BATCH_AXES,
    batch_sharding,
    check_batch_divisible,
    make_mesh,
    param_sharding,
    replicated,
    shard_params,
)

__all__ = [
    "BATCH_AXES",
    "batch_sharding",
    "check_batch_divisible",
    "make_mesh",
    "param_sharding",
    "replicated",
    "shard_params",
]
