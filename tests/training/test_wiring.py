"""How the trainer wires knobs to the update: stop tokens, top-k/top-p, the critic, the forward
passes each algorithm runs, and one meaning of `kl`."""

import dataclasses
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from jaxrl_llm.tasks.tokenizer import VOCAB
from jaxrl_llm.training import Algorithm, Trainer, load_config
from jaxrl_llm.training import algorithms
from jaxrl_llm.training.algorithms import RolloutBatch
from jaxrl_llm.training.algorithms import core as algorithm_core
from jaxrl_llm.training.state import step_keys
from tests._tolerances import float32_tolerance
from tests.training.conftest import TINY_POLICY_REDUCTIONS
from tests.training.test_reference_updates import forward

SEVEN = VOCAB["7"]


def test_generation_config_eos_ids_end_completions(toy_config, tiny_policy_dir, tmp_path):
    """A chat model lists its end-of-turn token in generation_config.json: it must end completions."""
    chat = tmp_path / "chat_model"
    shutil.copytree(tiny_policy_dir, chat)
    transformers.GenerationConfig(eos_token_id=[2, SEVEN]).save_pretrained(chat)
    trainer = Trainer(toy_config(f"model.path={chat}", "rollout.stop_token_ids=[9]", "rollout.max_new_tokens=8"))
    assert trainer.eos_ids == {2, SEVEN, 9}
    batch, samples, *_ = trainer.collect()
    ends = []
    for row, row_mask, sample in zip(np.asarray(batch.tokens), np.asarray(batch.mask), samples):
        kept = row[row_mask > 0]
        assert not np.isin(kept[:-1], [2, SEVEN, 9]).any()  # a completion stops at its first stop token
        assert sample.finished == (kept[-1] in (2, SEVEN, 9))
        ends.append(kept[-1])
    assert SEVEN in ends  # the random policy says '7' often: those completions finished


def test_top_k_top_p_training_logprobs_are_the_samplers(toy_config):
    trainer = Trainer(toy_config("rollout.top_k=5", "rollout.top_p=0.9", algo="grpo"))
    examples = trainer.task.train_batch(0, 8)
    rollout = trainer._sample(examples, trainer._tokenize(examples), step_keys(trainer.state, 0)[0], num_samples=4, temperature=1.0)
    n = rollout.tokens.shape[0]
    batch = RolloutBatch(rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask,
                         jnp.asarray(np.random.default_rng(0).random(n), jnp.float32), jnp.ones(n, bool))
    mask = np.asarray(rollout.mask) > 0
    recomputed = trainer.algorithm._forward(trainer.state.params["policy"], batch).logprobs
    np.testing.assert_allclose(np.where(mask, recomputed, 0.0), rollout.logprobs, atol=2e-5)
    # The unfiltered softmax would not be the sampling distribution: the test can tell them apart.
    unfiltered = algorithms.policy_forward(trainer.graphdef, trainer.state.params["policy"], batch,
                                           temperature=1.0, chunk_size=None).logprobs
    assert np.abs(np.where(mask, unfiltered, 0.0) - rollout.logprobs).max() > 1e-2
    # First update: the ratio is exactly 1 (one update), and within float error of 1 with several.
    # (Several: the loss's forward and prepare's are two programs, equal to float32 rounding.)
    for update_epochs, tolerance in ((1, 0.0), (2, float32_tolerance(*TINY_POLICY_REDUCTIONS))):
        algorithm = Algorithm(dataclasses.replace(trainer.config.algo, update_epochs=update_epochs),
                              graphdef=trainer.graphdef, temperature=1.0, chunk_size=None, top_k=5, top_p=0.9)
        state, train_batch, _ = jax.jit(algorithm.prepare)(trainer.state, batch)
        _, (aux, _) = jax.jit(algorithm.loss)(state.params, train_batch)
        ratio = aux["ratio"]  # sum of the ratios against their count (a GPU's division is not exact)
        assert abs(float(ratio.total) - float(ratio.count)) <= tolerance * float(ratio.count)
        assert float(aux["clipfrac"].total) == 0.0


def test_ppo_critic_is_separate_by_default():
    assert load_config(None).algo.critic == "separate"
    assert load_config("configs/ppo_arithmetic.yaml").algo.critic == "separate"


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_value_loss_reaches_the_policy_only_through_a_shared_critic(toy_config, critic):
    trainer = Trainer(toy_config(f"algo.critic={critic}", "algo.num_samples=1", "rollout.prompts_per_step=16",
                                 algo="ppo"))
    batch = trainer.collect()[0]

    def policy_grads(vf_coef):
        algorithm = Algorithm(dataclasses.replace(trainer.config.algo, vf_coef=vf_coef), graphdef=trainer.graphdef,
                              critic_graphdef=trainer.algorithm.critic_graphdef, temperature=1.0, chunk_size=None)
        state, train_batch, _ = jax.jit(algorithm.prepare)(trainer.state, batch)
        grads, _ = jax.jit(jax.grad(algorithm.loss, has_aux=True))(state.params, train_batch)
        return grads["policy"]

    low, high = jax.tree.leaves(policy_grads(0.1)), jax.tree.leaves(policy_grads(2.0))
    difference = max(float(jnp.abs(a - b).max()) for a, b in zip(low, high))
    scale = max(float(jnp.abs(a).max()) for a in low)
    if critic == "separate":  # no path from the value loss to the policy (a GPU's reduction order aside)
        assert difference <= float32_tolerance(*TINY_POLICY_REDUCTIONS, scale=scale)
    else:
        assert difference > 1e-4


@pytest.mark.parametrize("algo,extra,forwards", [
    ("rloo", [], 1), ("reinforce", ["algo.baseline=ema"], 1), ("vanilla_pg", [], 1), ("grpo", [], 1),
    ("ppo", [], 1), ("raft", [], 0),  # one update: the reference only (RAFT has none)
    ("rloo", ["algo.update_epochs=2"], 2), ("ppo", ["algo.num_minibatches=2"], 2),  # + the old policy
    ("raft", ["algo.update_epochs=2"], 0),  # RAFT reads no old log-probabilities either
    # One update in micro-batches: a policy pass only where the batch-wide part needs it
    # (REINFORCE's baseline, PPO's whitened advantages), not for RLOO's or GRPO's.
    ("rloo", ["train.micro_batch_size=8"], 1), ("grpo", ["train.micro_batch_size=8"], 1),
    ("reinforce", ["train.micro_batch_size=8"], 2), ("ppo", ["train.micro_batch_size=8"], 2),
])
def test_prepare_runs_only_the_forward_passes_it_reads(toy_config, monkeypatch, algo, extra, forwards):
    calls = []
    real = algorithm_core.policy_forward  # patched where the Algorithm looks it up
    monkeypatch.setattr(algorithm_core, "policy_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = Trainer(toy_config(*extra, algo=algo))
    batch = trainer.collect()[0]
    jax.eval_shape(trainer.algorithm.prepare, trainer.state, batch)
    assert len(calls) == forwards
    calls.clear()
    train_batch = jax.eval_shape(trainer.algorithm.prepare, trainer.state, batch)[1]
    calls.clear()
    jax.eval_shape(trainer.algorithm.loss, trainer.state.params, train_batch)
    assert len(calls) == 1  # the loss's own forward pass


@pytest.mark.parametrize("algo,extra", [
    ("rloo", ["algo.kl_kind=k3"]), ("grpo", []), ("ppo", ["algo.update_epochs=2", "algo.kl_kind=k2"]),
    ("reinforce", ["algo.num_minibatches=2"]),
])
def test_kl_metric_is_k1_of_the_sampling_policy_for_every_algorithm(toy_config, algo, extra):
    trainer = Trainer(toy_config("algo.kl_coef=0.5", "optim.learning_rate=0.05", *extra, algo=algo))
    trainer.step()  # move the policy away from the reference
    batch = trainer.collect()[0]
    mask = np.asarray(batch.mask) * np.asarray(batch.valid)[:, None] > 0
    tokens = np.asarray(batch.tokens)[..., None]
    logp = lambda params: np.take_along_axis(  # noqa: E731
        np.asarray(jax.nn.log_softmax(forward(trainer, params, batch)[0] / 1.0, -1), np.float64), tokens, -1)[..., 0]
    d = (logp(trainer.state.params) - logp({"policy": trainer.state.ref_params}))[mask]
    kind = trainer.algorithm.kl_kind
    estimator = {"k1": d, "k2": 0.5 * d**2, "k3": np.expm1(-d) + d}[kind]
    state, train_batch, prepared = jax.jit(trainer.algorithm.prepare)(trainer.state, batch)
    _, (aux, _) = jax.jit(trainer.algorithm.loss)(state.params, train_batch)
    measured = {key: float(prepared[key]) if key in prepared else float(aux[key].mean) for key in ("kl", "kl/objective")}
    assert abs(d.mean()) > 1e-3
    np.testing.assert_allclose(measured["kl"], d.mean(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(measured["kl/objective"], estimator.mean(), rtol=1e-4, atol=1e-6)
    assert kind == {"grpo": "k3"}.get(algo, {"rloo": "k3", "ppo": "k2"}.get(algo, "k1"))


def test_step_metrics_add_up_the_minibatches_sums(toy_config):
    """With minibatches of different token counts, a metric is over all their tokens, not a mean of means."""
    trainer = Trainer(toy_config("algo.num_minibatches=2", "rollout.max_new_tokens=8", algo="ppo"))
    outputs = []
    update = trainer._update
    trainer._update = lambda *args: outputs.append(update(*args)) or outputs[-1]
    metrics = trainer.step()
    stats = [aux for _, (aux, _) in outputs]
    assert len(stats) == 2 and float(stats[0]["clipfrac"].count) != float(stats[1]["clipfrac"].count)
    for key in ("loss/policy", "clipfrac", "ratio", "advantage", "value/error"):
        exact = sum(float(s[key].total) for s in stats) / sum(float(s[key].count) for s in stats)
        np.testing.assert_allclose(metrics[key], exact, rtol=1e-5, err_msg=key)
    mean_of_means = np.mean([float(s["value/error"].mean) for s in stats])
    assert abs(mean_of_means - metrics["value/error"]) > 1e-6  # the two differ here: the test can tell


def test_execution_keys_reach_the_policy_and_the_critic_and_leave_the_update_unchanged(toy_config, tmp_path):
    """model.remat / scan_layers / attention change how the forward pass runs, never its result."""
    from flax import nnx

    from jaxrl_llm.models.layers import Execution

    keys = ["model.remat=layer", "model.scan_layers=true", "model.attention=blockwise", "model.attention_block=4"]
    plain = Trainer(toy_config(f"train.run_dir={tmp_path / 'a'}", algo="ppo"))
    lean = Trainer(toy_config(f"train.run_dir={tmp_path / 'b'}", *keys, algo="ppo"))
    expected = Execution(remat="layer", scan_layers=True, attention="blockwise", attention_block=4)
    assert nnx.merge(lean.graphdef, lean.state.params["policy"]).execution == expected
    critic = nnx.merge(lean.algorithm.critic_graphdef, lean.state.params["critic"])
    assert critic.backbone.execution == expected  # the separate critic's own backbone
    batch = plain.collect()[0]
    grads = []
    for trainer in (plain, lean):
        state, train_batch, _ = trainer._prepare(jax.tree.map(jnp.copy, trainer.state), batch)
        grads.append(jax.jit(trainer.algorithm.value_and_grad)(state.params, train_batch)[1])
    for a, b in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_logprob_chunks_reach_the_forward_and_leave_the_gradient_unchanged(toy_config):
    """`train.logprob_chunk_size` / `logprob_vocab_chunk_size` are memory knobs: the blocks (here
    rows in 3 blocks and a vocabulary of 16 in overlapping blocks of 5) give the same gradient."""
    trainer = Trainer(toy_config("train.logprob_chunk_size=40", "train.logprob_vocab_chunk_size=5"))
    assert (trainer.algorithm.chunk_size, trainer.algorithm.vocab_chunk_size) == (40, 5)
    rng = np.random.default_rng(0)
    n, prompt, completion = 16, 6, 4  # 64 rows: one block of 40 rows and a tail of 24
    batch = RolloutBatch(jnp.asarray(rng.integers(3, 16, (n, prompt))), jnp.ones((n, prompt), jnp.int32),
                         jnp.asarray(rng.integers(0, 16, (n, completion))), jnp.ones((n, completion), jnp.float32),
                         jnp.asarray(rng.random(n), jnp.float32), jnp.ones(n, bool))
    whole = Algorithm(trainer.config.algo, graphdef=trainer.graphdef, temperature=1.0, chunk_size=None)
    state, train_batch, _ = jax.jit(trainer.algorithm.prepare)(trainer.state, batch)
    grads = [jax.jit(jax.grad(a.loss, has_aux=True))(state.params, train_batch)[0] for a in (trainer.algorithm, whole)]
    for x, y in zip(*map(jax.tree.leaves, grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
