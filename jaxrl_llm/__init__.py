"""jaxrl_llm: online RL for LLMs in JAX/Flax (REINFORCE, RLOO, PPO; GRPO, RAFT for comparison).

The objectives are pure functions of arrays (`jaxrl_llm.objectives`); the sampler,
models, trainer and tasks live in their own subpackages and are imported lazily
by the names below, so `import jaxrl_llm` stays light for research code.
"""

import logging as _logging


class _WithoutTorchNotice(_logging.Filter):
    """transformers announces "PyTorch was not found. Models won't be available" when torch is
    absent; we use only its tokenizers and configs, so the notice reads like a failure that is not
    one. Dropped here, before our first import of transformers; its other messages stay."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not record.getMessage().startswith("PyTorch was not found")


_logging.getLogger("transformers").addFilter(_WithoutTorchNotice())

from jaxrl_llm.errors import UserError  # noqa: E402
from jaxrl_llm.objectives import (  # noqa: E402
    KL_KINDS,
    LOSS_AGGREGATIONS,
    EMABaselineState,
    Stat,
    aggregate_loss,
    best_of_group,
    bradley_terry_loss,
    clipped_surrogate,
    ema_baseline_init,
    ema_baseline_update,
    gae,
    grpo_advantages,
    grpo_loss,
    kept_tokens,
    kl_penalty,
    last_token_mask,
    linear_token_logprobs,
    loss_denominator,
    loss_terms,
    masked_mean,
    masked_sum,
    masked_var,
    ppo_loss,
    raft_loss,
    raft_selection,
    reinforce_advantages,
    reinforce_loss,
    rloo_advantages,
    rloo_loss,
    sequence_rewards,
    shape_rewards,
    summarize,
    token_entropy,
    token_logprobs,
    top_quantile_mask,
    value_loss,
    whiten,
)

from jaxrl_llm import objectives as _objectives

__version__ = "0.1.0"

_LAZY = {
    "generate": "jaxrl_llm.rollout",
    "Rollout": "jaxrl_llm.rollout",
    "sequence_logprobs": "jaxrl_llm.rollout",
    "from_pretrained": "jaxrl_llm.models",
    "save_pretrained": "jaxrl_llm.models",
    "TrainState": "jaxrl_llm.training",
    "Trainer": "jaxrl_llm.training",
    "train": "jaxrl_llm.training",
    "load_config": "jaxrl_llm.training",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxrl_llm' has no attribute {name!r}")


__all__ = [*_objectives.__all__, *_LAZY, "UserError"]
