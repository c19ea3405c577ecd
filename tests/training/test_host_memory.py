"""glibc tuned for XLA:CPU's large buffers: a jitted call's fresh 128 MB output is faulted in page
by page under glibc's defaults and reused once tuned; the environment's own MALLOC_* settings
win; `jaxrl-llm` tunes unless `--host-malloc default`. Page faults are counted, not timed."""

import os
import platform
import subprocess
import sys

import pytest

from jaxrl_llm import cli
from jaxrl_llm.training import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# The median minor page faults of a call of a jitted op whose output is a fresh 128 MB (32,768 pages of 4 KB).
FAULTS_PER_CALL = """
import resource, statistics, sys
from jaxrl_llm.training.host_memory import tune_glibc_malloc
outcome = tune_glibc_malloc() if sys.argv[1] == "tuned" else "untouched"
import jax, jax.numpy as jnp
x = jnp.ones((32, 1024, 1024), jnp.float32)
double = jax.jit(lambda x: x * 2.0)
# Tuned, glibc's heap grows for the first few calls (up to 7 on a 2-core Xeon: buffers are freed
# asynchronously, so a few are live at once), then serves every call from memory already mapped.
for _ in range(12):
    jax.block_until_ready(double(x))
faults = []
for _ in range(7):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(double(x))
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(outcome, statistics.median(faults))
"""


def faults_per_call(mode: str, env: dict | None = None) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if k not in host_memory.MALLOC_ENV}
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_CALL, mode], capture_output=True, text=True, check=True,
                         env={**clean, "JAX_PLATFORMS": "cpu", **(env or {})}, timeout=300).stdout.split()
    return " ".join(out[:-1]), float(out[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_tuned_malloc_reuses_xla_outputs_instead_of_faulting_them_in():
    outcome, default_faults = faults_per_call("default")
    assert outcome == "untouched"
    assert default_faults > 0.9 * 32768  # every page of the fresh output, every call
    outcome, tuned_faults = faults_per_call("tuned")
    assert outcome == "tuned"
    assert tuned_faults < 0.05 * 32768


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_a_malloc_variable_in_the_environment_wins():
    outcome, faults = faults_per_call("tuned", env={"MALLOC_ARENA_MAX": "4"})
    assert outcome == "set by the environment: MALLOC_ARENA_MAX"
    assert faults > 0.9 * 32768


@pytest.mark.parametrize("flag, tuned", [([], True), (["--host-malloc", "default"], False)])
def test_the_command_line_tunes_unless_asked_not_to(monkeypatch, tmp_path, capsys, flag, tuned):
    calls = []
    monkeypatch.setattr(host_memory, "tune_glibc_malloc", lambda: calls.append("tuned") or "tuned")
    code = cli.main(["eval", "--config", str(tmp_path / "missing.yaml"), *flag])
    assert code == 2 and "missing.yaml" in capsys.readouterr().err  # the run got as far as the config
    assert calls == (["tuned"] if tuned else [])
