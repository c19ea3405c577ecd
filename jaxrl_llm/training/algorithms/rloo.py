"""RLOO (Kool et al. 2019; Ahmadian et al. 2024): each of the K completions of a prompt is one
action, and its baseline is the mean reward of the other K - 1,

    A_i = R_i - 1/(K-1) sum_{j != i} R_j,   R = score - kl_coef * sum_t kl_t.

One update per batch is exactly the source document's estimator (`rloo_loss`); several clip
one ratio per completion (TRL's RLOO) on the advantages fixed before the updates.
"""

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import (AlgorithmSpec, bandit_loss_options, clipped_objective,
                                                sequence_rewards)


def advantages(cfg, x):
    return obj.rloo_advantages(sequence_rewards(cfg, x), num_samples=cfg.num_samples, valid=x.rollout.valid), \
        None, x.baseline_state


def objective(cfg, x):
    if not x.single_update:
        return clipped_objective(cfg, x)
    loss, aux = obj.rloo_loss(x.policy_logprobs, x.batch.ref_logprobs, x.scores_or_nan, x.rollout.mask,
                              num_samples=cfg.num_samples, **bandit_loss_options(cfg, x))
    return loss, aux, x.batch.baseline_state


SPEC = AlgorithmSpec(
    name="rloo",
    summary="R - mean of the other K-1 samples | rloo_loss",
    objective=objective,
    advantages=advantages,
    aggregation="seq-mean-token-sum",
    ratio_levels=("sequence", "token"),
    min_samples=2,
)
