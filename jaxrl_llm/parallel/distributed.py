"""Several processes, one program: JAX's multi-controller runtime, and the host side of a step.

Every process runs the same trainer. After `initialize`, `jax.devices()` lists every process's
devices, the mesh spans them all, and `jax.jit` programs run on the global mesh with XLA's
collectives between hosts (NCCL on GPU, gloo on CPU, ICI on TPU). What happens on the host
(tokenizing prompts, decoding completions, rewards) sees plain numpy arrays:

- a device array leaves the mesh with `to_host`, which gathers every process's rows;
- a reward is computed by the process whose devices hold its row (`local_rows`), and only the
  scores are gathered (`gather_rows`);
- host arrays enter the mesh with `jax.device_put`: every process holds the same global
  array, and each transfers the rows of its own devices.

With one process these are plain numpy conversions; nothing changes for a single host.
"""

from __future__ import annotations

import jax
import numpy as np

from jaxrl_llm.errors import UserError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, auto: bool = False) -> None:
    """Join a multi-process run before any other JAX call: explicit (`coordinator` "host:port",
    `num_processes`, `process_id`) or `auto` (JAX detects SLURM, Open MPI and TPU pods)."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not auto and not any(given):
        return
    if not auto and not all(given):
        raise UserError("`--coordinator`, `--num-processes` and `--process-id`: got only some of them, expected all "
                        "three (or --distributed-auto, for SLURM and TPU pods).")
    if not auto:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"`--process-id`: got {process_id}, expected 0 <= id < --num-processes={num_processes}.")
        if ":" not in coordinator:
            raise UserError(f"`--coordinator`: got {coordinator!r}, expected HOST:PORT of process 0.")
    # CPU processes need a collectives library to talk to each other (GPUs and TPUs have theirs).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)


def is_primary() -> bool:
    """The process that writes logs, plots and summaries (process 0)."""
    return jax.process_index() == 0


def to_host(x) -> np.ndarray:
    """A (global) device array as one numpy array on every process: rows other processes
    hold are gathered from them."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def local_rows(sharding, num_rows: int) -> np.ndarray:
    """Indices of the rows of a `[num_rows, ...]` array that this process's devices hold under
    `sharding` (all rows with one process)."""
    if jax.process_count() == 1:
        return np.arange(num_rows)
    rows = set()
    for index in sharding.addressable_devices_indices_map((num_rows,)).values():
        rows.update(range(num_rows)[index[0]])
    return np.array(sorted(rows))


def gather_rows(values: np.ndarray, rows: np.ndarray, num_rows: int) -> np.ndarray:
    """`[num_rows, ...]`: each process's `values` (one per row in `rows`) put in place, from every process."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    all_values = np.asarray(multihost_utils.process_allgather(np.asarray(values)))
    all_rows = np.asarray(multihost_utils.process_allgather(np.asarray(rows)))
    out = np.empty((num_rows, *values.shape[1:]), values.dtype)
    out[all_rows.reshape(-1)] = all_values.reshape(-1, *values.shape[1:])
    return out


__all__ = ["gather_rows", "initialize", "is_primary", "local_rows", "to_host"]
