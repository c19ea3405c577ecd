"""Vanilla policy gradient: REINFORCE without a baseline, A = R = score - kl_coef * sum_t kl_t
(Williams 1992). The control of the source document's comparison."""

import jax.numpy as jnp

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import (AlgorithmSpec, bandit_loss_options, clipped_objective,
                                                sequence_rewards)


def advantages(cfg, x):
    return obj.reinforce_advantages(sequence_rewards(cfg, x), baseline=jnp.zeros(()), valid=x.rollout.valid), \
        None, x.baseline_state


def objective(cfg, x):
    if not x.single_update:
        return clipped_objective(cfg, x)
    loss, aux = obj.reinforce_loss(x.policy_logprobs, x.batch.ref_logprobs, x.scores_or_nan, x.rollout.mask,
                                   baseline=jnp.zeros(()), **bandit_loss_options(cfg, x))
    return loss, aux, x.batch.baseline_state


SPEC = AlgorithmSpec(
    name="vanilla_pg",
    summary="R (no baseline) | reinforce_loss(baseline=0)",
    objective=objective,
    advantages=advantages,
    aggregation="seq-mean-token-sum",
    ratio_levels=("sequence", "token"),
)
