"""The smallest reproduction of the worker aborts the test suite saw: XLA:CPU at the kernel's
limit of memory mappings per process.

Every live XLA:CPU program holds three memory mappings (its code, read-only data and data
sections), on jax 0.10 and 0.12 alike, and JAX's caches keep every program a process compiled
alive until `jax.clear_caches()`. A test worker compiles thousands (one per jitted function and
shape, one per eager op), and on Linux a process may hold at most `vm.max_map_count` mappings
(65530 by default). At the limit XLA's next allocation fails,

    E execution_engine.cc:54] LLVM compilation error: Cannot allocate memory

and the process aborts (SIGABRT) or segfaults. Under pytest the message goes to the captured
stderr and is lost with the process: only "Fatal Python error: Aborted" is left.

This script uses up all but `room` mappings with small anonymous ones (alternating protections,
so the kernel cannot merge them), then compiles programs and keeps them, as the caches do:

    python scripts/xla_cpu_map_limit.py           # dies after about room / 3 programs
    python scripts/xla_cpu_map_limit.py --clear   # clears JAX's caches at half the room: runs to the end

`tests/conftest.py` (`release_compiled_programs`) clears the caches after any test that leaves
its worker past half the limit.
"""

import argparse
import ctypes
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--room", type=int, default=600, help="mappings left free before compiling")
    parser.add_argument("--programs", type=int, default=1000)
    parser.add_argument("--clear", action="store_true", help="jax.clear_caches() when half the room is used")
    args = parser.parse_args()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    read, write, private, anonymous = 1, 2, 2, 0x20
    limit = int(open("/proc/sys/vm/max_map_count").read())
    x = jnp.ones((8, 8))
    jax.jit(lambda x: x + 1)(x).block_until_ready()  # JAX's own start-up programs first
    for i in range(limit - mappings() - args.room):
        libc.mmap(None, 4096, read if i % 2 else read | write, private | anonymous, -1, 0)
    start = mappings()
    print(f"vm.max_map_count {limit}; {start} mappings in use, {limit - start} left", flush=True)
    alive = []
    for i in range(args.programs):
        program = jax.jit(lambda x, i=i: jnp.sin(x) * i + x @ x)  # a new program each time
        program(x).block_until_ready()
        alive.append(program)  # as JAX's caches keep it
        if args.clear and mappings() - start > args.room // 2:
            jax.clear_caches()
        if i % 50 == 0:
            print(f"{i + 1} programs alive, {mappings() - start} more mappings", flush=True)
    print(f"{args.programs} programs compiled, the process lives")


if __name__ == "__main__":
    main()
