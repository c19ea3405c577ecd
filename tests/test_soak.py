"""The 500-step soak of the default task (slow: `pytest -m slow tests/test_soak.py`): no NaN in any
metric, no skipped update, bounded KL. `python benchmarks/soak.py` records the same run."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_500_steps_of_the_default_task_stay_finite_with_bounded_kl(tmp_path):
    spec = importlib.util.spec_from_file_location("soak", ROOT / "benchmarks" / "soak.py")
    soak = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soak)
    result = soak.soak(500, tmp_path / "run")
    assert result["steps"] == 500
    assert result["non-finite values"] == 0 and result["skipped updates"] == 0, result
    assert result["kl max"] < soak.KL_BOUND, result
    assert result["eval accuracy after"] > result["eval accuracy before"], result
