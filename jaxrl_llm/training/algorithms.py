"""Each algorithm as two pure functions composed from `jaxrl_llm.objectives`.

`prepare(state, rollout) -> (state, batch, metrics)` computes what stays fixed during the
updates of one RL step: the reference log-probabilities and, when there are several updates
per batch, the rollout-time ("old") log-probabilities, the critic's old values and the
advantages. `loss(params, batch) -> (loss, (aux, baseline_state))` is what the optimizer
differentiates, once or for several epochs x minibatches.

| algorithm  | advantage                                  | loss                                     |
|------------|--------------------------------------------|------------------------------------------|
| vanilla_pg | R (no baseline)                            | reinforce_loss(baseline=0)               |
| reinforce  | R - batch mean (or EMA of past batches)    | reinforce_loss                           |
| rloo       | R - mean of the other K-1 samples          | rloo_loss                                |
| grpo       | (score - group mean) / group std           | grpo_loss (KL in the loss, k3)           |
| raft       | - (SFT on the best of K)                   | raft_loss (no reference, no KL)          |
| ppo        | GAE on KL-shaped token rewards, whitened   | ppo_loss with the clipped value loss     |

R = score - kl_coef * sum_t kl_t (the bandit reward of the source document), kl_t the
`algo.kl_kind` estimator (k1 by default; GRPO's in-loss KL defaults to k3).

One update per batch (the default): the policy being differentiated is the one that
sampled, so no "old" forward pass runs. REINFORCE/RLOO are exactly the seed's estimator
(`reinforce_loss`, `rloo_loss`); GRPO and PPO take the current log-probabilities (and PPO the
current values) under stop_gradient as the old ones, as TRL does: the ratio is exactly 1.

Several updates per batch (`update_epochs > 1` or `num_minibatches > 1`): advantages are
fixed in `prepare` from an old forward pass, and every algorithm but RAFT optimises the
clipped surrogate of `ppo_loss` / `grpo_loss`. `algo.ratio_level` says what one ratio is:
`sequence` (the default for reinforce, vanilla_pg and rloo) clips one ratio per completion,
exp(sum_t log pi - log pi_old), as TRL's RLOO does, so the whole completion stays one action;
`token` (the default for ppo and grpo) clips each token's ratio.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import jaxrl_llm.objectives as obj
from jaxrl_llm import models
from jaxrl_llm.objectives import Stat
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


def default_kl_kind(name: str) -> str:
    """k3 for GRPO's KL in the loss (k1 there has zero expected gradient), k1 in every reward."""
    return "k3" if name == "grpo" else "k1"


def default_ratio_level(name: str) -> str:
    """One ratio per completion for the bandit algorithms, per token for PPO and GRPO."""
    return "sequence" if name in BANDIT else "token"


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
    old_logprobs: jax.Array | None  # [N, T] sampling policy at its temperature (None: one update, the loss's own)
    ref_logprobs: jax.Array | None  # [N, T] (None: RAFT, which has no reference term)
    advantages: jax.Array | None  # [N] (bandit, grpo) or [N, T] (ppo); None: computed in the loss
    baseline_state: obj.EMABaselineState | None  # REINFORCE's EMA baseline (before this batch if the loss advances it)
    old_values: jax.Array | None  # [N, T] PPO with several updates only
    returns: jax.Array | None  # [N, T] PPO with several updates only


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


def policy_forward(graphdef, params, rollout: RolloutBatch, *, temperature, chunk_size, top_k=0,
                   top_p=1.0) -> Forward:
    """Log-probabilities and entropies of the completion tokens under the sampling distribution
    (its temperature and top-k / top-p set; pass the defaults for a reference policy)."""
    model = nnx.merge(graphdef, params)
    ids, attention = sequence_inputs(rollout)
    hidden = models.hidden_states(model, ids, attention)
    # Straight from hidden states: the [N, T, V] logits exist only chunk_size rows at a time.
    logprobs, entropy = obj.linear_token_logprobs(
        completion_slice(hidden, rollout), model.unembedding_matrix(), rollout.tokens,
        temperature=temperature, chunk_size=chunk_size, softcap=model.final_logit_softcapping,
        top_k=top_k, top_p=top_p)
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
                 chunk_size: int | None, top_k: int = 0, top_p: float = 1.0):
        self.cfg = algo
        self.graphdef = graphdef
        self.critic_graphdef = critic_graphdef
        self.temperature = temperature
        self.top_k, self.top_p = top_k, top_p
        self.chunk_size = chunk_size
        self.aggregation = algo.aggregation or DEFAULT_AGGREGATION[algo.name]
        self.kl_kind = algo.kl_kind or default_kl_kind(algo.name)
        self.ratio_level = algo.ratio_level or default_ratio_level(algo.name)
        self.single_update = algo.update_epochs == 1 and algo.num_minibatches == 1
        self.uses_reference = algo.name != "raft"
        # RAFT's loss reads no "old" log-probabilities; the others need them once for several updates.
        self.needs_old_forward = not self.single_update and algo.name != "raft"
        if (algo.name == "ppo") != (critic_graphdef is not None):
            raise ValueError("A critic is built for PPO and only for PPO.")

    def _forward(self, params, rollout):
        return policy_forward(self.graphdef, params, rollout, temperature=self.temperature,
                              chunk_size=self.chunk_size, top_k=self.top_k, top_p=self.top_p)

    def _reference_logprobs(self, ref_params, rollout):
        # The reference is the frozen base policy's full softmax (at the sampling temperature):
        # a top-k / top-p set of its own would give sampled tokens log-probability -inf.
        ref = policy_forward(self.graphdef, ref_params, rollout, temperature=self.temperature,
                             chunk_size=self.chunk_size)
        return jax.lax.stop_gradient(ref.logprobs)

    def _ema_baseline(self, baseline_state, rollout: RolloutBatch, sampling_logprobs, ref_logprobs):
        """`(baseline_state after this batch, baseline for this batch)` of REINFORCE's EMA baseline."""
        seq_rewards = obj.sequence_rewards(rollout.scores, sampling_logprobs, ref_logprobs, rollout.mask,
                                           kl_coef=self.cfg.kl_coef, kind=self.kl_kind)
        return obj.ema_baseline_update(baseline_state, seq_rewards, decay=self.cfg.ema_decay, valid=rollout.valid)

    def _advantages(self, baseline_state, rollout: RolloutBatch, sampling_logprobs, ref_logprobs, old_values):
        """`(advantages, returns or None, baseline_state)` from the sampling policy's log-probabilities."""
        cfg = self.cfg
        valid, scores, mask = rollout.valid, rollout.scores, rollout.mask
        returns = None
        if cfg.name in BANDIT:
            seq_rewards = obj.sequence_rewards(scores, sampling_logprobs, ref_logprobs, mask,
                                               kl_coef=cfg.kl_coef, kind=self.kl_kind)
            if cfg.name == "rloo":
                advantages = obj.rloo_advantages(seq_rewards, num_samples=cfg.num_samples, valid=valid)
            elif cfg.name == "vanilla_pg":
                advantages = obj.reinforce_advantages(seq_rewards, baseline=jnp.zeros(()), valid=valid)
            elif cfg.baseline == "ema":
                baseline_state, baseline = self._ema_baseline(baseline_state, rollout, sampling_logprobs, ref_logprobs)
                advantages = obj.reinforce_advantages(seq_rewards, baseline=baseline, valid=valid)
            else:
                advantages = obj.reinforce_advantages(seq_rewards, valid=valid)
        elif cfg.name == "grpo":
            advantages = obj.grpo_advantages(scores, num_samples=cfg.num_samples, scale=cfg.grpo_scale, valid=valid)
        elif cfg.name == "raft":
            advantages = None
        else:  # ppo
            token_mask = mask * valid[:, None]
            token_rewards = obj.shape_rewards(scores, sampling_logprobs, ref_logprobs, mask,
                                              kl_coef=cfg.kl_coef, kind=self.kl_kind)
            advantages, returns = obj.gae(token_rewards, old_values, token_mask, gamma=cfg.gamma, lam=cfg.lam)
            if cfg.whiten_advantages:
                advantages = obj.whiten(advantages, token_mask)
        return jax.lax.stop_gradient((advantages, returns)) + (baseline_state,)

    # -- before the updates: ref logprobs; with several updates also old logprobs, values, advantages --
    def prepare(self, state, rollout: RolloutBatch):
        ref_logprobs = self._reference_logprobs(state.ref_params, rollout) if self.uses_reference else None
        if not self.needs_old_forward:
            # The loss differentiates the policy that sampled: it computes the rest itself.
            return state, TrainBatch(rollout, None, ref_logprobs, None, state.baseline, None, None), {}
        old = self._forward(state.params["policy"], rollout)
        old_logprobs = jax.lax.stop_gradient(old.logprobs)
        old_values = None
        if self.cfg.name == "ppo":
            old_values = jax.lax.stop_gradient(
                critic_values(self.critic_graphdef, state.params["critic"], rollout, old.hidden))
        advantages, returns, baseline_state = self._advantages(state.baseline, rollout, old_logprobs,
                                                               ref_logprobs, old_values)
        state = state.replace(baseline=baseline_state)
        token_mask = rollout.mask * rollout.valid[:, None]
        # Measured once on the whole batch, on the policy that sampled (the minibatches' own
        # means would not average to it).
        metrics = {"entropy": obj.masked_mean(old.entropy, token_mask)}
        metrics.update({key: stat.mean for key, stat in self._kl_metrics(old_logprobs, ref_logprobs, token_mask).items()})
        batch = TrainBatch(rollout, old_logprobs, ref_logprobs, advantages, baseline_state, old_values, returns)
        return state, batch, metrics

    # -- the differentiated loss ---------------------------------------------------------------
    def loss(self, params, batch: TrainBatch):
        """`(loss, (aux, baseline_state))`: `aux` a dict of `Stat`s; `baseline_state` the EMA
        baseline after this batch (None unless REINFORCE with `baseline: ema`)."""
        cfg, rollout = self.cfg, batch.rollout
        mask = rollout.mask * rollout.valid[:, None]
        fwd = self._forward(params["policy"], rollout)
        values = None
        if cfg.name == "ppo":
            values = critic_values(self.critic_graphdef, params["critic"], rollout, fwd.hidden)
        # With one update the policy that sampled is this one: its log-probs (and values) are the old ones.
        if self.single_update:
            old_logprobs, old_values = jax.lax.stop_gradient((fwd.logprobs, values))
        else:
            old_logprobs, old_values = batch.old_logprobs, batch.old_values
        baseline_state = batch.baseline_state
        common = dict(aggregation=self.aggregation)
        clip = dict(clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high, ratio_level=self.ratio_level)
        # The public losses drop non-finite scores themselves (nonfinite_scores="mask").
        nan_if_invalid = jnp.where(rollout.valid, rollout.scores, jnp.nan)
        if cfg.name in BANDIT and self.single_update:
            # The source document's estimator, through the public losses.
            bandit = dict(kl_coef=cfg.kl_coef, kl_kind=self.kl_kind, nonfinite_scores="mask", **common)
            if cfg.name == "rloo":
                loss, aux = obj.rloo_loss(fwd.logprobs, batch.ref_logprobs, nan_if_invalid, rollout.mask,
                                          num_samples=cfg.num_samples, **bandit)
            else:
                baseline = None  # batch mean
                if cfg.name == "vanilla_pg":
                    baseline = jnp.zeros(())
                elif cfg.baseline == "ema":
                    baseline_state, baseline = self._ema_baseline(baseline_state, rollout, old_logprobs,
                                                                  batch.ref_logprobs)
                loss, aux = obj.reinforce_loss(fwd.logprobs, batch.ref_logprobs, nan_if_invalid, rollout.mask,
                                               baseline=baseline, **bandit)
        elif cfg.name == "raft":
            loss, aux = obj.raft_loss(fwd.logprobs, nan_if_invalid, rollout.mask, num_samples=cfg.num_samples,
                                      min_score=cfg.raft_min_score, nonfinite_scores="mask", **common)
        else:
            advantages, returns = batch.advantages, batch.returns
            if self.single_update:
                advantages, returns, baseline_state = self._advantages(
                    baseline_state, rollout, old_logprobs, batch.ref_logprobs, old_values)
            if cfg.name == "grpo":
                loss, aux = obj.grpo_loss(fwd.logprobs, old_logprobs, batch.ref_logprobs, advantages, mask,
                                          kl_coef=cfg.kl_coef, kl_kind=self.kl_kind, **clip, **common)
            elif cfg.name == "ppo":
                loss, aux = obj.ppo_loss(fwd.logprobs, old_logprobs, advantages, mask, **clip,
                                         values=values, old_values=old_values, returns=returns,
                                         value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
                                         entropy=fwd.entropy, entropy_coef=cfg.entropy_coef, **common)
            else:  # reinforce, vanilla_pg, rloo with several updates
                loss, aux = obj.ppo_loss(fwd.logprobs, old_logprobs, advantages, mask, **clip, **common)
        if cfg.entropy_coef and cfg.name != "ppo":  # ppo_loss has the bonus inside
            entropy_term, _ = obj.aggregate_loss(fwd.entropy, mask, self.aggregation)
            loss = loss - cfg.entropy_coef * entropy_term
        aux["entropy"] = obj.aggregate_loss(fwd.entropy, mask, "token-mean")[1]
        aux.update(self._kl_metrics(old_logprobs, batch.ref_logprobs, mask))
        return loss, (aux, baseline_state)

    def _kl_metrics(self, sampling_logprobs, ref_logprobs, mask):
        """One definition of `kl` for every algorithm: the k1 estimate of KL(pi || pi_ref) per valid
        completion token, under the policy that sampled. `kl/objective` is the estimator the
        objective puts in the reward (grpo_loss reports its in-loss one itself); RAFT has neither."""
        if not self.uses_reference:
            return {}
        metrics = {"kl": Stat.of(obj.kl_penalty(sampling_logprobs, ref_logprobs, kind="k1"), mask)}
        if self.cfg.name != "grpo":
            metrics["kl/objective"] = Stat.of(obj.kl_penalty(sampling_logprobs, ref_logprobs, kind=self.kl_kind), mask)
        return metrics


def minibatch_indices(key, num_prompts: int, num_samples: int, num_minibatches: int):
    """Shuffled sequence indices [num_minibatches, N / num_minibatches], whole groups together."""
    groups = jax.random.permutation(key, num_prompts).reshape(num_minibatches, -1)
    return (groups[..., None] * num_samples + jnp.arange(num_samples)).reshape(num_minibatches, -1)


def take(batch: Any, indices):
    """Rows `indices` of every [N, ...] array of a batch (scalars stay as they are)."""
    return jax.tree.map(lambda x: x[indices] if jnp.ndim(x) >= 1 else x, batch)
