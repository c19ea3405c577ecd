"""Bad input raises ValueError naming the argument; degenerate but legal input stays finite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_llm

LP = jnp.zeros((4, 3))
MASK = jnp.ones((4, 3))
SCORES = jnp.ones((4,))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: jaxrl_llm.rloo_loss(LP, LP, SCORES, MASK, num_samples=1), "num_samples"),
        (lambda: jaxrl_llm.rloo_loss(LP, LP, SCORES, MASK, num_samples=3), "divisible by `num_samples`=3"),
        (lambda: jaxrl_llm.rloo_advantages(SCORES, num_samples=2.0), "num_samples"),
        (lambda: jaxrl_llm.grpo_advantages(SCORES, num_samples=3), "divisible"),
        (lambda: jaxrl_llm.grpo_advantages(SCORES, num_samples=2, scale="std"), "`scale`.*'std'"),
        (lambda: jaxrl_llm.reinforce_loss(LP, jnp.zeros((4, 2)), SCORES, MASK), r"`ref_logprobs`.*\(4, 3\).*\(4, 2\)"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, jnp.ones((3,)), MASK), r"`scores`.*\(4,\).*\(3,\)"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES, jnp.ones((4, 2))), "`mask`"),
        (lambda: jaxrl_llm.reinforce_loss(LP[0], LP[0], SCORES, MASK), "`logprobs` must have rank 2"),
        (lambda: jaxrl_llm.reinforce_loss(jnp.zeros((4, 3), jnp.int32), LP, SCORES, MASK), "`logprobs`.*floating.*int32"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES, MASK, kl_kind="k4"), "`kind`.*'k4'"),
        (lambda: jaxrl_llm.kl_penalty(LP, LP, kind="abs"), "`kind`"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES, MASK, aggregation="mean"), "`aggregation`.*'mean'"),
        (lambda: jaxrl_llm.ppo_loss(LP, LP, SCORES, MASK, aggregation="sum"), "`aggregation`"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES, MASK, nonfinite_scores="ignore"), "`nonfinite_scores`"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES.at[2].set(jnp.nan), MASK), r"`scores`.*non-finite.*index \(2,\)"),
        (lambda: jaxrl_llm.rloo_loss(LP, LP, SCORES.at[0].set(jnp.inf), MASK, num_samples=2), "`scores`.*non-finite"),
        (lambda: jaxrl_llm.reinforce_loss(LP, LP, SCORES, MASK, baseline=jnp.ones((3,))), "`baseline`"),
        (lambda: jaxrl_llm.ppo_loss(LP, LP, jnp.ones((4, 2)), MASK), "`advantages`"),
        (lambda: jaxrl_llm.ppo_loss(LP, LP, SCORES, MASK, values=LP), "`values`, `old_values` and `returns`"),
        (lambda: jaxrl_llm.ppo_loss(LP, LP, SCORES, MASK, clip_eps=-0.1), "`clip_eps`"),
        (lambda: jaxrl_llm.ppo_loss(LP, LP, SCORES, MASK, dual_clip=0.5), "`dual_clip`"),
        (lambda: jaxrl_llm.gae(LP, jnp.zeros((4, 4)), MASK), "`values`"),
        (lambda: jaxrl_llm.whiten(LP, jnp.ones((4,))), "`mask`"),
        (lambda: jaxrl_llm.token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32)), "`logits` must have rank 3"),
        (lambda: jaxrl_llm.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3))), "`tokens`.*integer"),
        (lambda: jaxrl_llm.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), temperature=0.0), "`temperature`"),
        (lambda: jaxrl_llm.token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3), jnp.int32), chunk_size=0), "`chunk_size`"),
        (lambda: jaxrl_llm.ema_baseline_update(jaxrl_llm.ema_baseline_init(), SCORES, decay=1.0), "`decay`"),
        (lambda: jaxrl_llm.raft_loss(LP, SCORES, MASK, num_samples=3), "divisible"),
    ],
)
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_shape_errors_are_raised_under_jit_too():
    with pytest.raises(ValueError, match="num_samples"):
        jax.jit(lambda lp: jaxrl_llm.rloo_loss(lp, lp, SCORES, MASK, num_samples=3))(LP)


def test_nonfinite_scores_can_be_masked():
    rng = np.random.default_rng(0)
    lp = jnp.asarray(-rng.random((6, 3)), jnp.float32)
    scores = jnp.array([1.0, jnp.nan, 0.0, 2.0, jnp.inf, 1.0])
    fn = lambda lp: jaxrl_llm.rloo_loss(lp, lp, scores, MASK[:1].repeat(6, 0), num_samples=3,
                                       nonfinite_scores="mask")
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(lp)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[1], 0.0)  # the NaN sample has no gradient
    np.testing.assert_array_equal(grad[4], 0.0)
    # Its group-mates use only each other: A = [1 - 0, -, 0 - 1] for group 0.
    np.testing.assert_allclose(jaxrl_llm.rloo_advantages(jnp.where(jnp.isfinite(scores), scores, 0.0),
                                                         num_samples=3, valid=jnp.isfinite(scores)),
                               [1.0, 0.0, -1.0, 1.0, 0.0, -1.0])
    np.testing.assert_allclose(aux["completion/valid"].mean, 4 / 6)


@pytest.mark.parametrize("name", ["reinforce", "rloo", "ppo", "grpo", "raft"])
def test_all_zero_mask_row_gives_finite_loss_and_zero_gradient(name):
    mask = MASK.at[1].set(0.0)
    lp = jnp.asarray(np.random.default_rng(1).normal(size=(4, 3)), jnp.float32).at[1].set(jnp.nan)
    fns = {
        "reinforce": lambda x: jaxrl_llm.reinforce_loss(x, x, SCORES, mask)[0],
        "rloo": lambda x: jaxrl_llm.rloo_loss(x, x * 0.9, SCORES, mask, num_samples=2)[0],
        "ppo": lambda x: jaxrl_llm.ppo_loss(x, x * 0.9, SCORES, mask, dual_clip=3.0)[0],
        "grpo": lambda x: jaxrl_llm.grpo_loss(x, x * 0.9, x * 1.1, SCORES, mask)[0],
        "raft": lambda x: jaxrl_llm.raft_loss(x, SCORES, mask, num_samples=2)[0],
    }
    loss, grad = jax.value_and_grad(fns[name])(lp)
    assert np.isfinite(loss)
    assert np.isfinite(grad).all()
    np.testing.assert_array_equal(grad[1], 0.0)


def test_empty_batch_mask_gives_zero_loss_not_nan():
    loss, aux = jaxrl_llm.ppo_loss(LP, LP, SCORES, jnp.zeros((4, 3)))
    assert float(loss) == 0.0
    assert float(aux["clipfrac"].mean) == 0.0
