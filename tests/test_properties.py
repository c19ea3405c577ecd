"""Properties that must hold for any input (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

import jaxrl_llm

SETTINGS = settings(max_examples=15, deadline=None)
finite = st.floats(-10, 10, allow_nan=False, width=32)


@st.composite
def grouped_rewards(draw):
    k = draw(st.integers(2, 5))
    groups = draw(st.integers(1, 4))
    rewards = draw(hnp.arrays(np.float32, groups * k, elements=finite))
    return rewards, k


@st.composite
def masked_batch(draw, k=2):
    groups = draw(st.integers(1, 3))
    n, t = groups * k, draw(st.integers(1, 6))
    lengths = draw(hnp.arrays(np.int32, n, elements=st.integers(0, t)))
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.float32)
    arrays = {
        name: draw(hnp.arrays(np.float32, (n, t), elements=st.floats(-5, 0, width=32)))
        for name in ("logprobs", "ref_logprobs", "old_logprobs", "values", "old_values", "returns", "advantages")
    }
    arrays["scores"] = draw(hnp.arrays(np.float32, n, elements=finite))
    arrays["mask"] = mask
    return arrays


@SETTINGS
@given(grouped_rewards(), st.floats(-100, 100, width=32))
def test_rloo_advantages_sum_to_zero_and_ignore_group_offsets(data, offset):
    rewards, k = data
    adv = np.asarray(jaxrl_llm.rloo_advantages(rewards, num_samples=k))
    np.testing.assert_allclose(adv.reshape(-1, k).sum(-1), 0.0, atol=1e-4)
    offsets = np.repeat(np.arange(len(rewards) // k, dtype=np.float32) * offset, k)
    shifted = np.asarray(jaxrl_llm.rloo_advantages(rewards + offsets, num_samples=k))
    np.testing.assert_allclose(shifted, adv, atol=1e-3 * max(1.0, abs(offset)))
    # RLOO is the group-centred reward scaled by K / (K - 1).
    centred = np.asarray(jaxrl_llm.grpo_advantages(rewards, num_samples=k, scale="none"))
    np.testing.assert_allclose(adv, centred * k / (k - 1), atol=1e-4)


def _poison_masked(batch, rng):
    """Replace every per-token entry under mask 0 by garbage, including NaN and inf."""
    poisoned = dict(batch)
    off = batch["mask"] == 0
    for name, x in batch.items():
        if name in ("mask", "scores"):
            continue
        y = x.copy()
        y[off] = rng.choice([np.nan, np.inf, -np.inf, 1e30, -3.0], size=off.sum())
        poisoned[name] = y
    return poisoned


LOSSES = {
    "reinforce": lambda b, lp: jaxrl_llm.reinforce_loss(lp, b["ref_logprobs"], b["scores"], b["mask"], kl_kind="k3"),
    "rloo": lambda b, lp: jaxrl_llm.rloo_loss(lp, b["ref_logprobs"], b["scores"], b["mask"], num_samples=2),
    "ppo": lambda b, lp: jaxrl_llm.ppo_loss(
        lp, b["old_logprobs"], b["advantages"], b["mask"], values=b["values"], old_values=b["old_values"],
        returns=b["returns"], entropy=-b["values"], entropy_coef=0.01, dual_clip=3.0,
        aggregation="seq-mean-token-mean"),
    "grpo": lambda b, lp: jaxrl_llm.grpo_loss(lp, b["old_logprobs"], b["ref_logprobs"], b["scores"], b["mask"]),
    "raft": lambda b, lp: jaxrl_llm.raft_loss(lp, b["scores"], b["mask"], num_samples=2),
    "value": lambda b, lp: jaxrl_llm.value_loss(lp, b["old_values"], b["returns"], b["mask"]),
}


@SETTINGS
@given(masked_batch(), st.sampled_from(sorted(LOSSES)), st.integers(0, 2**16))
def test_values_at_masked_positions_never_change_any_output(batch, name, seed):
    poisoned = _poison_masked(batch, np.random.default_rng(seed))
    fn = LOSSES[name]

    def run(b):
        (loss, aux), grad = jax.value_and_grad(lambda lp: fn(b, lp), has_aux=True)(jnp.asarray(b["logprobs"]))
        return loss, jaxrl_llm.summarize(aux), grad

    expected, actual = run(batch), run(poisoned)
    assert np.isfinite(expected[0])
    np.testing.assert_array_equal(actual[0], expected[0])
    for key in expected[1]:
        np.testing.assert_array_equal(actual[1][key], expected[1][key], err_msg=key)
    np.testing.assert_array_equal(actual[2], expected[2])


@SETTINGS
@given(masked_batch(), st.integers(0, 2**16))
def test_transforms_ignore_masked_positions(batch, seed):
    poisoned = _poison_masked(batch, np.random.default_rng(seed))
    for b_fn in (
        lambda b: jaxrl_llm.gae(b["advantages"], b["values"], b["mask"], gamma=0.9, lam=0.8),
        lambda b: jaxrl_llm.whiten(b["values"], b["mask"]),
        lambda b: jaxrl_llm.shape_rewards(b["scores"], b["logprobs"], b["ref_logprobs"], b["mask"], kl_coef=0.1, kind="k3"),
    ):
        np.testing.assert_array_equal(b_fn(poisoned), b_fn(batch))


@SETTINGS
@given(masked_batch())
def test_gae_with_gamma_lambda_one_is_reward_to_go_minus_value(batch):
    rewards, values, mask = batch["advantages"], batch["values"], batch["mask"]
    adv, ret = jaxrl_llm.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    to_go = np.cumsum((rewards * mask)[:, ::-1], axis=1)[:, ::-1]
    np.testing.assert_allclose(adv, (to_go - values) * mask, atol=1e-4)
    np.testing.assert_allclose(ret, to_go * mask, atol=1e-4)


@settings(max_examples=12, deadline=None)  # each example compiles anew: its shapes are drawn
@given(
    st.integers(1, 3), st.integers(1, 5), st.integers(2, 40), st.integers(1, 20),
    st.floats(0.25, 2.0), st.integers(0, 2**16),
)
def test_chunked_token_logprobs_equal_unchunked(n, t, v, chunk_size, temperature, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 4, size=(n, t, v)).astype(np.float32)
    tokens = rng.integers(0, v, size=(n, t))
    full = jaxrl_llm.token_logprobs(logits, tokens, temperature=temperature)
    chunked = jaxrl_llm.token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size)
    # Two compiled programs may round logits / T differently (a division, or a product with 1/T):
    # the answers can differ by the float32 resolution of the scaled logits (4e-6 at |z| = 50).
    atol = 1e-6 + 2 * np.finfo(np.float32).eps * np.abs(logits / temperature).max()
    np.testing.assert_allclose(chunked, full, rtol=1e-6, atol=atol)
    np.testing.assert_allclose(
        jaxrl_llm.token_entropy(logits, temperature=temperature, chunk_size=chunk_size),
        jaxrl_llm.token_entropy(logits, temperature=temperature), rtol=1e-5, atol=atol)


@SETTINGS
@given(masked_batch())
def test_whiten_gives_zero_mean_unit_variance_on_the_mask(batch):
    x, mask = batch["values"] * 3 + 1, batch["mask"]
    if mask.sum() < 2 or np.var(x[mask > 0]) < 1e-3:
        return
    y = np.asarray(jaxrl_llm.whiten(x, mask))[mask > 0]
    np.testing.assert_allclose(y.mean(), 0.0, atol=1e-4)
    np.testing.assert_allclose(y.var(), 1.0, rtol=1e-3)
    kept = np.asarray(jaxrl_llm.whiten(x, mask, shift_mean=False))[mask > 0]
    np.testing.assert_allclose(kept.mean(), x[mask > 0].mean(), rtol=1e-4, atol=1e-4)


@SETTINGS
@given(st.lists(hnp.arrays(np.float32, 4, elements=finite), min_size=1, max_size=5), st.floats(0.0, 0.99))
def test_ema_baseline_matches_its_formula(batches, decay):
    state, ema = jaxrl_llm.ema_baseline_init(), 0.0
    for i, rewards in enumerate(batches):
        state, baseline = jaxrl_llm.ema_baseline_update(state, rewards, decay=decay)
        expected = rewards.mean() if i == 0 else ema / (1 - decay**i)
        np.testing.assert_allclose(baseline, expected, rtol=1e-4, atol=1e-4)
        ema = decay * ema + (1 - decay) * rewards.mean()
    assert int(state.count) == len(batches)
