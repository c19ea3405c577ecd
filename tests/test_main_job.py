"""A shortened version of the README's main job: RLOO on the shipped policy raises held-out accuracy."""

from pathlib import Path

from jaxrl_llm.training import Trainer, load_config

ROOT = Path(__file__).parents[1]


def test_shortened_main_job_raises_held_out_accuracy(tmp_path):
    config = load_config(ROOT / "configs" / "rloo_arithmetic.yaml", [
        "train.steps=150", f"train.run_dir={tmp_path}", "train.eval_every=1000", "train.checkpoint_every=150",
        "train.progress=false", "train.tensorboard=false", "train.eval_samples=0",  # pass@k: tests/test_cli.py
    ])
    summary = Trainer(config).run()
    before, after = summary["eval/accuracy_before"], summary["eval/accuracy_after"]
    assert 0.30 <= before <= 0.45  # the shipped policy leaves room for RL
    assert after >= before + 0.10, (before, after)
    assert (tmp_path / "curves.png").exists() and (tmp_path / "checkpoints" / "150").exists()
