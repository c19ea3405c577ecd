"""Multi-turn training: every algorithm trains on the policy's tokens only, the sampler's
log-probabilities of those tokens are the training forward's, the trainer logs the episodes and
their tools, and bad environments are named at start-up."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.training import ALGORITHMS, Trainer, load_config
from jaxrl_llm.training.algorithms import RolloutBatch, core
from jaxrl_llm.training.algorithms.registry import get_spec

# CI runs three families (a bandit estimator, a critic, a group-normalised one); the rest are slow.
IN_CI = ("rloo", "ppo", "grpo")


def tool_config(tmp_path, *overrides, algo="rloo"):
    num_samples = max(2, get_spec(algo).min_samples)
    return load_config(None, [
        "model.path=builtin:tiny_tool_arithmetic", "task.name=tool_arithmetic", "task.num_eval=8",
        f"train.run_dir={tmp_path / 'run'}", f"algo.name={algo}", f"algo.num_samples={num_samples}",
        "rollout.prompts_per_step=4", "rollout.max_new_tokens=16", "rollout.max_turns=2",
        "rollout.max_total_tokens=40", "rollout.tools=[jaxrl_llm.tasks.tool_arithmetic:calc]",
        "rollout.prompt_length=10", "optim.learning_rate=1e-3", "train.steps=2", "train.eval_every=100",
        "train.checkpoint_every=100", "train.progress=false", "train.plot=false", "train.tensorboard=false",
        *overrides,
    ])


def episode_batch(trainer, seed=0):
    """`(RolloutBatch, observation mask, sampling log-probabilities)` of episodes that surely hold
    observations (the policy's calls, the tool's results), with varied scores."""
    k = trainer.config.algo.num_samples
    examples = trainer.task.train_batch(0, trainer.config.rollout.prompts_per_step)
    for attempt in range(5):
        sampled = trainer._sample(examples, trainer._tokenize(examples), jax.random.key(seed + attempt),
                                  num_samples=k, temperature=1.0)
        r = sampled.rollout
        if r.observation_mask.sum():
            n = r.tokens.shape[0]
            scores = np.random.default_rng(seed).normal(size=n).astype(np.float32)
            batch = RolloutBatch(*(jnp.asarray(x) for x in (r.prompt_ids, r.prompt_mask, r.tokens, r.mask)),
                                 jnp.asarray(scores), jnp.ones(n, bool), jnp.asarray(sampled.episodes.finished))
            return batch, jnp.asarray(r.observation_mask, jnp.float32), np.asarray(r.logprobs)
    pytest.fail("no episode called the tool in 5 batches")


@pytest.mark.parametrize("algo", [pytest.param(a, marks=() if a in IN_CI else pytest.mark.slow) for a in ALGORITHMS])
def test_observation_tokens_carry_no_gradient_and_policy_logprobs_are_the_samplers(tmp_path, monkeypatch, algo):
    trainer = Trainer(tool_config(tmp_path, algo=algo))
    batch, observation, rollout_logprobs = episode_batch(trainer)
    mask = np.asarray(batch.mask) > 0

    # 1. The sampler's log-probabilities of the policy's tokens are one training forward's.
    state = trainer.state
    forward = trainer.algorithm._forward(state.params["policy"], batch, state.base_params)
    np.testing.assert_allclose(np.asarray(forward.logprobs)[mask], rollout_logprobs[mask], atol=2e-5)

    # 2. A perturbation of every forward's outputs at the observation positions (policy, old,
    # reference log-probabilities, entropies, critic values) changes neither the loss nor its
    # gradient: d loss / d delta is exactly 0. At the policy's positions it is not.
    _, train_batch, _ = trainer.algorithm.prepare(state, batch)
    original_forward, original_values = core.policy_forward, core.critic_values

    def loss_at(delta, where):
        def forward(*args, **kwargs):
            out = original_forward(*args, **kwargs)
            return out._replace(logprobs=out.logprobs + delta * where, entropy=out.entropy + delta * where)

        def values(*args, **kwargs):
            return original_values(*args, **kwargs) + delta * where

        monkeypatch.setattr(core, "policy_forward", forward)
        monkeypatch.setattr(core, "critic_values", values)
        try:
            return trainer.algorithm.loss(state.params, train_batch, base=state.base_params)[0]
        finally:
            monkeypatch.setattr(core, "policy_forward", original_forward)
            monkeypatch.setattr(core, "critic_values", original_values)

    at_observations = jax.grad(loss_at)(0.0, observation)
    at_policy_tokens = jax.grad(loss_at)(0.0, jnp.asarray(mask, jnp.float32))
    assert float(at_observations) == 0.0
    assert float(at_policy_tokens) != 0.0
    np.testing.assert_array_equal(loss_at(0.0, observation), loss_at(0.7, observation))


def test_a_tool_run_logs_episodes_tools_and_transcripts(tmp_path):
    summary = Trainer(tool_config(tmp_path, "train.log_samples=3", "train.eval_every=2")).run()
    for key in ("tools/calls_per_episode", "tools/errors", "episode/turns", "episode/observation_tokens",
                "episode/truncated_observations", "episode/finished"):
        assert key in summary, key
    assert 1.0 <= summary["episode/turns"] <= 2.0
    rows = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert rows and all(row["transcript"][0]["role"] == "policy" for row in rows)
    for row in rows:  # the transcript's parts, in order, are the completion
        assert "".join(part["text"] for part in row["transcript"]) == row["completion"]
        roles = [part["role"] for part in row["transcript"]]
        assert all(a != b for a, b in zip(roles, roles[1:]))  # policy and environment alternate


ENVIRONMENT = '''
class Adder:
    """Answers <call>calc(a+b)</call> with the sum; the reward is 1 for a right final answer."""
    stop_strings = ["</call>"]

    def reset(self, example):
        self.answer, self.final, self.calls = example.answer, None, 0

    def step(self, text):
        if "</call>" in text:
            self.calls += 1
            a, b = text.split("calc(")[1].split(")")[0].split("+")
            return f"<result>{int(a) + int(b)}</result>"
        self.final = text

    def reward(self):
        return float(self.final == self.answer)

    def metrics(self):
        return {"adder/calls": self.calls}
'''


def test_a_custom_environment_rewards_its_episodes(tmp_path):
    (tmp_path / "adder.py").write_text(ENVIRONMENT)
    config = tool_config(tmp_path, "rollout.tools=[]", f"rollout.environment={tmp_path / 'adder.py'}:Adder",
                         "reward.terms=[{kind: environment}]")
    trainer = Trainer(config)
    batch, samples, scores, *_ = trainer.collect()
    # The environment's reward is the verifier's here: 1 exactly for a right final answer.
    expected = trainer.task.score_batch([s.example for s in samples], [s.text for s in samples],
                                        [s.finished for s in samples])
    finished = np.array([s.finished for s in samples])
    assert finished.any()
    np.testing.assert_array_equal(np.asarray(scores)[finished], expected[finished])
    metrics = trainer.step()
    assert "adder/calls" in metrics


@pytest.mark.parametrize("source, match", [
    ("class Env:\n    def reset(self, example):\n        pass\n", r"no method\(s\) \['step'\]"),
    ("class Env:\n    step = 3\n    def reset(self, example):\n        pass\n", r"\['step'\]"),
])
def test_an_environment_missing_a_method_is_named_at_start_up(tmp_path, source, match):
    (tmp_path / "env.py").write_text(source)
    with pytest.raises(UserError, match=match):
        Trainer(tool_config(tmp_path, "rollout.tools=[]", f"rollout.environment={tmp_path / 'env.py'}:Env"))


def test_reset_must_give_one_prompt_per_example(tmp_path):
    (tmp_path / "env.py").write_text(
        "import itertools\ncount = itertools.count()\n"
        "class Env:\n    def reset(self, example):\n        return example.prompt + str(next(count) % 2)\n"
        "    def step(self, text):\n        return None\n")
    trainer = Trainer(tool_config(tmp_path, "rollout.tools=[]", f"rollout.environment={tmp_path / 'env.py'}:Env"))
    with pytest.raises(UserError, match="reset gave two prompts for one example"):
        trainer.collect()


@pytest.mark.parametrize("overrides, match", [
    (["rollout.tools=[]"], r"`rollout.max_turns`: got 2, expected 1 without rollout.environment"),
    (["rollout.max_total_tokens=null"], "`rollout.max_total_tokens`: got None"),
    (["rollout.max_total_tokens=8"], "`rollout.max_total_tokens`: got 8"),
    (["rollout.environment=x.py:E"], "`rollout.tools`"),
    (["rollout.tools=[jaxrl_llm.tasks.tool_arithmetic:nope]"], r"`rollout.tools`\[0\]: .* has no function 'nope'"),
    (["rollout.tool_format=json"], "rollout.tool_format"),
    # The shipped tool policy has 64 positions: episodes of 120 tokens after the prompt cannot fit.
    (["rollout.max_total_tokens=120"], r"`rollout.prompt_length`: got 10, and with rollout.max_total_tokens=120 a "
                                       r"sequence exceeds the model's context of 64 tokens"),
    (["rollout.max_total_tokens=64", "rollout.prompt_length=null"],
     r"`rollout.max_total_tokens`: got 64, but the model's context is 64 tokens"),
])
def test_bad_multi_turn_settings_name_the_key(tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        Trainer(tool_config(tmp_path, *overrides))


@pytest.mark.slow
def test_the_tool_preset_raises_held_out_accuracy_by_25_points(tmp_path):
    """configs/rloo_tool_arithmetic.yaml as the README runs it (about a minute on 2 CPU cores)."""
    from pathlib import Path

    config = load_config(Path(__file__).parents[2] / "configs" / "rloo_tool_arithmetic.yaml",
                         [f"train.run_dir={tmp_path / 'run'}", "train.progress=false", "train.plot=false"])
    summary = Trainer(config).run()
    assert summary["eval/accuracy_after"] >= summary["eval/accuracy_before"] + 0.25
    assert summary["tools/calls_per_episode"] > 0.9


def test_dapo_overlong_penalty_counts_each_policy_turn_never_the_observations(tmp_path):
    """`reward.overlong` with turns of at most 16 tokens and 40-token episodes: an episode loses
    the penalty of its longest policy turn, measured here from the mask's runs of policy tokens."""
    trainer = Trainer(tool_config(tmp_path, "reward.overlong={buffer: 6, penalty: 1.0}"))
    examples = trainer.task.train_batch(0, 4)
    sampled = trainer._sample(examples, trainer._tokenize(examples), jax.random.key(0), num_samples=2,
                              temperature=1.0)
    samples = trainer._samples(examples, sampled, 2)
    with_penalty, _ = trainer.reward_fn(samples, normalize=False)
    trainer.reward_fn.overlong = None
    without, _ = trainer.reward_fn(samples, normalize=False)

    r = sampled.rollout
    expected = []
    for row in np.asarray(r.mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))  # starts and ends of policy runs
        longest = max(np.diff(edges.reshape(-1, 2), axis=1)[:, 0])
        expected.append(np.clip((longest - (16 - 6)) / 6, 0.0, 1.0))
    np.testing.assert_allclose(without - with_penalty, expected, atol=1e-6)
    transcript = np.maximum(r.mask, r.observation_mask).sum(-1)
    assert (transcript > 16).any() and (np.asarray(expected)[transcript > 16] < 1.0).any()
