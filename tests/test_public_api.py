"""The public contract of ARCHITECTURE.md: names, positional arguments, keyword-only options and defaults.

Research code calls these by position and keyword; a renamed argument, a positional option or a
changed default breaks it silently, so the signatures are pinned here.
"""

import inspect

import pytest

import jaxrl_llm

REQUIRED = inspect.Parameter.empty
# name: (positional parameters in order, {keyword-only option: default}); more keyword-only
# options may exist, these must.
CONTRACT = {
    "kl_penalty": (["logprobs", "ref_logprobs"], {"kind": "k1"}),
    "shape_rewards": (["scores", "logprobs", "ref_logprobs", "mask"], {"kl_coef": REQUIRED, "kind": "k1"}),
    "reinforce_advantages": (["seq_rewards"], {"baseline": None}),
    "rloo_advantages": (["seq_rewards"], {"num_samples": REQUIRED}),
    "grpo_advantages": (["seq_rewards"], {"num_samples": REQUIRED, "scale": "group", "eps": 1e-4}),
    "gae": (["token_rewards", "values", "mask"], {"gamma": 1.0, "lam": 0.95}),
    "whiten": (["x", "mask"], {"shift_mean": True, "axis_name": None}),
    "reinforce_loss": (["logprobs", "ref_logprobs", "scores", "mask"],
                       {"kl_coef": 0.1, "kl_kind": "k1", "baseline": None}),
    "rloo_loss": (["logprobs", "ref_logprobs", "scores", "mask"],
                  {"num_samples": REQUIRED, "kl_coef": 0.1, "kl_kind": "k1"}),
    "ppo_loss": (["logprobs", "old_logprobs", "advantages", "mask"],
                 {"clip_eps": 0.2, "values": None, "old_values": None, "returns": None, "value_clip": 0.2,
                  "vf_coef": 0.1, "aggregation": "token-mean", "ratio_level": "token"}),
    "token_logprobs": (["logits", "tokens"], {"temperature": 1.0, "chunk_size": None, "top_k": 0, "top_p": 1.0}),
}


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_contract_signature(name):
    positional, keyword_only = CONTRACT[name]
    parameters = inspect.signature(getattr(jaxrl_llm, name)).parameters.values()
    got_positional = [p.name for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert got_positional == positional, name
    options = {p.name: p.default for p in parameters if p.kind == p.KEYWORD_ONLY}
    for option, default in keyword_only.items():
        assert option in options, f"{name} has no keyword-only `{option}`"
        assert options[option] == default, f"{name}({option}=...) defaults to {options[option]!r}, not {default!r}"
    # Positional defaults beyond the contract would let a caller pass an option by position.
    assert not [p for p in parameters if p.kind == p.POSITIONAL_OR_KEYWORD and p.name not in positional]


def test_lazily_imported_names_resolve():
    from jaxrl_llm import Rollout, Trainer, generate, load_config, train

    assert inspect.isclass(Rollout) and inspect.isclass(Trainer)
    assert list(inspect.signature(generate).parameters)[:3] == ["model", "prompt_ids", "prompt_mask"]
    assert "resume" in inspect.signature(train).parameters
    assert list(inspect.signature(load_config).parameters)[:2] == ["path", "overrides"]


def test_all_is_importable():
    for name in jaxrl_llm.__all__:
        assert getattr(jaxrl_llm, name) is not None, name
