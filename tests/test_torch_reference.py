"""Every loss and transform against the PyTorch reference in `torch_reference.py`,
on random masked batches (one row with an empty mask), values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxrl_llm
import torch_reference as ref
from _batches import random_batch

K = 4
RTOL, ATOL = 2e-5, 2e-6


def close(actual, expected, rtol=RTOL, atol=ATOL):
    if isinstance(expected, torch.Tensor):
        expected = expected.detach().numpy()
    np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


@pytest.fixture(params=[0, 1, 2])
def batch(request):
    return random_batch(np.random.default_rng(request.param), n=8, t=6)


@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_kl_and_shape_rewards(batch, kind):
    b = batch
    close(jaxrl_llm.kl_penalty(b["logprobs"], b["ref_logprobs"], kind=kind),
          ref.kl(ref.t(b["logprobs"]), ref.t(b["ref_logprobs"]), kind))
    expected = ref.shape_rewards(ref.t(b["scores"]), ref.t(b["logprobs"]), ref.t(b["ref_logprobs"]),
                                 ref.t(b["mask"]), 0.05, kind)
    close(jaxrl_llm.shape_rewards(b["scores"], b["logprobs"], b["ref_logprobs"], b["mask"], kl_coef=0.05, kind=kind),
          expected)


def test_sequence_advantages(batch):
    r = batch["scores"]
    close(jaxrl_llm.reinforce_advantages(r), ref.t(r) - ref.t(r).mean())
    close(jaxrl_llm.reinforce_advantages(r, baseline=0.3), ref.t(r) - 0.3)
    close(jaxrl_llm.rloo_advantages(r, num_samples=K), ref.rloo_advantages(ref.t(r), K))
    for scale in ("group", "batch", "none"):
        close(jaxrl_llm.grpo_advantages(r, num_samples=K, scale=scale),
              ref.grpo_advantages(ref.t(r), K, scale, 1e-4), rtol=1e-4)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0)])
def test_gae_against_explicit_loop(batch, gamma, lam):
    b = batch
    adv, ret = jaxrl_llm.gae(b["token_rewards"], b["values"], b["mask"], gamma=gamma, lam=lam)
    ref_adv, ref_ret = ref.gae(ref.t(b["token_rewards"]), ref.t(b["values"]), ref.t(b["mask"]), gamma, lam)
    close(adv, ref_adv)
    close(ret, ref_ret)


def test_gae_with_holes_in_the_mask():
    """Masked positions inside a completion (e.g. tool output) are skipped, not zero-valued states."""
    rng = np.random.default_rng(3)
    mask = (rng.random((5, 7)) > 0.3).astype(np.float32)
    rewards, values = rng.normal(size=(2, 5, 7)).astype(np.float32)
    adv, ret = jaxrl_llm.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    ref_adv, ref_ret = ref.gae(ref.t(rewards), ref.t(values), ref.t(mask), 0.95, 0.9)
    close(adv, ref_adv)
    close(ret, ref_ret)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten(batch, shift_mean):
    b = batch
    close(jaxrl_llm.whiten(b["values"], b["mask"], shift_mean=shift_mean),
          ref.whiten(ref.t(b["values"]), ref.t(b["mask"]), shift_mean), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("aggregation", jaxrl_llm.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("algo", ["reinforce", "rloo"])
def test_bandit_losses(batch, algo, aggregation):
    b = batch
    kw = dict(kl_coef=0.05, kl_kind="k3", aggregation=aggregation)
    if algo == "reinforce":
        fn = lambda lp: jaxrl_llm.reinforce_loss(lp, b["ref_logprobs"], b["scores"], b["mask"], **kw)[0]
        advantage_fn = lambda r: r - r.mean()
    else:
        fn = lambda lp: jaxrl_llm.rloo_loss(lp, b["ref_logprobs"], b["scores"], b["mask"], num_samples=K, **kw)[0]
        advantage_fn = lambda r: ref.rloo_advantages(r, K)
    logp = ref.t(b["logprobs"], requires_grad=True)
    expected = ref.bandit_loss(logp, ref.t(b["ref_logprobs"]), ref.t(b["scores"]), ref.t(b["mask"]),
                               0.05, "k3", advantage_fn, aggregation)
    expected.backward()
    value, grad = jax.value_and_grad(fn)(jnp.asarray(b["logprobs"]))
    close(value, expected)
    close(grad, logp.grad)


@pytest.mark.parametrize("aggregation", jaxrl_llm.LOSS_AGGREGATIONS)
@pytest.mark.parametrize("clip_eps_high,dual_clip", [(None, None), (0.28, None), (None, 3.0)])
@pytest.mark.parametrize("token_level", [True, False])
def test_ppo_loss(batch, aggregation, clip_eps_high, dual_clip, token_level):
    b = batch
    rng = np.random.default_rng(7)
    adv = rng.normal(size=b["mask"].shape if token_level else b["mask"].shape[:1]).astype(np.float32)
    # Large log-ratio differences so that clipping and dual clipping really happen.
    old = (b["logprobs"] + rng.normal(0, 0.5, size=b["mask"].shape)).astype(np.float32)

    def fn(lp, values):
        return jaxrl_llm.ppo_loss(
            lp, old, adv, b["mask"], clip_eps=0.2, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
            values=values, old_values=b["old_values"], returns=b["returns"], value_clip=0.2, vf_coef=0.1,
            entropy=b["entropy"], entropy_coef=0.01, aggregation=aggregation,
        )

    (value, aux), (grad_lp, grad_v) = jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(
        jnp.asarray(b["logprobs"]), jnp.asarray(b["values"]))
    logp, values, mask = ref.t(b["logprobs"], True), ref.t(b["values"], True), ref.t(b["mask"])
    adv_t = ref.t(adv) if token_level else ref.t(adv)[:, None].expand_as(mask)
    pg, clipfrac = ref.ppo_policy_loss(logp, ref.t(old), adv_t, mask, 0.2, clip_eps_high, dual_clip, aggregation)
    vl = ref.value_loss(values, ref.t(b["old_values"]), ref.t(b["returns"]), mask, 0.2, aggregation)
    ent = ref.aggregate(ref.t(b["entropy"]), mask, aggregation)
    expected = pg + 0.1 * vl - 0.01 * ent
    expected.backward()
    close(value, expected)
    close(grad_lp, logp.grad)
    close(grad_v, values.grad)
    close(aux["clipfrac"].mean, clipfrac)
    assert 0.0 < float(aux["clipfrac"].mean) < 1.0
    close(aux["loss/value"].mean, vl)


@pytest.mark.parametrize("clip", [0.2, None])
def test_value_loss(batch, clip):
    b = batch
    fn = lambda v: jaxrl_llm.value_loss(v, b["old_values"], b["returns"], b["mask"], clip=clip)[0]
    values = ref.t(b["values"], True)
    expected = ref.value_loss(values, ref.t(b["old_values"]), ref.t(b["returns"]), ref.t(b["mask"]), clip, "token-mean")
    expected.backward()
    value, grad = jax.value_and_grad(fn)(jnp.asarray(b["values"]))
    close(value, expected)
    close(grad, values.grad)


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean"])
def test_grpo_loss(batch, aggregation):
    b = batch
    adv = jaxrl_llm.grpo_advantages(b["scores"], num_samples=K)
    fn = lambda lp: jaxrl_llm.grpo_loss(lp, b["old_logprobs"], b["ref_logprobs"], adv, b["mask"],
                                        kl_coef=0.04, aggregation=aggregation)[0]
    logp, mask = ref.t(b["logprobs"], True), ref.t(b["mask"])
    adv_t = ref.grpo_advantages(ref.t(b["scores"]), K, "group", 1e-4)[:, None].expand_as(mask)
    ratio = torch.exp(logp - ref.t(b["old_logprobs"]))
    pg = torch.max(-adv_t * ratio, -adv_t * ratio.clamp(0.8, 1.2))
    per_token = pg + 0.04 * ref.kl(logp, ref.t(b["ref_logprobs"]), "k3")  # KL with gradient
    expected = ref.aggregate(per_token, mask, aggregation)
    expected.backward()
    value, grad = jax.value_and_grad(fn)(jnp.asarray(b["logprobs"]))
    close(value, expected, rtol=1e-4)
    close(grad, logp.grad, rtol=1e-4, atol=1e-5)


def test_raft_loss(batch):
    b = batch
    fn = lambda lp: jaxrl_llm.raft_loss(lp, b["scores"], b["mask"], num_samples=K)[0]
    logp, mask = ref.t(b["logprobs"], True), ref.t(b["mask"])
    best = torch.zeros(8, dtype=torch.float64)
    for g in range(2):
        best[g * K + int(np.argmax(b["scores"][g * K:(g + 1) * K]))] = 1.0
    expected = ref.aggregate(-logp, mask, "token-mean", seq_weight=best)
    expected.backward()
    value, grad = jax.value_and_grad(fn)(jnp.asarray(b["logprobs"]))
    close(value, expected)
    close(grad, logp.grad)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_size", [None, 5, 48])
def test_token_logprobs_and_entropy(temperature, chunk_size):
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 3, size=(3, 7, 50)).astype(np.float32)
    tokens = rng.integers(0, 50, size=(3, 7))
    close(jaxrl_llm.token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size),
          ref.token_logprobs(ref.t(logits), torch.tensor(tokens), temperature), rtol=1e-5, atol=1e-5)
    close(jaxrl_llm.token_entropy(logits, temperature=temperature, chunk_size=chunk_size),
          ref.token_entropy(ref.t(logits), temperature), rtol=1e-5, atol=1e-5)
    # Gradient through the chunked (rematerialised) path.
    fn = lambda z: jnp.sum(jaxrl_llm.token_logprobs(z, tokens, temperature=temperature, chunk_size=chunk_size))
    z = ref.t(logits, True)
    ref.token_logprobs(z, torch.tensor(tokens), temperature).sum().backward()
    close(jax.grad(fn)(jnp.asarray(logits)), z.grad, rtol=1e-5, atol=1e-6)


def test_bfloat16_logits_are_upcast():
    rng = np.random.default_rng(5)
    logits = jnp.asarray(rng.normal(size=(2, 3, 11)), jnp.bfloat16)
    tokens = jnp.asarray(rng.integers(0, 11, size=(2, 3)))
    out = jaxrl_llm.token_logprobs(logits, tokens)
    assert out.dtype == jnp.float32
    expected = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
    close(out, np.take_along_axis(np.asarray(expected), np.asarray(tokens)[..., None], -1)[..., 0])


@pytest.mark.parametrize("chunk_size,softcap", [(None, None), (7, None), (4, 5.0)])
def test_linear_token_logprobs_from_hidden_states(chunk_size, softcap):
    rng = np.random.default_rng(6)
    hidden = rng.normal(size=(3, 5, 8)).astype(np.float32)
    w = rng.normal(size=(8, 40)).astype(np.float32)
    tokens = rng.integers(0, 40, size=(3, 5))
    h_t, w_t = ref.t(hidden, True), ref.t(w, True)
    z = h_t @ w_t
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    expected = ref.token_logprobs(z, torch.tensor(tokens), 0.8)
    expected.sum().backward()
    fn = lambda h, w: jaxrl_llm.linear_token_logprobs(h, w, tokens, temperature=0.8, chunk_size=chunk_size,
                                                      softcap=softcap)
    (logprobs, entropy) = fn(hidden, w)
    close(logprobs, expected, rtol=1e-5, atol=1e-5)
    close(entropy, ref.token_entropy(z.detach(), 0.8), rtol=1e-5, atol=1e-5)
    grads = jax.grad(lambda h, w: fn(h, w)[0].sum(), argnums=(0, 1))(hidden, w)
    close(grads[0], h_t.grad, rtol=1e-4, atol=1e-5)
    close(grads[1], w_t.grad, rtol=1e-4, atol=1e-5)


def test_raft_min_score_skips_groups_without_a_good_sample():
    logprobs = -np.ones((4, 2), np.float32)
    scores = np.array([0.0, 0.0, 1.0, 0.0], np.float32)  # group 0 has no correct sample
    mask = np.ones((4, 2), np.float32)
    fn = lambda lp: jaxrl_llm.raft_loss(lp, scores, mask, num_samples=2, min_score=1.0)[0]
    grad = jax.grad(fn)(jnp.asarray(logprobs))
    np.testing.assert_array_equal(grad[:2], 0.0)  # nothing learned from the best of two wrong answers
    np.testing.assert_allclose(grad[2], -0.5)  # token-mean over the 2 tokens of the one selected sample
    np.testing.assert_array_equal(grad[3], 0.0)
