"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", https://arxiv.org/abs/2503.20783):
GRPO without its two length and difficulty biases,

    A_i = score_i - mean_group(score)                      (no division by the group's std)
    L   = 1/N sum_i sum_t l_it / T                         (T = rollout.max_new_tokens, a constant)

where GRPO divides each completion's token sum by its own length |y_i| (long wrong answers are
penalised less per token) and scales advantages by the group std (easy and hard prompts weigh
more). The clipped per-token surrogate and the in-loss KL are GRPO's (`grpo_loss`).
"""

import functools

from jaxrl_llm.training.algorithms import grpo
from jaxrl_llm.training.algorithms.base import AlgorithmSpec


SPEC = AlgorithmSpec(
    name="dr_grpo",
    summary="score - group mean (no std) | grpo_loss, token sums / max length",
    objective=grpo.objective,
    advantages=functools.partial(grpo.advantages, default_scale="none"),
    aggregation="seq-mean-token-sum-norm",
    kl_kind="k3",
    ratio_levels=("token", "sequence"),
    min_samples=2,
    batch_wide_advantages=True,
    kl_in_objective=True,
)
