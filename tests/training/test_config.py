"""Configs: every shipped YAML loads; unknown or ill-typed keys fail with the valid ones listed."""

from pathlib import Path

import pytest

from jaxrl_llm.cli import main
from jaxrl_llm.training import ALGORITHMS, load_config
from jaxrl_llm.training.config import Config

# Training configs; rm_*.yaml are `jaxrl-llm train-rm` configs (their own sections).
CONFIGS = sorted(p for p in Path(__file__).parents[2].joinpath("configs").glob("*.yaml") if not p.name.startswith("rm_"))
RM_CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("rm_*.yaml"))


def test_there_is_a_config_per_algorithm():
    names = {load_config(path).algo.name for path in CONFIGS}
    assert set(ALGORITHMS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(load_config(path), Config)


@pytest.mark.parametrize("path", RM_CONFIGS, ids=lambda p: p.name)
def test_shipped_reward_model_configs_load_and_find_their_data(path):
    from jaxrl_llm.training.reward_model import load_rm_config

    assert Path(load_rm_config(path).data.path).is_file()


def test_overrides_are_typed():
    c = load_config(None, ["algo.kl_coef=0.02", "train.steps=7", "rollout.top_p=1", "algo.clip_eps_high=null",
                         "optim.learning_rate=5e-4"])
    assert c.optim.learning_rate == 5e-4
    assert c.algo.kl_coef == 0.02 and c.train.steps == 7 and isinstance(c.rollout.top_p, float)
    assert c.algo.clip_eps_high is None


@pytest.mark.parametrize(
    "override,match",
    [
        ("algo.kl_coeff=0.1", r"`algo`: unknown key\(s\) \['kl_coeff'\]; valid keys are \[.*'kl_coef'"),
        ("trainer.steps=3", r"unknown key\(s\) \['trainer'\]; valid keys are \['algo', 'mesh', 'model'"),
        ("train.steps=many", r"`train.steps`: got 'many' \(str\), expected int"),
        ("algo.name=dpo", r"`algo.name`: got 'dpo', expected one of \['dr_grpo', 'grpo'"),
        ("algo.num_samples=1", r"`algo.num_samples`: got 1, expected >= 2 for rloo"),
        ("rollout.temperature=0", r"`rollout.temperature`: got 0.0, expected > 0"),
        ("algo.num_minibatches=3", r"`algo.num_minibatches`: got 3, expected a divisor"),
        ("algo.aggregation=sum", r"`algo.aggregation`: got 'sum'"),
        ("reward.terms=[{kind: python}]", r"`reward.terms\[0\].target`"),
        ("steps", r"expected the form section.key=value"),
        ("algo.entropy_quantile=0", r"`algo.entropy_quantile`: got 0.0, expected in \(0, 1\]"),
        ("algo.ratio_level=sequence-mean", r"`algo.ratio_level`: got 'sequence-mean', expected 'sequence' or 'token' "
                                           r"or None for rloo"),
        ("reward.overlong={buffer: 20}", r"`reward.overlong.buffer`: got 20, expected an integer in \[1, "
                                         r"rollout.max_new_tokens=8\]"),
    ],
)
def test_bad_config_is_rejected_with_valid_keys(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_cli_reports_config_errors(capsys):
    assert main(["train", "--config", "configs/rloo_arithmetic.yaml", "algo.kl_coeff=0.1"]) == 2
    assert "valid keys are" in capsys.readouterr().err
