"""One trainer update of each algorithm equals the paper's formula computed independently.

The trainer's gradient (`Algorithm.prepare` then `Algorithm.loss`, the functions `Trainer.step`
compiles) is compared with a PyTorch float64 computation of the paper's loss written here
from the same logits and samples: the advantages, where the KL goes (reward or loss, which
estimator), the aggregation, the ratio level and the entropy bonus. Only the model's forward
pass is shared: the reference takes the full `[N, T, V]` logits (and PPO's values) as torch
leaves, and its gradient with respect to them is pulled back to the parameters through that
forward pass (`jax.vjp`), so the two gradients can be compared parameter by parameter.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.training import Trainer
from jaxrl_llm.training.algorithms import completion_slice, critic_values, sequence_inputs
from tests import torch_reference as ref

TEMPERATURE, KL_COEF, ENTROPY_COEF, K = 0.9, 0.1, 0.05, 4


def forward(trainer, params, batch):
    """`(logits [N, T, V], values [N, T] or None)` at the completion positions: the model's plain
    forward pass (and the critic's, PPO only; the shared critic reads the policy's hidden states)."""
    model = nnx.merge(trainer.graphdef, params["policy"])
    ids, attention = sequence_inputs(batch)
    hidden = models.hidden_states(model, ids, attention)
    values = None
    if "critic" in params:
        values = critic_values(trainer.algorithm.critic_graphdef, params["critic"], batch, hidden)
    return completion_slice(model.unembed(hidden), batch), values


def as_torch(x, requires_grad=False):
    return torch.tensor(np.asarray(x, np.float64), requires_grad=requires_grad)


def logprobs_and_entropy(logits_t, tokens):
    logp = torch.log_softmax(logits_t / TEMPERATURE, -1)
    return logp.gather(-1, torch.tensor(np.asarray(tokens))[..., None].long())[..., 0], -(logp.exp() * logp).sum(-1)


def reference_gradient(trainer, params, batch, reference_loss, *, old_params=None):
    """`reference_loss(logits, old_logits, ref_logits, values)` (torch) and its gradient w.r.t. `params`."""
    run = jax.jit(lambda p: forward(trainer, p, batch))
    (logits, values), pull_back = jax.vjp(run, params)
    old_logits = None if old_params is None else as_torch(run(old_params)[0])
    ref_params = trainer.state.ref_params  # None for RAFT
    ref_logits = None if ref_params is None else as_torch(run({"policy": ref_params})[0])
    logits_t = as_torch(logits, True)
    values_t = None if values is None else as_torch(values, True)
    loss = reference_loss(logits=logits_t, old_logits=old_logits, ref_logits=ref_logits, values=values_t)
    loss.backward()
    loss = loss.item()
    to_jax = lambda t: jnp.asarray(t.grad.numpy(), jnp.float32)  # noqa: E731
    (grads,) = pull_back((to_jax(logits_t), None if values is None else to_jax(values_t)))
    return loss, grads


def assert_grads_equal(ours, theirs):
    flat_ours, flat_theirs = jax.tree.leaves(ours), jax.tree.leaves(theirs)
    assert len(flat_ours) == len(flat_theirs)
    assert max(float(jnp.abs(g).max()) for g in flat_theirs) > 1e-3  # a real update, not zeros
    for a, b in zip(flat_ours, flat_theirs):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def setup(toy_config, algo, *overrides):
    """A trainer one step in (so that the policy differs from the reference and the KL terms
    matter), the next step's rollout, and what `prepare` makes of it."""
    trainer = Trainer(toy_config(f"rollout.temperature={TEMPERATURE}", f"algo.kl_coef={KL_COEF}",
                                 f"algo.entropy_coef={ENTROPY_COEF}", f"algo.num_samples={K}", "optim.learning_rate=0.03",
                                 *overrides, algo=algo))
    trainer.step()
    batch = trainer.collect()[0]
    # The trainer's compiled prepare (it donates the state it is given: give it a copy).
    state, train_batch, _ = trainer._prepare(jax.tree.map(jnp.copy, trainer.state), batch)
    return trainer, batch, state, train_batch


def our_update(trainer, params, train_batch):
    value_and_grad = jax.jit(jax.value_and_grad(trainer.algorithm.loss, has_aux=True))
    (loss, (aux, _)), grads = value_and_grad(params, train_batch)
    if "kl" in aux:  # the policy has moved from the reference: the KL terms are tested too
        assert abs(float(aux["kl"].mean)) > 1e-3
    return float(loss), grads, aux


def after_a_first_update(trainer, state, train_batch):
    """Apply the first of several updates to the batch (it moves the policy, so the second one's
    ratio differs from 1); returns the parameters before it, the sampling policy's."""
    old_params = jax.tree.map(jnp.copy, state.params)
    trainer.state, _ = trainer._update(state, train_batch)
    return old_params


def torch_batch(batch):
    mask = as_torch(np.asarray(batch.mask) * np.asarray(batch.valid)[:, None])
    return as_torch(batch.scores), mask


# -- the papers' formulas, from logits -------------------------------------------------------------


def bandit_reference(batch, advantage_fn, kl_kind="k1"):
    """REINFORCE / RLOO (Ahmadian et al. 2024): R = score - beta sum_t kl_t (the `kl_kind` estimator,
    from the sampling policy), A from `advantage_fn`, loss = -1/N sum_n A_n sum_t log pi(y_nt) -
    c * entropy bonus."""
    scores, mask = torch_batch(batch)

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        rewards = scores - KL_COEF * (ref.kl(logp.detach(), ref_logp, kl_kind) * mask).sum(-1)
        advantages = advantage_fn(rewards).detach()
        return (-(advantages * (logp * mask).sum(-1)).mean()
                - ENTROPY_COEF * ((entropy * mask).sum(-1)).mean())

    return loss


@pytest.mark.parametrize("algo,kl_kind", [("rloo", "k1"), ("rloo", "k3"), ("reinforce", "k1"), ("vanilla_pg", "k1")])
def test_bandit_update_equals_the_reference(toy_config, algo, kl_kind):
    trainer, batch, state, train_batch = setup(toy_config, algo, "algo.num_samples=4", f"algo.kl_kind={kl_kind}")
    advantage_fn = {
        "rloo": lambda r: ref.rloo_advantages(r, K),
        "reinforce": lambda r: r - r.mean(),
        "vanilla_pg": lambda r: r,
    }[algo]
    loss, grads, aux = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch,
                                             bandit_reference(batch, advantage_fn, kl_kind))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)
    # The update the trainer applies is built from this very gradient.
    _, (_, scalars) = trainer._update(trainer.state, train_batch)
    np.testing.assert_allclose(float(scalars["grad_norm"]), float(optax_norm(ref_grads)), rtol=1e-4)


def optax_norm(tree):
    return jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(tree)))


def test_reinforce_ema_baseline_advances_once_per_update(toy_config):
    trainer, batch, state, train_batch = setup(toy_config, "reinforce", "algo.baseline=ema", "algo.ema_decay=0.8")
    scores, mask = torch_batch(batch)
    ids_logits = forward(trainer, state.params, batch)[0]
    ref_logits = forward(trainer, {"policy": state.ref_params}, batch)[0]
    logp, _ = logprobs_and_entropy(as_torch(ids_logits), batch.tokens)
    ref_logp, _ = logprobs_and_entropy(as_torch(ref_logits), batch.tokens)
    mean_reward = float((scores - KL_COEF * ((logp - ref_logp) * mask).sum(-1)).mean())
    # Read before the update: it donates the state, and the new baseline may reuse the old buffer.
    count, ema = int(trainer.state.baseline.count), float(trainer.state.baseline.ema)
    assert count == 1  # the first step's update advanced it once
    new_state, _ = trainer._update(trainer.state, train_batch)
    assert int(new_state.baseline.count) == 2
    np.testing.assert_allclose(float(new_state.baseline.ema), 0.8 * ema + 0.2 * mean_reward, rtol=1e-5)


def test_grpo_update_equals_the_reference(toy_config):
    """GRPO (Shao et al. 2024): A = (s - group mean) / (group std + 1e-4); per token
    -A * ratio + beta * k3(pi || pi_ref), averaged per sequence then over sequences."""
    trainer, batch, state, train_batch = setup(toy_config, "grpo")
    scores, mask = torch_batch(batch)

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        advantages = ref.grpo_advantages(scores, K, "group", 1e-4)[:, None]
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        k3 = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        per_token = surrogate + KL_COEF * k3 - ENTROPY_COEF * entropy
        return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()

    our_loss, grads, aux = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)
    # One update: every ratio is exactly 1 (their sum is their count), nothing is clipped.
    assert float(aux["ratio"].total) == float(aux["ratio"].count) and float(aux["clipfrac"].total) == 0.0


def test_raft_update_equals_the_reference(toy_config):
    """RAFT (Dong et al. 2023): NLL of each group's best sample, token-mean; no reference term."""
    trainer, batch, state, train_batch = setup(toy_config, "raft")
    scores, mask = torch_batch(batch)
    best = torch.zeros_like(scores)
    for g in range(len(scores) // K):
        best[g * K + int(torch.argmax(scores[g * K:(g + 1) * K]))] = 1.0

    def loss(logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        selected = mask * best[:, None]
        return -(logp * selected).sum() / selected.sum() - ENTROPY_COEF * (entropy * mask).sum() / mask.sum()

    our_loss, grads, aux = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)
    assert train_batch.ref_logprobs is None and "kl" not in aux


def ppo_reference(batch, *, whiten=True, gamma=1.0, lam=0.95, vf_coef=0.1, clip=0.2):
    """PPO in the RLHF set-up (Ouyang et al. 2022): token rewards -beta k1 + score at the last
    token, GAE, whitened advantages, token-mean clipped surrogate + vf_coef * clipped value
    loss - entropy bonus; at rollout time the old log-probs and values are the current ones."""
    scores, mask = torch_batch(batch)

    def loss(logits, ref_logits, values, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        old_logp, old_values = logp.detach(), values.detach()
        rewards = ref.shape_rewards(scores, old_logp, ref_logp, mask, KL_COEF, "k1")
        advantages, returns = ref.gae(rewards, old_values, mask, gamma, lam)
        if whiten:
            advantages = ref.whiten(advantages, mask)
        ratio = torch.exp(logp - old_logp)
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        value_loss = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
        mean = lambda x: (x * mask).sum() / mask.sum()  # noqa: E731
        return mean(surrogate) + vf_coef * mean(value_loss) - ENTROPY_COEF * mean(entropy)

    return loss


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_ppo_update_equals_the_reference(toy_config, critic):
    trainer, batch, state, train_batch = setup(toy_config, "ppo", f"algo.critic={critic}", "algo.num_samples=1",
                                               "rollout.prompts_per_step=16")
    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, ppo_reference(batch))
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)


@pytest.mark.parametrize("ratio_level", ["sequence", pytest.param("token", marks=pytest.mark.slow)])
def test_second_rloo_update_clips_at_the_configured_ratio_level(toy_config, ratio_level):
    """Several updates per batch: advantages fixed from the sampling policy, then TRL's clipped
    ratio, one per completion (sequence) or one per token."""
    trainer, batch, state, train_batch = setup(toy_config, "rloo", "algo.update_epochs=2", "algo.clip_eps=0.02",
                                               f"algo.ratio_level={ratio_level}")
    old_params = after_a_first_update(trainer, state, train_batch)
    scores, mask = torch_batch(batch)

    def loss(logits, old_logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        old_logp, _ = logprobs_and_entropy(old_logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        rewards = scores - KL_COEF * ((old_logp - ref_logp) * mask).sum(-1)
        advantages = ref.rloo_advantages(rewards, K)
        if ratio_level == "sequence":
            ratio = torch.exp(((logp - old_logp) * mask).sum(-1))
            surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.98, 1.02))
            policy_loss = surrogate.mean()
        else:
            ratio = torch.exp(logp - old_logp)
            a = advantages[:, None]
            surrogate = torch.max(-a * ratio, -a * ratio.clamp(0.98, 1.02))
            policy_loss = ((surrogate * mask).sum(-1)).mean()
        return policy_loss - ENTROPY_COEF * ((entropy * mask).sum(-1)).mean()

    our_loss, grads, aux = our_update(trainer, trainer.state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, trainer.state.params, batch, loss, old_params=old_params)
    assert 0 < float(aux["clipfrac"].mean) < 1  # the clip is active for some and not all
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)
