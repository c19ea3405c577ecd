"""The train state: one pytree holding everything a step reads and writes.

`params` holds what the optimizer trains: `{"policy": ...}` and, for PPO only,
`{"critic": ...}`. `ref_params` is the frozen reference policy; it is never seen
by the optimizer, and an algorithm without a reference term (RAFT) holds none. `rng` is the run's base key: each step derives its own keys
with `fold_in(rng, step)`, so resuming at step n replays exactly the same keys.

With LoRA, `params["policy"]` is the adapters only and `base_params` the frozen base
weights, held once: the policy is base + adapters, the reference is the base with the
adapters off, so `ref_params` is None. Checkpoints leave `base_params` out (the trainer
names the base by path and hash instead).

`update_step` is one optimizer step on the state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from jaxrl_llm import models
from jaxrl_llm.objectives import EMABaselineState, ema_baseline_init

if TYPE_CHECKING:  # an annotation only: the algorithms need not be imported with the state
    from jaxrl_llm.training.algorithms import Algorithm


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


def update_step(algorithm: Algorithm, optimizer: optax.GradientTransformation, state: TrainState, batch,
                dropout_key=None, packing=None):
    """One optimizer step on `batch` (micro-batch by micro-batch when configured):
    `(new state, (aux Stats, {"loss/total", "grad_norm", "finite"}))`. Only `state.params` are
    differentiated and updated (a LoRA policy's base is read, never touched). `dropout_key`: the
    LoRA adapters' dropout in this update's forward (None: none). `packing`: the batch's sequences
    packed in rows (`training.packing.plan`; None: one sequence per row).

    A non-finite loss or gradient norm leaves the state as it was (`finite` False): applied, a
    NaN would reach every parameter, and the host decides whether to stop or skip the batch."""
    (loss, (aux, baseline_state)), grads = algorithm.value_and_grad(state.params, batch, state.base_params,
                                                                    dropout_key, packing)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), (params, opt_state, baseline_state),
                        (state.params, state.opt_state, state.baseline))
    scalars = {"loss/total": loss, "grad_norm": grad_norm, "finite": finite}
    return state.replace(params=kept[0], opt_state=kept[1], baseline=kept[2]), (aux, scalars)
