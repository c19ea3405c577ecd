"""PPO (Schulman et al. 2017) as RLHF uses it (Ziegler et al. 2019; Ouyang et al. 2022): per-token
rewards r_t = -kl_coef * kl_t plus the score on the last token, GAE advantages from a learned
critic, whitened over the batch, a clipped per-token surrogate and a clipped value loss. The
critic is a fourth model (`algo.critic: separate`) or a head on the policy (`shared`).
"""

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import AlgorithmSpec


def advantages(cfg, x):
    r = x.rollout
    token_mask = r.mask * r.valid[:, None]
    token_rewards = obj.shape_rewards(r.scores, x.sampling_logprobs, x.ref_logprobs, r.mask, kl_coef=cfg.kl_coef,
                                      kind=x.kl_kind)
    advantages, returns = obj.gae(token_rewards, x.old_values, token_mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = obj.whiten(advantages, token_mask)
    return advantages, returns, x.baseline_state


def objective(cfg, x):
    advantages, returns, baseline_state = x.advantages()
    loss, aux = obj.ppo_loss(x.policy_logprobs, x.old_logprobs, advantages, x.token_mask, **x.clip_options(),
                             values=x.values, old_values=x.old_values, returns=returns, value_clip=cfg.value_clip,
                             vf_coef=cfg.vf_coef, entropy=x.entropy, entropy_coef=cfg.entropy_coef,
                             **x.aggregation_options())
    return loss, aux, baseline_state


SPEC = AlgorithmSpec(
    name="ppo",
    summary="GAE on KL-shaped token rewards, whitened | ppo_loss with the clipped value loss",
    objective=objective,
    advantages=advantages,
    aggregation="token-mean",
    ratio_levels=("token",),
    ratio_note="GAE gives one advantage per token, and a sequence ratio needs one per completion",
    critic=True,
    batch_wide_advantages=True,
    spans_batch_reads_policy=True,
    entropy_bonus_in_objective=True,
)
