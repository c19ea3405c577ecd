"""RAFT / rejection-sampling fine-tuning (Dong et al. 2023): supervised learning on the best of
each prompt's K completions (optionally only if it scores at least `algo.raft_min_score`). No
reference and no KL; the loss averages over the selected rows' tokens only.
"""

import jax.numpy as jnp

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import AlgorithmSpec


def selected_rows(cfg, rollout, loss_rows):
    """[N] 0/1: each group's best completion among `loss_rows` (a usable reward and, with
    `algo.mask_truncated_completions`, finished), if it scores at least `raft_min_score`."""
    return obj.raft_selection(jnp.where(loss_rows > 0, rollout.scores, 0.0), num_samples=cfg.num_samples,
                              min_score=cfg.raft_min_score, valid=loss_rows)


def objective(cfg, x):
    # A completion out of the loss can never be the one imitated: its score counts as missing.
    scores = jnp.where(x.loss_rows > 0, x.rollout.scores, jnp.nan)
    loss, aux = obj.raft_loss(x.policy_logprobs, scores, x.rollout.mask, num_samples=cfg.num_samples,
                              min_score=cfg.raft_min_score, nonfinite_scores="mask", **x.aggregation_options())
    return loss, aux, x.batch.baseline_state


SPEC = AlgorithmSpec(
    name="raft",
    summary="- (SFT on the best of K) | raft_loss (no reference, no KL)",
    objective=objective,
    advantages=None,
    aggregation="token-mean",
    ratio_levels=(),
    ratio_note="it has no ratio",
    uses_reference=False,
    reads_sampling_policy=False,
    policy_rows=selected_rows,
)
