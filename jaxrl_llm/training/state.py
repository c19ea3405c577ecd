"""The train state: one pytree holding everything a step reads and writes.

`params` holds what the optimizer trains: `{"policy": ...}` and, for PPO only,
`{"critic": ...}`. `ref_params` is the frozen reference policy; it is never seen
by the optimizer, and an algorithm without a reference term (RAFT) holds none. `rng` is the run's base key: each step derives its own keys
with `fold_in(rng, step)`, so resuming at step n replays exactly the same keys.

With LoRA, `params["policy"]` is the adapters only and `base_params` the frozen base
weights, held once: the policy is base + adapters, the reference is the base with the
adapters off, so `ref_params` is None. Checkpoints leave `base_params` out (the trainer
names the base by path and hash instead).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm import models
from jaxrl_llm.objectives import EMABaselineState, ema_baseline_init


class TrainState(struct.PyTreeNode):
    step: jax.Array  # RL steps completed (int32 scalar)
    params: dict[str, Any]  # {"policy": nnx.State, "critic": nnx.State (PPO only)}
    ref_params: Any  # frozen reference policy (nnx.State), or None
    opt_state: Any  # optax state of `params`
    rng: jax.Array  # base PRNG key of the run
    baseline: EMABaselineState | None  # REINFORCE's EMA baseline, else None
    base_params: Any = None  # LoRA: the frozen base model (nnx.State) the adapters sit on, else None

    @classmethod
    def create(cls, *, policy_params, critic_params=None, optimizer: optax.GradientTransformation, seed: int,
               ema_baseline: bool = False, reference: bool = True, reference_dtype=None,
               base_params=None) -> "TrainState":
        """`reference_dtype`: the dtype of the frozen reference's floating parameters (the compute
        dtype under mixed precision: it is only read by forward passes); None: the policy's.
        `base_params`: a LoRA policy's frozen base (`policy_params` are then its adapters); the
        reference is that base, so no reference copy is made."""
        params = {"policy": policy_params}
        if critic_params is not None:
            params["critic"] = critic_params
        ref_params = None
        if reference and base_params is None:
            # A separate copy: the reference must not alias buffers the update donates.
            ref_params = jax.tree.map(jnp.copy, models.cast_floating(policy_params, reference_dtype))
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            ref_params=ref_params,
            opt_state=optimizer.init(params),
            rng=jax.random.PRNGKey(seed),
            baseline=ema_baseline_init() if ema_baseline else None,
            base_params=base_params,
        )


def step_keys(state: TrainState, step: int):
    """`(generation_key, shuffle_key)` of a step: a pure function of the base key and the step."""
    return tuple(jax.random.split(jax.random.fold_in(state.rng, step), 2))
