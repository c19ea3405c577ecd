"""Multi-process training: 2 processes x 2 CPU devices on localhost (JAX's distributed runtime,
gloo collectives) against 1 process x 4 devices on the same global batch."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from jaxrl_llm.training import Trainer, load_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3
# The toy reward, recording how many completions each process scored (and the eval's).
COUNTING_REWARD = """
import os
import jax


def fraction_of_sevens(prompts, completions):
    with open(os.path.join(os.path.dirname(__file__), f"scored_by_{jax.process_index()}.txt"), "a") as f:
        f.write(f"{len(completions)}\\n")
    return [c.count("7") / max(len(c), 1) for c in completions]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def write_config(tiny_policy_dir, run_dir: Path, path: Path) -> Path:
    (path.parent / "counting_reward.py").write_text(COUNTING_REWARD)
    config = {
        "model": {"path": str(tiny_policy_dir)},
        "reward": {"terms": [{"kind": "python", "target": f"{path.parent / 'counting_reward.py'}:fraction_of_sevens"}]},
        "algo": {"name": "rloo", "num_samples": 4, "kl_coef": 0.01},
        "rollout": {"prompts_per_step": 8, "max_new_tokens": 4},
        "optim": {"learning_rate": 0.01},
        "task": {"num_eval": 6},  # not a multiple of the 4 devices
        "mesh": {"data": 4},
        "train": {"steps": STEPS, "run_dir": str(run_dir), "eval_every": 100, "checkpoint_every": STEPS,
                  "progress": False, "plot": False, "tensorboard": False},
    }
    path.write_text(yaml.safe_dump(config))
    return path


def params(trainer):
    return jax.tree.leaves(jax.tree.map(np.asarray, trainer.state.params))


def test_two_processes_train_as_one(tiny_policy_dir, tmp_path):
    if jax.device_count() < 4:
        pytest.skip("the single-process reference needs 4 devices")
    config_path = write_config(tiny_policy_dir, tmp_path / "multi", tmp_path / "config.yaml")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    start = time.perf_counter()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "jaxrl_llm.cli", "train", "--config", str(config_path),
         "--coordinator", f"localhost:{port}", "--num-processes", "2", "--process-id", str(i)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for p in processes:
            outputs.append(p.communicate(timeout=300)[0])
    finally:
        for p in processes:
            p.kill()
    seconds = time.perf_counter() - start
    for i, (p, out) in enumerate(zip(processes, outputs)):
        assert p.returncode == 0, f"process {i}:\n{out[-4000:]}"
    # Exactly one process logs: one row per step, the summary once.
    rows = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    assert "run directory" in outputs[0] and "run directory" not in outputs[1]
    # Each process scored its own rows, half of each step's 32 completions; the 6 held-out prompts
    # (before and after training) do not split over 4 devices: both score all of them.
    for i in range(2):
        counts = [int(n) for n in (tmp_path / f"scored_by_{i}.txt").read_text().split()]
        assert counts == [6] + [16] * STEPS + [6], (i, counts)
        (tmp_path / f"scored_by_{i}.txt").unlink()

    # The same global batch in one process on 4 devices.
    single = Trainer(load_config(config_path, [f"train.run_dir={tmp_path / 'single'}"]))
    single.run()
    # The two processes' checkpoint restores in this one process (4 devices, another layout).
    restored = Trainer(load_config(config_path))
    assert restored.restore() == STEPS
    single_rows = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/mean"] for r in rows[1:]] == [r["reward/mean"] for r in single_rows[1:]]  # same samples
    worst = max(float(np.abs(a - b).max()) for a, b in zip(params(restored), params(single)))
    assert worst <= 1e-6, worst
    print(f"2 processes x 2 devices vs 1 x 4: max |param difference| {worst:.2e}, {seconds:.0f} s for both processes")


@pytest.mark.parametrize("flags, message", [
    (["--coordinator", "localhost:1234"], "got only some of them, expected all three"),
    (["--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"], "expected HOST:PORT of process 0"),
    (["--coordinator", "localhost:1", "--num-processes", "2", "--process-id", "2"],
     "`--process-id`: got 2, expected 0 <= id < --num-processes=2"),
])
def test_bad_distributed_flags_are_named(flags, message, capsys):
    from jaxrl_llm.cli import main

    assert main(["train", "--config", "configs/rloo_arithmetic.yaml", *flags]) == 2
    assert message in capsys.readouterr().err
