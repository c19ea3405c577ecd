"""Micro-batches change memory and time, never the update; failed rewards count in no denominator.

`train.micro_batch_size` splits every forward/backward pass of an update (and of `prepare`)
into micro-batches of whole prompt groups and adds up their gradients, with the whole batch's
loss denominators and with the batch-wide quantities (REINFORCE's baseline, GRPO's and PPO's
advantages) fixed on the whole batch first. For every algorithm and every aggregation mode,
4 micro-batches must give the one-pass gradient, to float32 summation order.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrl_llm.objectives import LOSS_AGGREGATIONS
from jaxrl_llm.training import Trainer
from jaxrl_llm.training.algorithms import Algorithm, merge_micro_batches, split_micro_batches
from tests._tolerances import float32_tolerance
from tests.training.conftest import TINY_POLICY_REDUCTIONS

ALGORITHMS = ("rloo", "reinforce", "vanilla_pg", "grpo", "raft", "ppo")
PROMPTS, K = 4, 4  # N = 16 sequences, micro-batches of 4 = one prompt group each
# Relative: micro-batches sum the same terms in another order (and may run other matmul tilings).
TOLERANCE = float32_tolerance(*TINY_POLICY_REDUCTIONS, PROMPTS * K)


@pytest.fixture(scope="module")
def stepped_trainers(tiny_policy_dir, tmp_path_factory):
    """One trainer per (algorithm, overrides) and a rollout of its policy."""
    from jaxrl_llm.training import load_config

    cache = {}

    def get(algo, *updates):
        if (algo, updates) not in cache:
            config = load_config(None, [
                f"model.path={tiny_policy_dir}", f"train.run_dir={tmp_path_factory.mktemp('run')}",
                f"algo.name={algo}", "reward.terms=[{kind: python, target: 'toy_rewards:fraction_of_sevens'}]",
                f"rollout.prompts_per_step={PROMPTS}", f"algo.num_samples={K}", "rollout.max_new_tokens=4",
                "optim.learning_rate=0.03", "algo.kl_coef=0.1", "algo.entropy_coef=0.05", "task.num_eval=8",
                "train.progress=false", "train.plot=false", "train.tensorboard=false", "algo.critic=separate",
                *updates,
            ])
            trainer = Trainer(config)
            batch = trainer.collect()[0]
            # Move the policy off the reference, so that the KL terms and the ratio matter.
            noisy = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(1), p.shape, p.dtype),
                                 trainer.state.params)
            trainer.state = trainer.state.replace(params=noisy)
            # Two failed rewards: the denominators must count only what the loss counts.
            valid = np.asarray(batch.valid).copy()
            valid[[1, 6]] = False
            cache[algo, updates] = trainer, batch._replace(valid=jnp.asarray(valid))
        return cache[algo, updates]

    return get


def update_gradient(trainer, algo_config, batch, micro_batch_size, prepared=None):
    """`(loss, aux, grads)` of the first update of a step with `algo_config`, from prepare on
    (`prepared`: the `(state, train_batch)` of an earlier call with the same micro-batch size)."""
    algorithm = Algorithm(algo_config, graphdef=trainer.graphdef, critic_graphdef=trainer.algorithm.critic_graphdef,
                          temperature=trainer.config.rollout.temperature, chunk_size=None,
                          micro_batch_size=micro_batch_size)
    state, train_batch = prepared or jax.jit(algorithm.prepare)(trainer.state, batch)[:2]
    if not algorithm.single_update:  # the first minibatch: half the groups
        rows = jnp.arange(batch.tokens.shape[0] // 2)
        train_batch = jax.tree.map(lambda x: x[rows] if jnp.ndim(x) >= 1 else x, train_batch)
    (loss, (aux, _)), grads = jax.jit(algorithm.value_and_grad)(state.params, train_batch)
    return float(loss), aux, grads


def prepared(trainer, batch, micro_batch_size):
    """`prepare` of the trainer's algorithm (it does not depend on the aggregation mode)."""
    algorithm = Algorithm(trainer.config.algo, graphdef=trainer.graphdef,
                          critic_graphdef=trainer.algorithm.critic_graphdef,
                          temperature=trainer.config.rollout.temperature, chunk_size=None,
                          micro_batch_size=micro_batch_size)
    return jax.jit(algorithm.prepare)(trainer.state, batch)[:2]


def assert_same_update(whole, micro):
    loss, aux, grads = whole
    micro_loss, micro_aux, micro_grads = micro
    np.testing.assert_allclose(micro_loss, loss, rtol=TOLERANCE, atol=TOLERANCE)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads))
    assert scale > 1e-4  # a real update
    for a, b in zip(jax.tree.leaves(micro_grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=TOLERANCE, atol=TOLERANCE * scale)
    for key in aux:  # the metrics' sums and counts add up to the whole batch's (float32 sums of
        # O(1) values: a mean near 0, as whitened advantages have, differs in the 7th digit)
        np.testing.assert_allclose(float(micro_aux[key].mean), float(aux[key].mean), rtol=1e-5, atol=1e-6,
                                   err_msg=key)


def check_every_aggregation(stepped_trainers, algo, aggregations):
    trainer, batch = stepped_trainers(algo)
    micro_size = PROMPTS * K // 4
    whole_prepared, micro_prepared = prepared(trainer, batch, None), prepared(trainer, batch, micro_size)
    for aggregation in aggregations:
        algo_config = dataclasses.replace(trainer.config.algo, aggregation=aggregation)
        whole = update_gradient(trainer, algo_config, batch, None, whole_prepared)
        micro = update_gradient(trainer, algo_config, batch, micro_size, micro_prepared)
        assert_same_update(whole, micro)


# Each algorithm with a different mode, so that CI sees every algorithm and every mode; the
# whole algorithm x mode matrix runs with the slow tests.
ONE_MODE_EACH = {"rloo": "seq-mean-token-sum", "reinforce": "token-mean", "vanilla_pg": "seq-mean-token-mean",
                 "grpo": "seq-mean-token-sum-norm", "raft": "seq-mean-token-sum", "ppo": "seq-mean-token-mean"}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_four_micro_batches_give_the_one_pass_update(stepped_trainers, algo):
    check_every_aggregation(stepped_trainers, algo, [ONE_MODE_EACH[algo]])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_four_micro_batches_give_the_one_pass_update_for_every_aggregation(stepped_trainers, algo):
    check_every_aggregation(stepped_trainers, algo, LOSS_AGGREGATIONS)


@pytest.mark.parametrize("algo", [pytest.param("rloo", marks=pytest.mark.slow), "ppo"])
def test_micro_batches_inside_minibatches_give_the_same_update(stepped_trainers, algo):
    trainer, batch = stepped_trainers(algo, "algo.update_epochs=2", "algo.num_minibatches=2")
    whole = update_gradient(trainer, trainer.config.algo, batch, None)
    micro = update_gradient(trainer, trainer.config.algo, batch, K)
    assert_same_update(whole, micro)


def test_reinforce_with_an_ema_baseline_in_micro_batches(stepped_trainers):
    trainer, batch = stepped_trainers("reinforce", "algo.baseline=ema")
    assert_same_update(update_gradient(trainer, trainer.config.algo, batch, None),
                       update_gradient(trainer, trainer.config.algo, batch, 2 * K))


def first_update(trainer, algo_config, batch, prepared=None):
    """`(grads, prepared)`: the gradient of a step's first update with `algo_config` (with several
    epochs, its one minibatch is the whole batch) and the `(state, train_batch)` of `prepare`
    (which does not depend on the aggregation mode: pass it back to skip it)."""
    algorithm = Algorithm(algo_config, graphdef=trainer.graphdef, critic_graphdef=trainer.algorithm.critic_graphdef,
                          temperature=trainer.config.rollout.temperature, chunk_size=None)
    prepared = prepared or jax.jit(algorithm.prepare)(trainer.state, batch)[:2]
    _, grads = jax.jit(algorithm.value_and_grad)(prepared[0].params, prepared[1])
    return [np.asarray(g) for g in jax.tree.leaves(grads)], prepared


def with_failed_groups(train_batch):
    """A prepared one-update batch followed by as many groups again (the same rows, so the same
    reference log-probabilities), every reward of which failed."""
    failed = train_batch._replace(rollout=train_batch.rollout._replace(valid=jnp.zeros_like(train_batch.rollout.valid)))
    return jax.tree.map(lambda a, b: np.concatenate([a, b]) if np.ndim(a) else a, train_batch, failed)


def check_failed_rows_count_nowhere(stepped_trainers, algo, aggregations, cases=("two epochs", "failed groups appended")):
    """With 2 of 16 rewards failed, the first update's gradient is the same with one update per
    batch, with two epochs (the clipped-ratio path, ratio 1 at its first update) and with as many
    failed groups again appended: failed rows are out of every denominator (policy loss, value
    loss, entropy bonus), not only out of the numerators."""
    trainer, batch = stepped_trainers(algo)
    prepared = {}
    for aggregation in aggregations:
        configs = {epochs: dataclasses.replace(trainer.config.algo, aggregation=aggregation, update_epochs=epochs)
                   for epochs in (1, 2)}
        reference, prepared[1] = first_update(trainer, configs[1], batch, prepared.get(1))
        others = {}
        if "two epochs" in cases:
            others["two epochs"], prepared[2] = first_update(trainer, configs[2], batch, prepared.get(2))
        if "failed groups appended" in cases:
            state, train_batch = prepared[1]
            others["failed groups appended"], _ = first_update(trainer, configs[1], None,
                                                               (state, with_failed_groups(train_batch)))
        scale = max(float(np.abs(g).max()) for g in reference)
        assert scale > 1e-4  # a real update
        for name, grads in others.items():
            for a, b in zip(grads, reference):
                np.testing.assert_allclose(a, b, rtol=TOLERANCE, atol=TOLERANCE * scale,
                                           err_msg=f"{algo}, {aggregation}: {name}")


# In CI, a sequence-mean mode (where a row counts by itself) and one comparison each: the bandit
# algorithms' single update already drops failed rows, so their multi-update path is the one to
# compare; GRPO, PPO and RAFT use one path for both, so failed groups are appended. (The modes of
# ONE_MODE_EACH but for reinforce's: few new programs to compile.) The slow tests run everything.
SEQ_MODE_EACH = {**ONE_MODE_EACH, "reinforce": "seq-mean-token-sum-norm"}
CI_CASE = {"rloo": "two epochs", "reinforce": "two epochs", "vanilla_pg": "two epochs",
           "grpo": "failed groups appended", "raft": "failed groups appended", "ppo": "failed groups appended"}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_failed_rewards_count_in_no_denominator(stepped_trainers, algo):
    check_failed_rows_count_nowhere(stepped_trainers, algo, [SEQ_MODE_EACH[algo]], cases=[CI_CASE[algo]])


@pytest.mark.slow
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_failed_rewards_count_in_no_denominator_for_every_aggregation(stepped_trainers, algo):
    check_failed_rows_count_nowhere(stepped_trainers, algo, LOSS_AGGREGATIONS)


def test_micro_batches_hold_whole_groups_spread_over_the_batch():
    rows = jnp.arange(24)  # 6 groups of 4
    split = split_micro_batches(rows, 3, 4)
    assert split.shape == (3, 8)
    np.testing.assert_array_equal(split[0], [0, 1, 2, 3, 12, 13, 14, 15])  # groups 0 and 3
    np.testing.assert_array_equal(merge_micro_batches(split, 4), rows)


def test_micro_batch_size_must_divide_the_update_into_whole_groups(toy_config):
    with pytest.raises(ValueError, match="train.micro_batch_size.*multiple of algo.num_samples=4"):
        toy_config("train.micro_batch_size=6")
    with pytest.raises(ValueError, match="train.micro_batch_size.*divides the 32"):
        toy_config("train.micro_batch_size=12")
    with pytest.raises(ValueError, match="rollout.micro_batch_size"):
        toy_config("rollout.micro_batch_size=3")


def test_a_trainer_step_in_micro_batches_trains_like_one_pass(toy_config, plain_sgd, tmp_path):
    """End to end through `Trainer.step`: sampler and update both in micro-batches (SGD steps, so
    that the parameters differ by what the gradients do, see `plain_sgd`)."""
    whole = Trainer(toy_config(f"train.run_dir={tmp_path / 'a'}"))
    micro = Trainer(toy_config(f"train.run_dir={tmp_path / 'b'}", "train.micro_batch_size=8"))
    for _ in range(2):  # the second step samples from the updated policies
        a, b = whole.step(), micro.step()
        np.testing.assert_allclose(b["loss/total"], a["loss/total"], rtol=1e-5, atol=1e-6)
    for x, y in zip(jax.tree.leaves(micro.state.params), jax.tree.leaves(whole.state.params)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=2e-7)


def test_the_samplers_micro_batch_size_changes_no_completion(toy_config):
    """`rollout.micro_batch_size` is a memory knob: each completion's randomness is keyed by its
    row in the step's batch, so sampling 32 sequences whole, 8 or 16 at a time gives the same."""
    trainer, batches = Trainer(toy_config()), []
    for size in (None, 8, 16):
        trainer.config.rollout.micro_batch_size, trainer.data_position = size, 0  # the same step's prompts
        batches.append(trainer.collect()[0])
    assert batches[0].tokens.shape == (32, 4)
    for batch in batches[1:]:
        np.testing.assert_array_equal(batch.tokens, batches[0].tokens)
        np.testing.assert_array_equal(batch.mask, batches[0].mask)


def test_the_engines_slots_change_no_completion_and_reach_the_engine(toy_config, monkeypatch):
    """`rollout.slots` is a memory knob too: 4 slots (one prompt's samples at a time, the rest
    queued) or 12 give the completions of all 32 at once; the engine got the value."""
    from jaxrl_llm.rollout import engine

    seen, run = [], engine.run
    monkeypatch.setattr(engine, "run", lambda *a, slots, **k: seen.append(slots) or run(*a, slots=slots, **k))
    trainer, batches = Trainer(toy_config("rollout.max_new_tokens=12", "mesh.data=1")), []  # one device: the engine
    for slots in (None, 4, 12):
        trainer.config.rollout.slots, trainer.data_position = slots, 0  # the same step's prompts
        batches.append(trainer.collect()[0])
    assert seen == [None, 4, 12]
    lengths = np.asarray(batches[0].mask).sum(axis=1)
    assert lengths.min() < 12, "no completion ended early: the queue and refills are not exercised"
    for batch in batches[1:]:
        np.testing.assert_array_equal(batch.tokens, batches[0].tokens)
        np.testing.assert_array_equal(batch.mask, batches[0].mask)
    with pytest.raises(ValueError, match=r"rollout.slots`: got 3, expected an integer >= algo.num_samples=4"):
        toy_config("rollout.slots=3")
    with pytest.raises(ValueError, match=r"rollout.slots`: got 4, expected null on a mesh of 4 devices"):
        Trainer(toy_config("rollout.slots=4"))  # the test session's 4 devices: the one-loop sampler


def test_grpo_with_the_batch_std_in_micro_batches(stepped_trainers):
    """`algo.grpo_scale: batch` divides by the std of the whole batch's scores: `prepare` fixes the
    advantages on the whole batch, where each micro-batch's loss would divide by its own std."""
    trainer, batch = stepped_trainers("grpo", "algo.grpo_scale=batch")
    scores = np.where(np.asarray(batch.valid), np.asarray(batch.scores), np.nan).reshape(4, -1)
    assert np.nanstd(scores, axis=1).std() > 1e-3  # the groups' spreads differ: the test can fail
    whole = update_gradient(trainer, trainer.config.algo, batch, None)
    micro = update_gradient(trainer, trainer.config.algo, batch, PROMPTS * K // 4)
    assert_same_update(whole, micro)


def test_high_entropy_tokens_are_chosen_on_the_whole_batch(stepped_trainers):
    """`algo.entropy_quantile`: the entropy threshold is the whole batch's quantile (from `prepare`'s
    forward of the sampling policy), not each micro-batch's; truncated completions masked too."""
    trainer, batch = stepped_trainers("rloo", "algo.entropy_quantile=0.5", "algo.mask_truncated_completions=true")
    finished = np.arange(batch.tokens.shape[0]) % 3 != 1
    batch = batch._replace(finished=jnp.asarray(finished))
    whole = update_gradient(trainer, trainer.config.algo, batch, None)
    micro = update_gradient(trainer, trainer.config.algo, batch, PROMPTS * K // 4)
    assert_same_update(whole, micro)


def logged_loss_terms(aux, vf_coef):
    """The loss the logged terms add up to: `loss/policy`, plus `vf_coef * loss/value` with a critic."""
    total = float(aux["loss/policy"].mean)
    return total + vf_coef * float(aux["loss/value"].mean) if "loss/value" in aux else total


def check_logged_losses_are_the_optimised_one(stepped_trainers, algo, aggregations):
    """With 2 failed rewards and 5 truncated completions out of the loss (`mask_truncated_completions`),
    the logged loss terms add up to the loss the gradient is taken of, whole and in micro-batches."""
    trainer, batch = stepped_trainers(algo)
    finished = np.arange(batch.tokens.shape[0]) % 3 != 1
    batch = batch._replace(finished=jnp.asarray(finished))
    for aggregation in aggregations:
        algo_config = dataclasses.replace(trainer.config.algo, aggregation=aggregation, entropy_coef=0.0,
                                          mask_truncated_completions=True)
        for micro_batch_size in (None, PROMPTS * K // 4):
            loss, aux, _ = update_gradient(trainer, algo_config, batch, micro_batch_size)
            assert abs(loss) > 1e-4
            np.testing.assert_allclose(logged_loss_terms(aux, algo_config.vf_coef), loss, rtol=1e-5, atol=1e-7,
                                       err_msg=f"{algo}, {aggregation}, micro-batches of {micro_batch_size}")


EVERY_ALGORITHM = ("rloo", "reinforce", "vanilla_pg", "grpo", "dr_grpo", "gspo", "raft", "ppo")
# In CI a seq-mean mode each (where rows left out used to be counted), every mode in the slow tests.
SEQ_MODE_OF = {**SEQ_MODE_EACH, "dr_grpo": "seq-mean-token-sum-norm", "gspo": "seq-mean-token-sum"}


@pytest.mark.parametrize("algo", EVERY_ALGORITHM)
def test_logged_loss_terms_are_the_optimised_loss_with_rows_left_out(stepped_trainers, algo):
    check_logged_losses_are_the_optimised_one(stepped_trainers, algo, [SEQ_MODE_OF[algo]])


@pytest.mark.slow
@pytest.mark.parametrize("algo", EVERY_ALGORITHM)
def test_logged_loss_terms_are_the_optimised_loss_for_every_aggregation(stepped_trainers, algo):
    check_logged_losses_are_the_optimised_one(stepped_trainers, algo, LOSS_AGGREGATIONS)
