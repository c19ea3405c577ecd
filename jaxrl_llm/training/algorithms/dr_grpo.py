"""Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training", https://arxiv.org/abs/2503.20783):
GRPO without its two length and difficulty biases,

    A_i = score_i - mean_group(score)                      (no division by the group's std)
    L   = 1/N sum_i sum_t l_it / T                         (T = rollout.max_new_tokens, a constant)

where GRPO divides each completion's token sum by its own length |y_i| (long wrong answers are
penalised less per token) and scales advantages by the group std (easy and hard prompts weigh
more). The clipped per-token surrogate and the in-loss KL are GRPO's (`grpo_loss`).
"""

import dataclasses
import functools

from jaxrl_llm.training.algorithms import grpo

# GRPO's spec with the two biases removed; everything else (objective, KL, ratio levels) is GRPO's.
SPEC = dataclasses.replace(
    grpo.SPEC,
    name="dr_grpo",
    summary="score - group mean (no std) | grpo_loss, token sums / max length",
    advantages=functools.partial(grpo.advantages, default_scale="none"),
    aggregation="seq-mean-token-sum-norm",
)
