"""The GRPO variants and the DAPO options, each one trainer update against its paper's formula.

As in `test_reference_updates.py`: the trainer's gradient (`prepare` then `loss`, the functions
`Trainer.step` compiles) against a float64 PyTorch computation written here from the logits,
pulled back to the parameters through the shared forward pass.

- Dr. GRPO (Liu et al. 2025): A = s - group mean (no std); token sums over a constant T.
- GSPO (Zheng et al. 2025): one ratio (pi/pi_old)^(1/|y|) per completion, clipped per completion.
- DAPO (Yu et al. 2025): truncated completions out of the loss but in the advantages; the soft
  overlong penalty in the reward.
- High-entropy tokens (Wang et al. 2025): only the top quantile of tokens by entropy carry the
  policy gradient.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxrl_llm.rewards import overlong_penalty
from jaxrl_llm.training import Algorithm, Trainer
from tests import torch_reference as ref
from tests.training import toy_rewards
from tests.training.test_reference_updates import (ENTROPY_COEF, K, KL_COEF, after_a_first_update, assert_grads_equal,
                                                   logprobs_and_entropy, our_update, reference_gradient, setup,
                                                   torch_batch)


def k3(logp, ref_logp):
    return torch.exp(ref_logp - logp) - (ref_logp - logp) - 1


def test_dr_grpo_update_equals_the_reference(toy_config):
    """Dr. GRPO: A = s - mean_group(s); per token -A * ratio + beta * k3 - c * H, summed over each
    completion's tokens and divided by the constant T = max_new_tokens, averaged over completions."""
    trainer, batch, state, train_batch = setup(toy_config, "dr_grpo")
    scores, mask = torch_batch(batch)
    width = batch.tokens.shape[1]
    assert trainer.config.rollout.max_new_tokens == width

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        advantages = (scores.view(-1, K) - scores.view(-1, K).mean(-1, keepdim=True)).reshape(-1, 1)
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        per_token = surrogate + KL_COEF * k3(logp, ref_logp) - ENTROPY_COEF * entropy
        return ((per_token * mask).sum(-1) / width).mean()

    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)
    # Not GRPO's update: its per-completion length normalisation and std scaling differ here.
    lengths = np.asarray(batch.mask).sum(-1)
    assert lengths.min() < width or np.asarray(batch.scores).std() > 0


def test_second_gspo_update_clips_the_length_normalised_sequence_ratio(toy_config):
    """GSPO with two updates: A = (s - group mean) / group std fixed before the updates; then
    s_n = exp(1/|y_n| sum_t log pi - log pi_old), loss = -1/N sum_n min(s_n A_n, clip(s_n) A_n)
    + beta * 1/N sum_n mean_t k3_nt - c * 1/N sum_n mean_t H_nt: the KL and the entropy bonus are
    each completion's token mean, as TRL's and verl's GSPO compute them (the surrogate is one term
    per completion; a sum over tokens would weigh the regularisers by the completion's length)."""
    low, high = 0.002, 0.003
    trainer, batch, state, train_batch = setup(toy_config, "gspo", "algo.update_epochs=2", f"algo.clip_eps={low}",
                                               f"algo.clip_eps_high={high}")
    old_params = after_a_first_update(trainer, state, train_batch)
    scores, mask = torch_batch(batch)

    def loss(logits, old_logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        old_logp, _ = logprobs_and_entropy(old_logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        advantages = ref.grpo_advantages(scores, K, "group", 1e-4)
        ratio = torch.exp(((logp - old_logp) * mask).sum(-1) / mask.sum(-1))
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(1 - low, 1 + high))
        lengths = mask.sum(-1)
        return (surrogate + KL_COEF * (k3(logp, ref_logp) * mask).sum(-1) / lengths
                - ENTROPY_COEF * (entropy * mask).sum(-1) / lengths).mean()

    our_loss, grads, aux = our_update(trainer, trainer.state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, trainer.state.params, batch, loss, old_params=old_params)
    assert 0 < float(aux["clipfrac"].mean) < 1  # the clip is active for some completions, not all
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)


def with_finished(trainer, batch, finished):
    """The batch with the given `finished` flags, prepared again by the trainer's compiled prepare."""
    batch = batch._replace(finished=jnp.asarray(finished))
    state, train_batch, _ = trainer._prepare(jax.tree.map(jnp.copy, trainer.state), batch)
    return batch, state, train_batch


FINISHED = np.arange(K * 8) % 3 != 1  # a mix in every group: rows 1, 4, 7, ... were cut at the limit


def test_truncated_completions_leave_the_loss_and_keep_their_place_in_the_advantages(toy_config):
    """DAPO's GRPO with `algo.mask_truncated_completions`: the group advantages are those of all K
    samples, and the token-mean loss is over the finished completions' tokens only."""
    trainer, batch, _, _ = setup(toy_config, "grpo", "algo.mask_truncated_completions=true",
                                 "algo.aggregation=token-mean", "algo.clip_eps_high=0.28")
    batch, state, train_batch = with_finished(trainer, batch, FINISHED)
    scores, mask = torch_batch(batch)
    kept = mask * torch.tensor(FINISHED, dtype=torch.float64)[:, None]

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        advantages = ref.grpo_advantages(scores, K, "group", 1e-4)[:, None]  # every sample of the group
        ratio = torch.exp(logp - logp.detach())
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.28))
        per_token = surrogate + KL_COEF * k3(logp, ref_logp) - ENTROPY_COEF * entropy
        return (per_token * kept).sum() / kept.sum()

    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)


@pytest.mark.slow
def test_truncated_completions_stay_in_the_rloo_baseline(toy_config):
    """The bandit path: RLOO's leave-one-out baseline over all K samples, the seq-mean loss over the
    finished completions only."""
    trainer, batch, _, _ = setup(toy_config, "rloo", "algo.mask_truncated_completions=true")
    batch, state, train_batch = with_finished(trainer, batch, FINISHED)
    scores, mask = torch_batch(batch)
    finished = torch.tensor(FINISHED, dtype=torch.float64)

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        rewards = scores - KL_COEF * ((logp.detach() - ref_logp) * mask).sum(-1)
        advantages = ref.rloo_advantages(rewards, K).detach()
        per_sequence = -advantages * (logp * mask).sum(-1) - ENTROPY_COEF * (entropy * mask).sum(-1)
        return (per_sequence * finished).sum() / finished.sum()

    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)


def high_entropy_tokens(entropy, mask, quantile):
    """[N, T] 0/1 the completion tokens whose entropy is at least the batch's (1 - quantile)-quantile."""
    threshold = torch.quantile(entropy.detach()[mask > 0], 1 - quantile)
    selected = mask * (entropy.detach() >= threshold)
    assert 0 < selected.sum() < mask.sum()  # a real selection
    return selected


def test_only_the_high_entropy_tokens_carry_the_policy_gradient(toy_config):
    """`algo.entropy_quantile: 0.3` on RLOO: the policy term's gradient comes from the tokens whose
    entropy is at least the batch's 0.7-quantile (torch.quantile over the completion tokens), as
    TRL masks its per-token loss; the entropy bonus keeps every token; the loss value is unchanged."""
    quantile = 0.3
    trainer, batch, state, train_batch = setup(toy_config, "rloo", f"algo.entropy_quantile={quantile}")
    scores, mask = torch_batch(batch)

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        selected = high_entropy_tokens(entropy, mask, quantile)
        rewards = scores - KL_COEF * ((logp.detach() - ref_logp) * mask).sum(-1)
        advantages = ref.rloo_advantages(rewards, K).detach()
        return (-(advantages * (logp * selected).sum(-1)).mean()
                - ENTROPY_COEF * ((entropy * mask).sum(-1)).mean())

    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    _, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    assert_grads_equal(grads, ref_grads)
    # The value is every token's: the same as without the selection.
    all_tokens = Algorithm(dataclasses.replace(trainer.config.algo, entropy_quantile=1.0), graphdef=trainer.graphdef,
                           temperature=trainer.config.rollout.temperature, chunk_size=None)
    (full_loss, _), full_grads = jax.jit(jax.value_and_grad(all_tokens.loss, has_aux=True))(state.params, train_batch)
    np.testing.assert_allclose(our_loss, float(full_loss), rtol=1e-6)
    assert not all(np.allclose(a, b) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(full_grads)))


def test_high_entropy_tokens_restrict_grpos_surrogate_and_leave_its_kl_on_every_token(toy_config):
    """`algo.entropy_quantile: 0.3` on GRPO (KL in the loss): the clipped surrogate's gradient
    comes from the selected tokens only (TRL masks its per-token policy loss), while the KL's and
    the entropy bonus's reach every completion token (Wang et al. 2025 restrict the policy
    gradient term; verl keeps the entropy and KL terms on all tokens)."""
    quantile = 0.3
    trainer, batch, state, train_batch = setup(toy_config, "grpo", f"algo.entropy_quantile={quantile}")
    scores, mask = torch_batch(batch)

    def loss(logits, ref_logits, **_):
        logp, entropy = logprobs_and_entropy(logits, batch.tokens)
        ref_logp, _ = logprobs_and_entropy(ref_logits, batch.tokens)
        selected = high_entropy_tokens(entropy, mask, quantile)
        surrogate_logp = torch.where(selected > 0, logp, logp.detach())
        advantages = ref.grpo_advantages(scores, K, "group", 1e-4)[:, None]
        ratio = torch.exp(surrogate_logp - logp.detach())
        surrogate = torch.max(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2))
        per_token = surrogate + KL_COEF * k3(logp, ref_logp) - ENTROPY_COEF * entropy
        return ((per_token * mask).sum(-1) / mask.sum(-1)).mean()

    our_loss, grads, _ = our_update(trainer, state.params, train_batch)
    ref_loss, ref_grads = reference_gradient(trainer, state.params, batch, loss)
    np.testing.assert_allclose(our_loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert_grads_equal(grads, ref_grads)


def test_the_overlong_penalty_is_dapos_formula():
    """R_length(y) = 0 for |y| <= L - B, ((L - B) - |y|) / B up to L (DAPO eq. 13), scaled."""
    lengths = np.arange(0, 9)
    expected = [0, 0, 0, 0, 0, 0, 1 / 3, 2 / 3, 1]  # L = 8, B = 3
    np.testing.assert_allclose(overlong_penalty(lengths, 8, 3, 1.0), expected)
    np.testing.assert_allclose(overlong_penalty(lengths, 8, 3, 0.5), 0.5 * np.asarray(expected))


def test_the_trainer_scores_carry_the_overlong_penalty(toy_config):
    """`reward.overlong`: each sampled completion's score is the reward term minus the penalty of
    its length (EOS included), computed here from the sampled tokens."""
    trainer = Trainer(toy_config("reward.overlong={buffer: 3, penalty: 0.5}", "rollout.max_new_tokens=4"))
    batch, samples = trainer.collect()[:2]
    lengths = np.asarray(batch.mask).sum(-1)
    term = np.asarray(toy_rewards.fraction_of_sevens(None, [s.text for s in samples]))
    expected = term - 0.5 * np.clip((lengths - 1) / 3, 0, 1)
    np.testing.assert_allclose(np.asarray(batch.scores), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(batch.finished), [s.finished for s in samples])
