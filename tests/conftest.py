"""Test set-up: 4 fake CPU devices for the multi-device tests, float32 everywhere.

On an accelerator: `JAX_PLATFORMS=cuda,cpu python -m pytest -m "not slow and not real_model"`
(what benchmarks/gpu_suite.py runs). The accelerator is then the default device; tests that need
several devices of one kind skip themselves, and the GPU-only tests (marked `gpu`) run.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, new and empty each time, shared through the
# environment by the xdist workers and by the processes tests start (CLI, README blocks): a program
# they have in common is compiled once instead of once per process. It changes no result.
if "JAXRL_LLM_TEST_CACHE" not in os.environ:  # set once, in the process that starts the session
    os.environ["JAXRL_LLM_TEST_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="jaxrl_llm_compilation_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if jax.default_backend() != "cpu":
    # The tests compare float32 computations with float32 (or float64) references; a GPU's default
    # float32 matmul may round its inputs to TF32 (10-bit mantissa), another precision altogether.
    jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(os.environ["JAXRL_LLM_TEST_CACHE"], ignore_errors=True)
