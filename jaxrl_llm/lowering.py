"""Kernels chosen by the platform a program is lowered for, and the plan's way to ask for another.

Several kernels run differently on XLA:CPU and on an accelerator (the log-prob kernel's blocking,
fused or separate projections, the remat policy of ``remat="auto"``). Each choice goes through
``by_platform``, which is ``jax.lax.platform_dependent``: both branches are traced and the
lowering keeps the one of the platform the program is lowered for, never the host's, so that
``jax.export(..., platforms=["cuda"])`` from a CPU host gives the accelerator's program.

``jaxrl-llm plan`` needs the memory of an accelerator's program on a host that has only XLA:CPU,
and XLA:CPU compiles CPU modules only (a module lowered for CUDA may abort it). Under
``kernels_of(platform)`` the choice is made at trace time instead, for that platform: the program
is lowered for the CPU and compiled by XLA:CPU, with the accelerator's kernels in it.
"""

from __future__ import annotations

import contextlib
import threading

import jax

_planned = threading.local()


def planned_platform() -> str | None:
    """The platform whose kernels ``by_platform`` traces (inside ``kernels_of``), else None."""
    return getattr(_planned, "platform", None)


@contextlib.contextmanager
def kernels_of(platform: str):
    """Trace ``by_platform``'s branch for ``platform`` ("cpu", "cuda", "rocm", "tpu") whatever the
    lowering platform. Programs traced earlier stay cached with their own choice, so this clears
    JAX's caches on the way in and out: only the programs traced inside see the choice."""
    previous = planned_platform()
    jax.clear_caches()
    _planned.platform = platform
    try:
        yield
    finally:
        _planned.platform = previous
        jax.clear_caches()


def by_platform(*args, cpu, default):
    """``cpu(*args)`` on XLA:CPU, ``default(*args)`` on an accelerator: chosen by the lowering
    platform (``jax.lax.platform_dependent``), or by ``kernels_of``'s platform inside it."""
    platform = planned_platform()
    if platform is not None:
        return (cpu if platform == "cpu" else default)(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=default)


__all__ = ["by_platform", "kernels_of", "planned_platform"]
