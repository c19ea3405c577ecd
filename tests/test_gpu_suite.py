"""benchmarks/gpu_suite.py --smoke: the GPU suite's stages run end to end at tiny shapes on a CPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # about 2 minutes of CPU: torch.compile and the 0.5B-shaped programs at tiny sizes
def test_the_gpu_suite_runs_every_measuring_stage_at_tiny_shapes(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "suite.md"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--smoke", "--scale-budget", "4",
                           "--stages", "objectives,sampler,engine,update,trl_ours", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    assert "Not measured" not in text and "stopped early" not in text, text
    for heading in ("## 1. Objectives", "## 2. Sampler", "## 2b. Rollout engine at RL lengths", "## 3. Update"):
        assert heading in text
    # Every objective side was checked against the float32 reference before it was timed.
    assert text.count("| RLOO from logits 4x16x1000 |") >= 6
    assert "| ours (`Trainer.step`) |" not in text  # TRL's side did not run: no step table is made up
