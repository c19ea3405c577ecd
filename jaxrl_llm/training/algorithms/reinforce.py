"""REINFORCE with a baseline (Williams 1992), the source document's first estimator:
A = R - b, R = score - kl_coef * sum_t kl_t, with b the mean bandit reward of the batch
(`algo.baseline: batch`) or an exponential moving average of past batches' (`ema`, decay
`algo.ema_decay`, advanced once per batch).

The baseline spans the whole batch: with micro-batches it is fixed in `prepare` from a
forward pass of the sampling policy (a micro-batch's own mean is not the batch's).
"""

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import (AlgorithmSpec, bandit_loss_options, clipped_objective,
                                                sequence_rewards)


def uses_ema_baseline(cfg) -> bool:
    return cfg.baseline == "ema"


def ema_baseline(cfg, x):
    """`(baseline_state after this batch, baseline for this batch)` of the EMA baseline."""
    return obj.ema_baseline_update(x.baseline_state, sequence_rewards(cfg, x), decay=cfg.ema_decay,
                                   valid=x.rollout.valid)


def batch_baseline(cfg, x):
    """`(baseline_state, b)`: the baseline over the whole batch (EMA or batch mean)."""
    if uses_ema_baseline(cfg):
        return ema_baseline(cfg, x)
    return x.baseline_state, obj.masked_mean(sequence_rewards(cfg, x), x.rollout.valid)


def advantages(cfg, x):
    baseline_state = x.baseline_state
    seq_rewards = sequence_rewards(cfg, x)
    if uses_ema_baseline(cfg):
        baseline_state, baseline = ema_baseline(cfg, x)
        return obj.reinforce_advantages(seq_rewards, baseline=baseline, valid=x.rollout.valid), None, baseline_state
    return obj.reinforce_advantages(seq_rewards, valid=x.rollout.valid), None, baseline_state


def objective(cfg, x):
    if not x.single_update:
        return clipped_objective(cfg, x)
    b = x.batch
    baseline, baseline_state = b.baseline, b.baseline_state  # fixed in `prepare` for micro-batches
    if uses_ema_baseline(cfg) and baseline is None:
        baseline_state, baseline = ema_baseline(cfg, x.advantage_inputs())
    loss, aux = obj.reinforce_loss(x.policy_logprobs, b.ref_logprobs, x.scores_or_nan, x.rollout.mask,
                                   baseline=baseline, **bandit_loss_options(cfg, x))  # None: the batch mean
    return loss, aux, baseline_state


SPEC = AlgorithmSpec(
    name="reinforce",
    summary="R - batch mean (or EMA of past batches) | reinforce_loss",
    objective=objective,
    advantages=advantages,
    aggregation="seq-mean-token-sum",
    ratio_levels=("sequence", "token"),
    spans_batch_reads_policy=True,
    batch_baseline=batch_baseline,
    uses_ema_baseline=uses_ema_baseline,
)
