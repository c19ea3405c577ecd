"""glibc's allocator tuned for the large host buffers of XLA:CPU.

XLA:CPU allocates each call's outputs and temporaries afresh. glibc serves a large request from a
new mmap and unmaps it when it is freed, so the next call faults every page in again (and the
kernel zeroes it): 262,144 faults for each fresh GB. Raising `MALLOC_MMAP_THRESHOLD_` alone does
not help XLA, because it allocates on its own worker threads, and glibc serves a request larger
than a thread arena's 64 MB heap from mmap whatever the threshold. One arena for every thread,
no mmap and no trimming of the heap's top keep freed buffers for the next call.

Measured on a 2-core Xeon: the RLOO loss and its gradient from [8192, 32000] float32 logits
(benchmarks/results/objectives_vs_pytorch.md) and a Gemma-3-270M training step on the CPU
(benchmarks/results/gemma3_270m_math_cpu*.md: 15.0 s a step with glibc's defaults, 13.1 s tuned).

The cost: the process's resident memory stays at its peak (freed memory is reused, not returned),
and all threads share one arena's lock. A training process reaches its peak on the first step
anyway. `jaxrl-llm` applies this on start (`--host-malloc default` keeps glibc's defaults); a
script calls `tune_glibc_malloc()` first thing, before JAX runs anything."""

from __future__ import annotations

import ctypes
import os
import platform

# mallopt(3) parameters, from glibc's <malloc.h>.
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
# The environment variables glibc reads for the same parameters: a user who sets one has chosen.
MALLOC_ENV = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
              "MALLOC_TOP_PAD_")


def tune_glibc_malloc() -> str:
    """Tune glibc's malloc for XLA:CPU's large buffers (see the module's docstring); returns what was
    done: "tuned", or why not ("not glibc", "set by the environment: NAME").

    Call it before JAX starts its backend (its threads keep the arenas they already have). It
    changes nothing where the C library is not glibc, or where the environment already sets one of
    glibc's `MALLOC_*` variables."""
    chosen = [name for name in MALLOC_ENV if name in os.environ]
    if chosen:
        return f"set by the environment: {', '.join(chosen)}"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # Order matters: one arena first, so that no thread starts its own in between.
    for parameter, value in [(M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1)]:  # -1: never trim
        if mallopt(parameter, value) != 1:
            return f"mallopt({parameter}, {value}) refused"
    return "tuned"


__all__ = ["tune_glibc_malloc"]
