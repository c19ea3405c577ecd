"""Every name of the public contract imports from `jaxrl_llm`."""

import jaxrl_llm

CONTRACT = [
    "kl_penalty", "shape_rewards", "reinforce_advantages", "rloo_advantages", "grpo_advantages", "gae",
    "whiten", "reinforce_loss", "rloo_loss", "ppo_loss", "token_logprobs",
]


def test_contract_names_import():
    for name in CONTRACT:
        assert callable(getattr(jaxrl_llm, name)), name
    from jaxrl_llm import generate, train, Rollout  # noqa: F401  (lazily imported subpackages)


def test_all_is_importable():
    for name in jaxrl_llm.__all__:
        assert getattr(jaxrl_llm, name) is not None, name
