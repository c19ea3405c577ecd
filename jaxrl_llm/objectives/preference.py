"""The Bradley–Terry loss of a reward model on preference pairs.

Bradley & Terry (1952); as the reward-model loss of RLHF in Stiennon et al. 2020 ("Learning
to summarize from human feedback") and Ouyang et al. 2022: with r_c and r_r the scalar
rewards of the chosen and the rejected response to the same prompt,

    loss = mean_i -log sigmoid(r_c,i - r_r,i - m_i)  +  c * mean_i (r_c,i + r_r,i)^2

m_i is an optional per-pair margin (Llama 2's graded preferences) and c TRL's
`center_rewards_coefficient` (Eisenstein et al. 2023), which keeps the rewards centred on 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxrl_llm.objectives import _checks
from jaxrl_llm.objectives.aggregation import Stat


def bradley_terry_loss(chosen_rewards, rejected_rewards, *, margin=None, center_coef: float = 0.0,
                       weights=None, denominator=None):
    """`(loss, aux)` of a batch of preference pairs.

    Args:
      chosen_rewards, rejected_rewards: [B] scalar rewards of the preferred and the other response.
      margin: None, a scalar or [B]: how much the chosen reward should exceed the rejected one.
      center_coef: weight of the centring term mean((r_c + r_r)^2); 0 disables it.
      weights: None or [B] 0/1: the pairs that count (padding rows of a fixed-size batch are 0).
      denominator: the number of pairs to average over (default: the pairs that count): pass the
        whole batch's when this is one micro-batch of it, so that micro-batch losses add up.
    Returns:
      loss: scalar. aux: `accuracy` (r_c > r_r), `reward_margin` (r_c - r_r), `chosen_reward`,
      `rejected_reward`, each a `Stat` over the pairs.
    """
    chosen = _checks.as_float(chosen_rewards)
    rejected = _checks.as_float(rejected_rewards)
    _checks.check_rank("chosen_rewards", chosen, 1, what="[B] one reward per pair")
    _checks.check_shape("rejected_rewards", rejected, chosen.shape, like="chosen_rewards")
    if center_coef < 0:
        raise ValueError(f"center_coef: got {center_coef}, expected >= 0")
    difference = chosen - rejected
    if margin is not None:
        margin = _checks.as_float(margin)
        if margin.ndim not in (0, 1) or (margin.ndim == 1 and margin.shape != chosen.shape):
            raise ValueError(f"margin: got shape {margin.shape}, expected a scalar or {chosen.shape} like chosen_rewards")
        difference = difference - margin
    w = jnp.ones_like(chosen) if weights is None else _checks.as_float(weights)
    _checks.check_shape("weights", w, chosen.shape, like="chosen_rewards")
    count = jnp.maximum(jnp.sum(w), 1.0) if denominator is None else denominator
    loss = -jnp.sum(w * jax.nn.log_sigmoid(difference)) / count
    if center_coef:
        loss = loss + center_coef * jnp.sum(w * jnp.square(chosen + rejected)) / count
    aux = {
        "accuracy": Stat.of((chosen > rejected).astype(jnp.float32), w),
        "reward_margin": Stat.of(chosen - rejected, w),
        "chosen_reward": Stat.of(chosen, w),
        "rejected_reward": Stat.of(rejected, w),
    }
    return loss, aux


__all__ = ["bradley_terry_loss"]
