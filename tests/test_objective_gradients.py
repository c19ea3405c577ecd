"""Gradients of every loss term a config key switches on, and the metrics people act on.

A value test cannot see a stop_gradient, so each term here is checked through its gradient
against a PyTorch (float64) or hand-derived reference.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxrl_llm
from tests import torch_reference as ref
from tests._tolerances import float32_tolerance


def close(a, b, **tol):
    b = b.detach().numpy() if isinstance(b, torch.Tensor) else b
    np.testing.assert_allclose(np.asarray(a), b, **(tol or dict(rtol=1e-5, atol=1e-6)))


# -- the entropy bonus (algo.entropy_coef) ---------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_entropy_from_hidden_states_has_its_gradient(chunk_size):
    """The trainer's path (`linear_token_logprobs`) must give the entropy bonus a gradient."""
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 30)).astype(np.float32)
    tokens = rng.integers(0, 30, size=(2, 5))
    h_t, w_t = ref.t(hidden, True), ref.t(w, True)
    ref.token_entropy(h_t @ w_t, 0.7).sum().backward()
    entropy_sum = lambda h, w: jaxrl_llm.linear_token_logprobs(  # noqa: E731
        h, w, tokens, temperature=0.7, chunk_size=chunk_size)[1].sum()
    grads = jax.grad(entropy_sum, argnums=(0, 1))(hidden, w)
    assert float(jnp.abs(grads[1]).max()) > 0.1
    close(grads[0], h_t.grad, rtol=1e-4, atol=1e-5)
    close(grads[1], w_t.grad, rtol=1e-4, atol=1e-5)


def kept_reference(z, top_k, top_p):
    """The top-k then top-p set, from a sort written out plainly (float64)."""
    kept = np.zeros(z.shape, bool)
    for index in np.ndindex(z.shape[:-1]):
        row = z[index]
        order = np.argsort(-row, kind="stable")
        allowed = row >= row[order[top_k - 1]] if top_k else np.ones_like(row, bool)
        p = np.where(allowed, np.exp(row - row.max()), 0.0)
        p = p / p.sum()
        mass_before = 0.0
        for v in order:
            if allowed[v] and mass_before < top_p:
                kept[index + (v,)] = True
            mass_before += p[v]
    return kept


def test_top_k_top_p_logprobs_and_entropy_are_those_of_the_renormalised_distribution():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=2.0, size=(3, 4, 12)).astype(np.float32)
    z = logits.astype(np.float64) / 0.8
    kept = kept_reference(z, top_k=5, top_p=0.9)
    np.testing.assert_array_equal(jaxrl_llm.kept_tokens(logits / np.float32(0.8), top_k=5, top_p=0.9), kept)
    tokens = np.argmax(np.where(kept, rng.random(kept.shape), -1.0), -1)  # tokens the sampler could draw
    z_t = ref.t(logits, True)
    masked = (z_t / 0.8).masked_fill(torch.tensor(~kept), float("-inf"))
    logp = torch.log_softmax(masked, -1)
    expected_lp = logp.gather(-1, torch.tensor(tokens)[..., None])[..., 0]
    logp_kept = logp.masked_fill(torch.tensor(~kept), 0.0)  # removed tokens: p log p = 0
    expected_h = -(logp_kept.exp() * logp_kept * torch.tensor(kept)).sum(-1)
    (expected_lp.sum() + 0.3 * expected_h.sum()).backward()

    def fn(x):
        lp = jaxrl_llm.token_logprobs(x, tokens, temperature=0.8, top_k=5, top_p=0.9)
        h = jaxrl_llm.token_entropy(x, temperature=0.8, top_k=5, top_p=0.9)
        return lp.sum() + 0.3 * h.sum(), (lp, h)

    grad, (lp, h) = jax.grad(fn, has_aux=True)(logits)
    close(lp, expected_lp, rtol=1e-5, atol=1e-5)
    close(h, expected_h, rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(grad)).all()
    close(grad, z_t.grad, rtol=1e-4, atol=1e-5)
    # A token outside the current set (after an update moved it) still has a finite log-probability.
    outside = np.argmin(logits, -1)
    assert np.isfinite(np.asarray(jaxrl_llm.token_logprobs(logits, outside, top_k=2))).all()


def test_ppo_entropy_bonus_gradient_is_minus_its_coefficient_over_the_token_count():
    rng = np.random.default_rng(2)
    lp = -rng.random((4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    entropy = rng.random((4, 3)).astype(np.float32)
    fn = lambda e, c: jaxrl_llm.ppo_loss(lp, lp, np.ones(4, np.float32), mask, entropy=e, entropy_coef=c)[0]  # noqa: E731
    grad = jax.grad(fn)(entropy, 0.05)
    close(grad, -0.05 * mask / mask.sum())


# -- the value loss (algo.vf_coef) and GRPO's KL in the loss (algo.kl_coef) ------------------------


def test_ppo_value_loss_gradient_is_vf_coef_times_the_value_error():
    rng = np.random.default_rng(3)
    lp = -rng.random((4, 3)).astype(np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float32)
    old_values = rng.normal(size=(4, 3)).astype(np.float32)
    values = old_values + 0.05 * rng.normal(size=(4, 3)).astype(np.float32)  # inside the value clip
    returns = rng.normal(size=(4, 3)).astype(np.float32)
    fn = lambda v: jaxrl_llm.ppo_loss(lp, lp, np.ones(4, np.float32), mask, values=v, old_values=old_values,  # noqa: E731
                                      returns=returns, vf_coef=0.3, value_clip=0.2)[0]
    unclipped = (values - returns) ** 2 >= (old_values + np.clip(values - old_values, -0.2, 0.2) - returns) ** 2
    assert unclipped.all()
    close(jax.grad(fn)(values), 0.3 * (values - returns) * mask / mask.sum())


@pytest.mark.parametrize("kl_kind", ["k1", "k2", "k3"])
def test_grpo_kl_in_the_loss_has_the_estimators_gradient(kl_kind):
    rng = np.random.default_rng(4)
    lp = -rng.random((4, 3)) - 0.1
    ref_lp = lp + 0.3 * rng.normal(size=(4, 3))
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float64)
    zero_advantage = np.zeros(4, np.float32)
    fn = lambda x: jaxrl_llm.grpo_loss(x, x, ref_lp.astype(np.float32), zero_advantage, mask,  # noqa: E731
                                       kl_coef=0.1, kl_kind=kl_kind)[0]
    lp_t = ref.t(lp, True)
    ref.aggregate(0.1 * ref.kl(lp_t, ref.t(ref_lp), kl_kind), ref.t(mask), "seq-mean-token-mean").backward()
    close(jax.grad(fn)(lp.astype(np.float32)), lp_t.grad, rtol=1e-5, atol=1e-6)


# -- RAFT, approx_kl, the sequence-level ratio -----------------------------------------------------


def test_raft_never_trains_on_a_group_whose_scores_all_failed():
    scores = np.array([np.nan, np.nan, 0.0, 1.0], np.float32)  # group 0: every reward failed
    mask = np.ones((4, 2), np.float32)
    for min_score in (None, 0.0, -1.0):  # min_score must not compare against a stand-in 0
        fn = lambda lp: jaxrl_llm.raft_loss(lp, scores, mask, num_samples=2, min_score=min_score,  # noqa: E731
                                            nonfinite_scores="mask")
        grad, aux = jax.grad(fn, has_aux=True)(-np.ones((4, 2), np.float32))
        np.testing.assert_array_equal(grad[:3], 0.0)
        np.testing.assert_allclose(grad[3], -0.5)  # token-mean over the selected sample's 2 tokens
        assert float(aux["reward/selected"].count) == 1.0


def test_approx_kl_estimates_kl_from_the_old_policy_to_the_new():
    old, new = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    # One sample of each token (they are equally likely under the old policy that sampled them).
    lp = np.log(new)[:, None].astype(np.float32)
    old_lp = np.log(old)[:, None].astype(np.float32)
    _, aux = jaxrl_llm.ppo_loss(lp, old_lp, np.zeros(2, np.float32), np.ones((2, 1), np.float32))
    kl_old_new = float(np.sum(old * np.log(old / new)))
    np.testing.assert_allclose(float(aux["approx_kl"].mean), kl_old_new, rtol=1e-5)  # 0.511, not 1.283


def test_sequence_ratio_clips_one_ratio_per_completion():
    """TRL's RLOO: rho_n = exp(sum_t log pi - log pi_old), loss = mean_n max(-A rho, -A clip(rho))."""
    rng = np.random.default_rng(5)
    mask = np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]], np.float64)
    old = -rng.random((4, 3)) - 0.5
    lp = old + 0.15 * rng.normal(size=(4, 3))
    adv = np.array([1.0, -0.5, 0.8, -1.2])
    lp_t = ref.t(lp, True)
    ratio = torch.exp(((lp_t - ref.t(old)) * ref.t(mask)).sum(-1))
    per_sequence = torch.max(-ref.t(adv) * ratio, -ref.t(adv) * ratio.clamp(0.8, 1.2))
    per_sequence.mean().backward()
    fn = lambda x, level: jaxrl_llm.ppo_loss(x, old.astype(np.float32), adv.astype(np.float32), mask,  # noqa: E731
                                             ratio_level=level, aggregation="seq-mean-token-sum")
    (loss, aux), grad = jax.value_and_grad(fn, has_aux=True)(lp.astype(np.float32), "sequence")
    close(loss, per_sequence.mean(), rtol=1e-5, atol=1e-6)
    close(grad, lp_t.grad, rtol=1e-5, atol=1e-6)
    close(aux["ratio"].mean, ratio.mean(), rtol=1e-5)
    assert 0 < float(aux["clipfrac"].mean) < 1  # some completions clipped, some not
    token_grad = jax.grad(lambda x: fn(x, "token")[0])(lp.astype(np.float32))
    assert not np.allclose(token_grad, grad, atol=1e-3)  # a different update away from ratio 1
    # At ratio 1, every aggregation mode gives both levels the same gradient.
    for mode in jaxrl_llm.LOSS_AGGREGATIONS:
        at_one = {level: jax.grad(lambda x: jaxrl_llm.ppo_loss(  # noqa: B023
            x, x, adv.astype(np.float32), mask, ratio_level=level, aggregation=mode)[0])(old.astype(np.float32))
            for level in ("sequence", "token")}
        scale = float(np.abs(at_one["token"]).max())  # two float32 gradients of 4 x 3 tokens
        close(at_one["sequence"], at_one["token"], rtol=1e-5, atol=float32_tolerance(mask.size, scale=scale))


# -- micro-batches (train.micro_batch_size) --------------------------------------------------------


def _micro_batch_losses():
    """Each public loss as `fn(batch, **options)`, with the options its micro-batches share."""
    return {
        "rloo": lambda b, **o: jaxrl_llm.rloo_loss(b["logprobs"], b["ref_logprobs"], b["scores"], b["mask"],
                                                   num_samples=2, **o),
        "reinforce": lambda b, baseline, **o: jaxrl_llm.reinforce_loss(
            b["logprobs"], b["ref_logprobs"], b["scores"], b["mask"], baseline=baseline, **o),
        "ppo": lambda b, **o: jaxrl_llm.ppo_loss(
            b["logprobs"], b["old_logprobs"], b["advantages"], b["mask"], values=b["values"],
            old_values=b["old_values"], returns=b["returns"], entropy=b["entropy"], entropy_coef=0.1, **o),
        "grpo": lambda b, **o: jaxrl_llm.grpo_loss(b["logprobs"], b["old_logprobs"], b["ref_logprobs"],
                                                   b["advantages"], b["mask"], **o),
        "raft": lambda b, **o: jaxrl_llm.raft_loss(b["logprobs"], b["scores"], b["mask"], num_samples=2, **o),
    }


@pytest.mark.parametrize("aggregation", jaxrl_llm.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("name", ["rloo", "reinforce", "ppo", "grpo", "raft"])
def test_micro_batch_losses_with_the_whole_denominator_add_up_to_the_whole_batch(name, aggregation):
    from tests._batches import random_batch

    rng = np.random.default_rng(3)
    batch = {k: jnp.asarray(v) for k, v in random_batch(rng, n=8, t=6).items()}
    batch["advantages"] = jnp.asarray(rng.normal(size=(8, 6)), jnp.float32)
    fn = _micro_batch_losses()[name]
    options = {"aggregation": aggregation}
    seq_mask = None
    if name == "reinforce":  # a micro-batch's own mean is not the batch's: the baseline is given
        options["baseline"] = jnp.float32(0.3)
    if name == "raft":
        seq_mask = jaxrl_llm.raft_selection(batch["scores"], num_samples=2)
    denominator = jaxrl_llm.loss_denominator(batch["mask"], aggregation, seq_mask=seq_mask)

    def loss_of(logprobs, rows, **extra):
        part = {k: v[rows] for k, v in batch.items()}
        part["logprobs"] = logprobs[rows]
        return fn(part, **options, **extra)[0]

    whole_rows = jnp.arange(8)
    whole, whole_grad = jax.value_and_grad(loss_of)(batch["logprobs"], whole_rows)
    total, total_grad = 0.0, 0.0
    for rows in (jnp.array([0, 1, 4, 5]), jnp.array([2, 3, 6, 7])):  # whole groups of 2
        value, grad = jax.value_and_grad(loss_of)(batch["logprobs"], rows, denominator=denominator)
        total, total_grad = total + value, total_grad + grad
    assert float(jnp.abs(whole_grad).max()) > 1e-3
    tolerance = float32_tolerance(8 * 6)  # the same sums over 8 x 6 tokens, in another order
    close(total, whole, rtol=tolerance, atol=tolerance)
    close(total_grad, whole_grad, rtol=tolerance, atol=tolerance * float(jnp.abs(whole_grad).max()))
