"""The trainer end to end on a tiny random policy: every algorithm learns, resume is exact,
4 devices equal 1, checkpoints hold what they should."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.training import ALGORITHMS, Checkpointer, Trainer


def params_of(trainer):
    return jax.tree.map(np.asarray, trainer.state.params)


def assert_trees_equal(a, b, **tol):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if tol:
            np.testing.assert_allclose(x, y, **tol)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_raises_the_reward(toy_config, algo):
    extra = {"ppo": ["optim.learning_rate=0.005", "algo.update_epochs=2", "algo.num_minibatches=2"],
             "raft": ["optim.learning_rate=0.02"]}.get(algo, [])
    trainer = Trainer(toy_config("train.steps=12", *extra, algo=algo))
    rewards = [trainer.step()["reward/mean"] for _ in range(12)]
    early, late = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert late > early + 0.1, (algo, rewards)


def test_resume_is_bit_identical(toy_config, tmp_path):
    straight = Trainer(toy_config("train.steps=4", f"train.run_dir={tmp_path / 'straight'}"))
    straight.run()
    first = Trainer(toy_config("train.steps=2", f"train.run_dir={tmp_path / 'resumed'}"))
    first.run()
    resumed = Trainer(toy_config("train.steps=4", f"train.run_dir={tmp_path / 'resumed'}"), resume=True)
    assert int(resumed.state.step) == 2 and resumed.data_position == 2 * 8
    resumed.run()
    assert_trees_equal(params_of(resumed), params_of(straight))
    assert_trees_equal(jax.tree.map(np.asarray, resumed.state.opt_state), jax.tree.map(np.asarray, straight.state.opt_state))
    rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]
    straight_rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("reward/mean") for r in rows] == [r.get("reward/mean") for r in straight_rows]


@pytest.mark.parametrize("mesh,algo", [(["mesh.data=4"], "rloo"), (["mesh.data=2", "mesh.fsdp=2"], "ppo")])
def test_four_devices_equal_one(toy_config, tmp_path, mesh, algo):
    if jax.device_count() < 4:
        pytest.skip("needs 4 devices")
    one = Trainer(toy_config("mesh.data=1", f"train.run_dir={tmp_path / 'one'}", algo=algo))
    many = Trainer(toy_config(*mesh, f"train.run_dir={tmp_path / 'many'}", algo=algo))
    leaf = jax.tree.leaves(many.state.params["policy"])[0]
    assert len(leaf.sharding.device_set) == 4
    for _ in range(2):
        m1, m4 = one.step(), many.step()
        for key in ("reward/mean", "loss/policy", "kl", "entropy"):
            np.testing.assert_allclose(m4[key], m1[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # Adam's update m / sqrt(v) amplifies reduction-order noise where gradients nearly
    # cancel across steps: compare parameters to a small fraction of the learning rate (0.01).
    assert_trees_equal(params_of(many), params_of(one), rtol=1e-4, atol=2e-4)


@pytest.mark.parametrize("algo,has_critic,has_reference", [("rloo", False, True), ("ppo", True, True),
                                                            ("raft", False, False)])
def test_value_head_only_in_ppo_checkpoints(toy_config, algo, has_critic, has_reference):
    trainer = Trainer(toy_config("train.steps=1", algo=algo))
    summary = trainer.run()
    if has_critic:
        assert {"loss/value", "value/error", "clipfrac"} <= set(summary)
    keys = Checkpointer(trainer.run_dir / "checkpoints").stored_keys()
    assert any(k.startswith("params/policy/") for k in keys)
    # RAFT has no reference term: no reference copy in memory or in the checkpoint.
    assert any(k.startswith("ref_params/") for k in keys) == has_reference
    assert (trainer.state.ref_params is not None) == has_reference
    assert any("critic" in k for k in keys) == has_critic
    assert ("critic" in trainer.state.params) == has_critic
    resumed = Trainer(toy_config("train.steps=2", algo=algo), resume=True)  # and it restores
    assert int(resumed.state.step) == 1


def test_run_directory_has_metrics_checkpoint_tensorboard_and_plot(toy_config):
    trainer = Trainer(toy_config("train.steps=2", "train.eval_every=1", "train.plot=true", "train.tensorboard=true",
                                 "task.num_eval=8"))
    summary = trainer.run()
    run = trainer.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    required = {"step", "reward/mean", "reward/std", "kl", "entropy", "loss/policy", "clipfrac",
                "completion/mean_length", "completion/eos_fraction", "step_time_s", "tokens_per_s", "eval/accuracy"}
    assert required <= set(rows[-1]), required - set(rows[-1])
    assert (run / "curves.png").stat().st_size > 1000
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert Checkpointer(run / "checkpoints").latest_step() == 2
    assert "eval/accuracy_before" in summary and "eval/accuracy_after" in summary


def test_reward_errors_name_the_function_and_sample(toy_config):
    trainer = Trainer(toy_config("reward.terms=[{kind: python, target: 'toy_rewards:broken'}]",
                                 "rollout.max_new_tokens=8"))
    with pytest.raises(ValueError, match=r"toy_rewards:broken raised RuntimeError: cannot score a 3 on sample \d+"):
        for _ in range(5):
            trainer.step()


def test_nan_rewards_are_masked_when_asked(toy_config):
    trainer = Trainer(toy_config("reward.terms=[{kind: python, target: 'toy_rewards:nan_on_five'}]",
                                 "reward.on_error=mask", "rollout.max_new_tokens=8"))
    metrics = [trainer.step() for _ in range(2)]
    assert any(m["reward/valid_fraction"] < 1.0 for m in metrics)
    assert all(np.isfinite(m["loss/total"]) for m in metrics)


def test_separate_critic_trains(toy_config):
    trainer = Trainer(toy_config("algo.critic=separate", algo="ppo"))
    before = jax.tree.map(np.asarray, trainer.state.params["critic"])
    metrics = [trainer.step() for _ in range(2)]
    assert all(np.isfinite(m["loss/value"]) for m in metrics)
    after = jax.tree.map(np.asarray, trainer.state.params["critic"])
    # The critic has its own backbone, and it moved.
    assert len(jax.tree.leaves(after)) > 2
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


def test_export_loads_in_transformers_with_the_trained_logits(toy_config, tmp_path):
    import torch
    import transformers
    from flax import nnx

    from jaxrl_llm.training import export

    trainer = Trainer(toy_config("train.steps=2"))
    trainer.run()
    out, step = export(trainer.config, tmp_path / "exported")
    assert step == 2
    assert len((trainer.run_dir / "metrics.jsonl").read_text().splitlines()) == 3  # the run's logs survive
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = np.array([[4, 5, 14, 6, 15, 7]], np.int32)
    ours = nnx.merge(trainer.graphdef, trainer.state.params["policy"])(ids)
    with torch.no_grad():
        theirs = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=1e-4)
    start = Trainer(toy_config("train.steps=2"))  # untrained: the export must differ from it
    assert not np.allclose(np.asarray(nnx.merge(start.graphdef, start.state.params["policy"])(ids)), theirs, atol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(out).decode([4, 5]) == "01"


def test_reward_normalization_changes_the_update_not_the_logged_rewards(toy_config):
    """`reward.normalize` whitens the rewards the update sees; the logged rewards (and the
    progress bar's) stay raw, so a run's progress shows."""
    trainer = Trainer(toy_config())
    start = jax.tree.map(jnp.copy, trainer.state)
    metrics, params = [], []
    for normalize in (False, True):  # the same step from the same state, with and without
        trainer.state, trainer.data_position = jax.tree.map(jnp.copy, start), 0
        trainer.reward_fn.normalize = normalize
        metrics.append(trainer.step())
        params.append(jax.tree.leaves(trainer.state.params))
    a, b = metrics
    for key in ("reward/mean", "reward/std", "reward/trained_mean"):
        assert b[key] == a[key], (key, b[key], a[key])
    assert (a["reward/mean"], a["reward/std"]) != pytest.approx((0.0, 1.0), abs=1e-3)  # raw, not whitened
    moved = max(float(np.abs(np.asarray(x) - np.asarray(y)).max()) for x, y in zip(*params))
    assert moved > 1e-4  # the whitened rewards change the update
