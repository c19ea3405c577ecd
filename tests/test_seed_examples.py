"""The source document's REINFORCE and RLOO pseudocode, run as written in PyTorch, against ours."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxrl_llm

KL_BETA = 0.1

REINFORCE_LOGPROBS = [[-12.3, -8.3, -2.3], [-10.0, -7.0, -3.0]]
REINFORCE_REF = [[-11.3, -8.4, -2.0], [-9.5, -7.2, -2.8]]
REINFORCE_SCORES = [1.0, 0.5]

RLOO_LOGPROBS = [
    [[-12.3, -8.3, -2.3], [-10.0, -7.0, -3.0], [-10.5, -12.2, -9.1]],
    [[-11.0, -10.3, -1.3], [-11.1, -11.1, -0.8], [-8.2, -11.9, -0.1]],
    [[-1.8, -2.1, -0.2], [-0.7, -3.5, -0.1], [-1.0, -2.2, -1.1]],
]
RLOO_REF = [
    [[-11.8, -8.4, -2.3], [-10.1, -7.2, -3.1], [-10.3, -12.9, -9.1]],
    [[-11.8, -9.7, -1.3], [-12.3, -11.9, -0.2], [-8.1, -12.0, -0.5]],
    [[-2.7, -2.0, -1.2], [-0.7, -3.6, -0.2], [-0.7, -1.2, -0.9]],
]
RLOO_SCORES = [[1, 2, 3], [2, 3, 4], [3, 4, 5]]


def seed_reinforce(dtype=torch.float32):
    """The seed's REINFORCE pseudocode, verbatim but for the dtype and returning loss and gradient."""
    per_token_logprobs = torch.tensor(REINFORCE_LOGPROBS, requires_grad=True, dtype=dtype)
    reference_per_token_logprobs = torch.tensor(REINFORCE_REF, dtype=dtype)
    kl_div = per_token_logprobs - reference_per_token_logprobs
    kl_div = -KL_BETA * kl_div
    score_from_rm = torch.tensor(REINFORCE_SCORES, dtype=dtype)
    per_token_reward = kl_div.clone()
    per_token_reward[range(per_token_reward.size(0)), -1] += score_from_rm
    entire_completion_reward = per_token_reward.sum(dim=1)
    baseline = entire_completion_reward.mean().detach()
    advantage = entire_completion_reward - baseline
    reinforce_loss = -per_token_logprobs.sum(dim=1) * advantage
    reinforce_loss.mean().backward()
    return reinforce_loss.mean().item(), per_token_logprobs.grad.numpy()


def seed_rloo(dtype=torch.float32):
    """The seed's RLOO pseudocode (K=3, three prompts), verbatim but for the dtype and the returns."""
    K = 3
    per_token_logprobs = torch.tensor(RLOO_LOGPROBS, requires_grad=True, dtype=dtype)
    reference_per_token_logprobs = torch.tensor(RLOO_REF, dtype=dtype)
    kl_div = per_token_logprobs - reference_per_token_logprobs
    kl_div = -KL_BETA * kl_div
    score_from_rm = torch.tensor(RLOO_SCORES).to(dtype)
    per_token_reward = kl_div.clone()
    per_token_reward[:, :, -1] += score_from_rm
    entire_completion_reward = per_token_reward.sum(dim=-1)
    baseline = (entire_completion_reward.sum(dim=-1)[:, None] - entire_completion_reward) / (K - 1)
    baseline = baseline.detach()
    advantage = entire_completion_reward - baseline
    rloo_loss = -per_token_logprobs.sum(dim=-1) * advantage
    rloo_loss.mean().backward()
    return rloo_loss.mean().item(), per_token_logprobs.grad.numpy().reshape(9, 3)


def ours_reinforce(logprobs):
    dtype = logprobs.dtype
    return jaxrl_llm.reinforce_loss(
        logprobs,
        jnp.array(REINFORCE_REF, dtype),
        jnp.array(REINFORCE_SCORES, dtype),
        jnp.ones((2, 3)),
        kl_coef=KL_BETA,
    )[0]


def ours_rloo(logprobs):
    dtype = logprobs.dtype
    return jaxrl_llm.rloo_loss(
        logprobs,
        jnp.array(RLOO_REF, dtype).reshape(9, 3),
        jnp.array(RLOO_SCORES, dtype).reshape(9),
        jnp.ones((9, 3)),
        num_samples=3,
        kl_coef=KL_BETA,
    )[0]


EXAMPLES = {
    "reinforce": (seed_reinforce, ours_reinforce, REINFORCE_LOGPROBS),
    "rloo": (seed_rloo, ours_rloo, RLOO_LOGPROBS),
}


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("which", ["reinforce", "rloo"])
def test_loss_equals_seed_value_float64(which, jit):
    """In float64 on both sides the agreement is exact to 1e-6 relative (and far better)."""
    seed, ours, logprobs = EXAMPLES[which]
    expected, _ = seed(torch.float64)
    fn = jax.jit(ours) if jit else ours
    with jax.enable_x64(True):
        value = fn(jnp.asarray(np.asarray(logprobs, np.float64).reshape(-1, 3)))
        assert value.dtype == jnp.float64
    np.testing.assert_allclose(float(value), expected, rtol=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("which", ["reinforce", "rloo"])
def test_loss_equals_seed_value_float32(which, jit):
    """In float32 the loss is a difference of nearly equal terms; both sides round to ~4e-6."""
    seed, ours, logprobs = EXAMPLES[which]
    expected, _ = seed()
    fn = jax.jit(ours) if jit else ours
    np.testing.assert_allclose(fn(jnp.array(logprobs).reshape(-1, 3)), expected, rtol=1e-5)


def test_seed_reinforce_value_by_hand():
    # R = score - 0.1 * sum(logp - ref): [1 + 0.08, 0.5 + 0.01] -> mean 0.795; A = [0.285, -0.285]
    # loss = mean(-sum(logp) * A) = (22.9 * 0.285 - 20 * 0.285) / 2 = 0.41325
    np.testing.assert_allclose(ours_reinforce(jnp.array(REINFORCE_LOGPROBS)), 0.41325, rtol=1e-5)


@pytest.mark.parametrize("which", ["reinforce", "rloo"])
def test_gradient_treats_advantage_as_constant_unlike_seed(which):
    """Ours: d loss / d logp[n, t] = -A_n / N. The seed adds kl_beta * sum_t logp[n] / N,
    the gradient that leaks through the KL term inside its reward."""
    if which == "reinforce":
        _, seed_grad = seed_reinforce()
        logprobs = jnp.array(REINFORCE_LOGPROBS)
        grad = jax.grad(ours_reinforce)(logprobs)
        rewards = jnp.array(REINFORCE_SCORES) - KL_BETA * jnp.sum(logprobs - jnp.array(REINFORCE_REF), -1)
        advantages = jaxrl_llm.reinforce_advantages(rewards)
    else:
        _, seed_grad = seed_rloo()
        logprobs = jnp.array(RLOO_LOGPROBS).reshape(9, 3)
        grad = jax.grad(ours_rloo)(logprobs)
        rewards = jnp.array(RLOO_SCORES, jnp.float32).reshape(9) - KL_BETA * jnp.sum(
            logprobs - jnp.array(RLOO_REF).reshape(9, 3), -1
        )
        advantages = jaxrl_llm.rloo_advantages(rewards, num_samples=3)
    n = logprobs.shape[0]
    np.testing.assert_allclose(grad, np.broadcast_to(-advantages[:, None] / n, grad.shape), rtol=1e-5, atol=1e-7)
    leak = KL_BETA * np.sum(np.asarray(logprobs), -1, keepdims=True) / n
    assert np.abs(leak).max() > 0.05  # the difference is real, not a rounding error
    np.testing.assert_allclose(seed_grad - np.asarray(grad), np.broadcast_to(leak, grad.shape), rtol=1e-5, atol=1e-6)
