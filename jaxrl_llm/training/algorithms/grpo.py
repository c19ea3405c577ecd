"""GRPO (Shao et al. 2024, DeepSeekMath): the group-relative advantage of each completion,

    A_i = (score_i - mean_group(score)) / std_group(score)     (`algo.grpo_scale`: group, batch, none)

the same for all its tokens, in a clipped per-token surrogate with the KL to the reference in
the loss (k3 by default: k1's expected gradient there is zero), averaged per completion and
then over completions (`seq-mean-token-mean`). With `grpo_scale: batch` the std spans the batch.
"""

import jaxrl_llm.objectives as obj
from jaxrl_llm.training.algorithms.base import AlgorithmSpec


def advantages(cfg, x, default_scale="group"):
    """The group-relative advantages, divided by `algo.grpo_scale`'s std (None: `default_scale`)."""
    r = x.rollout
    scale = cfg.grpo_scale or default_scale
    return obj.grpo_advantages(r.scores, num_samples=cfg.num_samples, scale=scale, valid=r.valid), None, x.baseline_state


def objective(cfg, x):
    advantages, _, baseline_state = x.advantages()
    # The KL's gradient reaches every token; only the surrogate's is restricted (entropy_quantile).
    loss, aux = obj.grpo_loss(x.logprobs, x.old_logprobs, x.batch.ref_logprobs, advantages, x.token_mask,
                              kl_coef=cfg.kl_coef, kl_kind=x.kl_kind, kl_aggregation=x.regularizer_aggregation,
                              policy_gradient_tokens=x.gradient_tokens, **x.clip_options(),
                              **x.aggregation_options())
    return loss, aux, baseline_state


SPEC = AlgorithmSpec(
    name="grpo",
    summary="(score - group mean) / group std | grpo_loss (KL in the loss, k3)",
    objective=objective,
    advantages=advantages,
    aggregation="seq-mean-token-mean",
    kl_kind="k3",
    ratio_levels=("token", "sequence"),
    min_samples=2,
    batch_wide_advantages=True,
    kl_in_objective=True,
)
