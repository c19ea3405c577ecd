"""The RL algorithms: one module per algorithm, each an `AlgorithmSpec`, run by `core.Algorithm`.

| algorithm  | advantage                                  | loss                                     |
|------------|--------------------------------------------|------------------------------------------|
| vanilla_pg | R (no baseline)                            | reinforce_loss(baseline=0)               |
| reinforce  | R - batch mean (or EMA of past batches)    | reinforce_loss                           |
| rloo       | R - mean of the other K-1 samples          | rloo_loss                                |
| grpo       | (score - group mean) / group std           | grpo_loss (KL in the loss, k3)           |
| raft       | - (SFT on the best of K)                   | raft_loss (no reference, no KL)          |
| ppo        | GAE on KL-shaped token rewards, whitened   | ppo_loss with the clipped value loss     |

R = score - kl_coef * sum_t kl_t (the bandit reward of the source document), kl_t the
`algo.kl_kind` estimator (k1 by default; GRPO's in-loss KL defaults to k3). `registry.table()`
prints this table from the specs themselves.

Adding an algorithm: a module here with a `SPEC = AlgorithmSpec(...)` (its advantages, its
objective from `jaxrl_llm.objectives`, its defaults and what `prepare` must compute for it) and
a config preset. The registry finds the module; nothing else changes.
"""

from jaxrl_llm.training.algorithms.base import (AdvantageInputs, AlgorithmSpec, Forward, ObjectiveInputs,
                                                RolloutBatch, TrainBatch)
from jaxrl_llm.training.algorithms.registry import ALGORITHMS, SPECS, get_spec
from jaxrl_llm.training.algorithms.core import (Algorithm, completion_slice, critic_values, merge_micro_batches,
                                                minibatch_indices, policy_forward, sequence_inputs,
                                                split_micro_batches, take)

__all__ = [
    "ALGORITHMS", "SPECS", "AdvantageInputs", "Algorithm", "AlgorithmSpec", "Forward", "ObjectiveInputs",
    "RolloutBatch", "TrainBatch", "completion_slice", "critic_values", "get_spec", "merge_micro_batches",
    "minibatch_indices", "policy_forward", "sequence_inputs", "split_micro_batches", "take",
]
