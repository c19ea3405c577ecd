"""GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization", https://arxiv.org/abs/2507.18071):
GRPO's group advantages with one importance ratio per completion, normalised by its length,

    s_i = (pi(y_i | x) / pi_old(y_i | x))^(1 / |y_i|) = exp(1/|y_i| sum_t log pi(y_it) - log pi_old(y_it))
    L   = -1/N sum_i min(s_i A_i, clip(s_i, 1 - eps, 1 + eps_high) A_i)

clipped per completion (the paper's clip range is small: 3e-4 below, 4e-4 above). Every token
of a completion then shares its ratio, so one noisy token cannot clip or blow up the update.
The KL to the reference, when `algo.kl_coef > 0`, is GRPO's in-loss term, and it and the entropy
bonus (`algo.entropy_coef`) are each completion's per-token mean (seq-mean-token-mean), as in TRL
and verl, not its sum: the surrogate is one term per completion, the regularisers are per token.
"""

from jaxrl_llm.training.algorithms import grpo
from jaxrl_llm.training.algorithms.base import AlgorithmSpec

SPEC = AlgorithmSpec(
    name="gspo",
    summary="(score - group mean) / group std | clipped sequence ratio (pi/pi_old)^(1/|y|)",
    objective=grpo.objective,
    advantages=grpo.advantages,
    aggregation="seq-mean-token-sum",
    regularizer_aggregation="seq-mean-token-mean",
    kl_kind="k3",
    ratio_levels=("sequence-mean",),
    ratio_note="GSPO is defined by its length-normalised sequence ratio",
    min_samples=2,
    batch_wide_advantages=True,
    kl_in_objective=True,
)
