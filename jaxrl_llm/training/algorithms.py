"""Each algorithm as two pure functions composed from `jaxrl_llm.objectives`.

`prepare(state, rollout) -> (state, batch)` computes what stays fixed during the
updates of one RL step: the rollout-time ("old") and reference log-probabilities,
the critic's values, and the advantages. `loss(params, ref_params, batch) ->
(loss, aux)` is what the optimizer differentiates, once or for several
epochs x minibatches.

| algorithm  | advantage                                  | loss                                     |
|------------|--------------------------------------------|------------------------------------------|
| vanilla_pg | R (no baseline)                            | reinforce_loss(baseline=0)               |
| reinforce  | R - batch mean (or EMA of past batches)    | reinforce_loss                           |
| rloo       | R - mean of the other K-1 samples          | rloo_loss                                |
| grpo       | (score - group mean) / group std           | grpo_loss (KL in the loss)               |
| raft       | - (SFT on the best of K)                   | raft_loss                                |
| ppo        | GAE on KL-shaped token rewards, whitened   | ppo_loss with the clipped value loss     |

R = score - kl_coef * sum_t kl_t (the bandit reward of the source document).
With more than one update per batch, REINFORCE/RLOO switch to the clipped ratio
of `ppo_loss` on their sequence advantages (as TRL does); with one update they
are exactly the seed's estimator.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jaxrl_llm.objectives as obj
from jaxrl_llm import models
from jaxrl_llm.training.config import AlgoConfig

BANDIT = ("reinforce", "vanilla_pg", "rloo")
DEFAULT_AGGREGATION = {
    "reinforce": "seq-mean-token-sum",
    "vanilla_pg": "seq-mean-token-sum",
    "rloo": "seq-mean-token-sum",
    "grpo": "seq-mean-token-mean",
    "raft": "token-mean",
    "ppo": "token-mean",
}


class RolloutBatch(NamedTuple):
    """What the sampler and the reward produced; N = prompts * K, prompt-major."""

    prompt_ids: jax.Array  # [N, P] left-padded
    prompt_mask: jax.Array  # [N, P]
    tokens: jax.Array  # [N, T] completion tokens
    mask: jax.Array  # [N, T] 1 up to and including EOS
    scores: jax.Array  # [N] total reward (0 where invalid)
    valid: jax.Array  # [N] bool: the reward is usable


class TrainBatch(NamedTuple):
    rollout: RolloutBatch
    old_logprobs: jax.Array | None  # [N, T] under the sampling policy at its temperature (None: not needed)
    ref_logprobs: jax.Array  # [N, T]
    advantages: jax.Array  # [N] (bandit, grpo) or [N, T] (ppo)
    baseline: jax.Array  # scalar REINFORCE baseline (0 for others)
    old_values: jax.Array | None  # [N, T] PPO only
    returns: jax.Array | None  # [N, T] PPO only


class Forward(NamedTuple):
    logprobs: jax.Array  # [N, T]
    entropy: jax.Array  # [N, T]
    hidden: jax.Array  # [N, P + T, D] final hidden states of the whole sequence


def sequence_inputs(rollout: RolloutBatch):
    """Prompt + completion ids and attention mask. Tokens after EOS are attended by nothing
    that matters: attention is causal and their own outputs are masked out of every loss."""
    ids = jnp.concatenate([rollout.prompt_ids, rollout.tokens], axis=1)
    attention = jnp.concatenate([rollout.prompt_mask, jnp.ones_like(rollout.tokens)], axis=1)
    return ids, attention


def completion_slice(x, rollout: RolloutBatch):
    """Positions P-1 .. P+T-2 of a [N, P+T, ...] array: the ones that predict completion tokens."""
    p, t = rollout.prompt_ids.shape[1], rollout.tokens.shape[1]
    return x[:, p - 1 : p - 1 + t]


def policy_forward(graphdef, params, rollout: RolloutBatch, *, temperature, chunk_size) -> Forward:
    """Log-probabilities and entropies of the completion tokens at the sampling temperature."""
    model = nnx.merge(graphdef, params)
    ids, attention = sequence_inputs(rollout)
    hidden = models.hidden_states(model, ids, attention)
    # Straight from hidden states: the [N, T, V] logits exist only chunk_size rows at a time.
    logprobs, entropy = obj.linear_token_logprobs(
        completion_slice(hidden, rollout), model.unembedding_matrix(), rollout.tokens,
        temperature=temperature, chunk_size=chunk_size, softcap=model.final_logit_softcapping)
    return Forward(logprobs, entropy, hidden)


def critic_values(critic_graphdef, critic_params, rollout: RolloutBatch, policy_hidden):
    """V(s_t) for each completion token t: the critic's value at the position before it."""
    critic = nnx.merge(critic_graphdef, critic_params)
    if critic.layout == "shared":
        values = critic(hidden=policy_hidden)
    else:
        ids, attention = sequence_inputs(rollout)
        values = critic(ids, attention)
    return completion_slice(values, rollout)


class Algorithm:
    """The prepare/loss pair of one algorithm, closed over the model graph and the config."""

    def __init__(self, algo: AlgoConfig, *, graphdef, critic_graphdef=None, temperature: float,
                 chunk_size: int | None):
        self.cfg = algo
        self.graphdef = graphdef
        self.critic_graphdef = critic_graphdef
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.aggregation = algo.aggregation or DEFAULT_AGGREGATION[algo.name]
        self.single_update = algo.update_epochs == 1 and algo.num_minibatches == 1
        # One update of RLOO, vanilla PG or batch-mean REINFORCE needs no "old" forward pass:
        # its loss computes rewards and advantages from the current policy, which sampled.
        self.loss_needs_only_reference = self.single_update and (
            algo.name in ("rloo", "vanilla_pg") or (algo.name == "reinforce" and algo.baseline == "batch"))
        if (algo.name == "ppo") != (critic_graphdef is not None):
            raise ValueError("A critic is built for PPO and only for PPO.")

    def _forward(self, params, rollout):
        return policy_forward(self.graphdef, params, rollout, temperature=self.temperature, chunk_size=self.chunk_size)

    # -- before the updates: old/ref logprobs, values, advantages -----------------------------
    def prepare(self, state, rollout: RolloutBatch):
        cfg = self.cfg
        valid, scores, mask = rollout.valid, rollout.scores, rollout.mask
        token_mask = mask * valid[:, None]
        ref_logprobs = jax.lax.stop_gradient(self._forward(state.ref_params, rollout).logprobs)
        baseline = jnp.zeros((), jnp.float32)
        old_logprobs = old_values = returns = None
        metrics = {}
        if self.loss_needs_only_reference:
            # The loss recomputes everything else from the current (= sampling) policy.
            batch = TrainBatch(rollout, None, ref_logprobs, jnp.zeros_like(scores), baseline, None, None)
            return state, batch, metrics
        old = self._forward(state.params["policy"], rollout)
        old_logprobs = jax.lax.stop_gradient(old.logprobs)
        metrics["kl"] = obj.masked_mean(obj.kl_penalty(old_logprobs, ref_logprobs, kind="k1"), token_mask)
        metrics["entropy"] = obj.masked_mean(old.entropy, token_mask)
        if cfg.name in BANDIT:
            seq_rewards = obj.sequence_rewards(scores, old_logprobs, ref_logprobs, mask,
                                               kl_coef=cfg.kl_coef, kind=cfg.kl_kind)
            if cfg.name == "rloo":
                advantages = obj.rloo_advantages(seq_rewards, num_samples=cfg.num_samples, valid=valid)
            else:
                if cfg.name == "reinforce" and cfg.baseline == "ema":
                    new_baseline_state, baseline = obj.ema_baseline_update(
                        state.baseline, seq_rewards, decay=cfg.ema_decay, valid=valid)
                    state = state.replace(baseline=new_baseline_state)
                elif cfg.name == "reinforce":
                    baseline = obj.masked_mean(seq_rewards, valid)
                advantages = obj.reinforce_advantages(seq_rewards, baseline=baseline, valid=valid)
        elif cfg.name == "grpo":
            advantages = obj.grpo_advantages(scores, num_samples=cfg.num_samples, scale=cfg.grpo_scale, valid=valid)
        elif cfg.name == "raft":
            advantages = jnp.zeros_like(scores)
        else:  # ppo
            old_values = jax.lax.stop_gradient(
                critic_values(self.critic_graphdef, state.params["critic"], rollout, old.hidden))
            token_rewards = obj.shape_rewards(scores, old_logprobs, ref_logprobs, mask,
                                              kl_coef=cfg.kl_coef, kind=cfg.kl_kind)
            advantages, returns = obj.gae(token_rewards, old_values, token_mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = obj.whiten(advantages, token_mask)
        batch = TrainBatch(rollout, old_logprobs, ref_logprobs, jax.lax.stop_gradient(advantages), baseline,
                           old_values, returns)
        return state, batch, metrics

    # -- the differentiated loss ---------------------------------------------------------------
    def loss(self, params, batch: TrainBatch):
        cfg, rollout = self.cfg, batch.rollout
        mask = rollout.mask * rollout.valid[:, None]
        fwd = self._forward(params["policy"], rollout)
        nan_if_invalid = jnp.where(rollout.valid, rollout.scores, jnp.nan)
        common = dict(aggregation=self.aggregation)
        if cfg.name in BANDIT and self.single_update:
            bandit = dict(kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, nonfinite_scores="mask", **common)
            if cfg.name == "rloo":
                loss, aux = obj.rloo_loss(fwd.logprobs, batch.ref_logprobs, nan_if_invalid, rollout.mask,
                                          num_samples=cfg.num_samples, **bandit)
            else:
                baseline = None if (cfg.name == "reinforce" and cfg.baseline == "batch") else batch.baseline
                loss, aux = obj.reinforce_loss(fwd.logprobs, batch.ref_logprobs, nan_if_invalid, rollout.mask,
                                               baseline=baseline, **bandit)
        elif cfg.name in BANDIT:
            loss, aux = obj.ppo_loss(fwd.logprobs, batch.old_logprobs, batch.advantages, mask,
                                     clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, **common)
        elif cfg.name == "grpo":
            loss, aux = obj.grpo_loss(fwd.logprobs, batch.old_logprobs, batch.ref_logprobs, batch.advantages, mask,
                                      clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                      kl_coef=cfg.kl_coef, kl_kind="k3", **common)
        elif cfg.name == "raft":
            loss, aux = obj.raft_loss(fwd.logprobs, nan_if_invalid, rollout.mask, num_samples=cfg.num_samples,
                                      min_score=cfg.raft_min_score, nonfinite_scores="mask", **common)
        else:  # ppo
            values = critic_values(self.critic_graphdef, params["critic"], rollout, fwd.hidden)
            loss, aux = obj.ppo_loss(fwd.logprobs, batch.old_logprobs, batch.advantages, mask,
                                     clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                     values=values, old_values=batch.old_values, returns=batch.returns,
                                     value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
                                     entropy=fwd.entropy, entropy_coef=cfg.entropy_coef, **common)
        entropy_term, entropy_stat = obj.aggregate_loss(fwd.entropy, mask, "token-mean")
        if cfg.entropy_coef and cfg.name != "ppo":
            entropy_term, _ = obj.aggregate_loss(fwd.entropy, mask, self.aggregation)
            loss = loss - cfg.entropy_coef * entropy_term
        aux.setdefault("entropy", entropy_stat)
        return loss, aux


def minibatch_indices(key, num_prompts: int, num_samples: int, num_minibatches: int):
    """Shuffled sequence indices [num_minibatches, N / num_minibatches], whole groups together."""
    groups = jax.random.permutation(key, num_prompts).reshape(num_minibatches, -1)
    return (groups[..., None] * num_samples + jnp.arange(num_samples)).reshape(num_minibatches, -1)


def take(batch: Any, indices):
    """Rows `indices` of every [N, ...] array of a batch (scalars stay as they are)."""
    return jax.tree.map(lambda x: x[indices] if jnp.ndim(x) >= 1 else x, batch)
