"""Reward shaping and advantage transforms: REINFORCE, EMA baseline, RLOO, GRPO, GAE, whitening.

Layout (see ARCHITECTURE.md): `N` completions, prompt-major in groups of `K`
samples per prompt; per-token arrays `[N, T]` with a completion mask that is 1 up
to and including EOS. Sequence-level transforms take `[N]` rewards.

Group transforms (RLOO, GRPO's group statistics) are local to each group, so they
need no communication when a batch is split across devices on group boundaries.
Batch-global statistics take `axis_name` and are exact under `shard_map`/`pmap`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import _checks
from jaxrl_llm.objectives.aggregation import masked_mean, masked_sum, masked_var
from jaxrl_llm.objectives.kl import kl_penalty

GRPO_SCALES = ("group", "batch", "none")


def _check_seq(name, x, valid=None):
    _checks.check_rank(name, x, 1, what="[N], one value per completion")
    _checks.check_float(name, x)
    if valid is not None:
        _checks.check_mask("valid", valid, jnp.shape(x), like=name)


def _valid_weights(x, valid):
    return jnp.ones(jnp.shape(x), jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)


def last_token_mask(mask):
    """`[N, T]` one-hot of the last `mask == 1` position of each row (all 0 for an empty row)."""
    mask = jnp.asarray(mask) > 0
    positions = jnp.arange(mask.shape[-1])
    last = jnp.max(jnp.where(mask, positions, -1), axis=-1, keepdims=True)
    return (positions == last) & mask


def shape_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef: float, kind: str = "k1"):
    """Per-token rewards: a KL penalty on every completion token, the score on the last.

    r[n, t] = -kl_coef * kl[n, t] * m[n, t] + score[n] * [t == last token of n]

    This is the KL-shaped reward of Ziegler et al. 2019 (https://arxiv.org/abs/1909.08593)
    and InstructGPT, and exactly what the source document's pseudocode builds
    (`per_token_reward[..., -1] += score` with an all-ones mask). Entries with
    `mask == 0` are exactly 0, whatever `logprobs` hold there.

    Args:
      scores: `[N]` sequence scores (reward model or verifier).
      logprobs: `[N, T]` sampling-policy log-probabilities of the completion tokens.
      ref_logprobs: `[N, T]` reference-policy log-probabilities.
      mask: `[N, T]` completion mask.
      kl_coef: the KL coefficient beta (>= 0).
      kind: KL estimator, "k1" | "k2" | "k3" (see `kl_penalty`).

    Returns:
      `[N, T]` float32 per-token rewards.
    """
    _checks.check_rank("logprobs", logprobs, 2, what="[N, T]")
    n, _ = jnp.shape(logprobs)
    _checks.check_rank("scores", scores, 1, what="[N], one score per completion")
    _checks.check_shape("scores", scores, (n,), like="logprobs[:, 0]")
    _checks.check_float("scores", scores)
    _checks.check_mask("mask", mask, jnp.shape(logprobs), like="logprobs")
    keep = jnp.asarray(mask) > 0
    kl = kl_penalty(jnp.where(keep, logprobs, 0.0), jnp.where(keep, ref_logprobs, 0.0), kind=kind)
    token_rewards = jnp.where(keep, -kl_coef * kl, 0.0)
    return token_rewards + jnp.where(last_token_mask(mask), _checks.as_float(scores)[:, None], 0.0)


def sequence_rewards(scores, logprobs, ref_logprobs, mask, *, kl_coef: float, kind: str = "k1"):
    """Bandit reward of each whole completion: score - kl_coef * sum_t kl[n, t].

    The sum over tokens of `shape_rewards` (the source document's
    `entire_completion_reward`). Returns `[N]` float32.
    """
    return jnp.sum(shape_rewards(scores, logprobs, ref_logprobs, mask, kl_coef=kl_coef, kind=kind), axis=-1)


def reinforce_advantages(seq_rewards, *, baseline=None, valid=None, axis_name=None):
    """REINFORCE advantages: reward minus a baseline that does not depend on the sample.

    A_n = R_n - b, with b the batch mean of R (default), or a given scalar/`[N]`
    baseline (e.g. from `ema_baseline_update`). Williams 1992, "Simple statistical
    gradient-following algorithms"; Ahmadian et al. 2024, "Back to Basics"
    (https://arxiv.org/abs/2402.14740).

    Args:
      seq_rewards: `[N]` sequence rewards.
      baseline: None (batch mean), a scalar, or `[N]`.
      valid: optional `[N]` 0/1; invalid completions are left out of the batch
        mean and get advantage 0.
      axis_name: mapped axis the batch is split over; the batch mean is then global.

    Returns:
      `[N]` float32 advantages.
    """
    _check_seq("seq_rewards", seq_rewards, valid)
    rewards = _checks.as_float(seq_rewards)
    w = _valid_weights(rewards, valid)
    if baseline is None:
        baseline = masked_mean(rewards, w, axis_name=axis_name)
    else:
        _checks.check_float("baseline", baseline)
        if jnp.ndim(baseline) not in (0, 1) or (jnp.ndim(baseline) == 1 and jnp.shape(baseline) != jnp.shape(rewards)):
            raise UserError(
                f"`baseline` must be a scalar or have shape {jnp.shape(rewards)} like `seq_rewards`; "
                f"got shape {jnp.shape(baseline)}."
            )
    return jnp.where(w > 0, rewards - baseline, 0.0)


class EMABaselineState(NamedTuple):
    """Exponential moving average of batch-mean rewards (bias-corrected like Adam)."""

    ema: jax.Array  # decay-weighted sum, biased towards the 0 it starts from
    count: jax.Array  # number of updates so far


def ema_baseline_init() -> EMABaselineState:
    """Initial state of the EMA baseline: no rewards seen yet."""
    return EMABaselineState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def ema_baseline_update(state: EMABaselineState, seq_rewards, *, decay: float = 0.9, valid=None, axis_name=None):
    """Return `(new_state, baseline)` for this batch, a pure state-in/state-out pair.

    The baseline for batch i is the bias-corrected EMA of the batch means of
    batches 0..i-1, b_i = ema_i / (1 - decay**i), so it does not depend on the
    current samples (the REINFORCE estimator stays unbiased). The first batch,
    with no history, uses its own mean. Then ema_{i+1} = decay * ema_i + (1 - decay) * mean_i.

    Args:
      state: `EMABaselineState` from `ema_baseline_init` or a previous update.
      seq_rewards: `[N]` sequence rewards of this batch.
      decay: EMA decay in [0, 1).
      valid: optional `[N]` 0/1 weights.
      axis_name: mapped axis the batch is split over; the batch mean is then global.

    Returns:
      `(EMABaselineState, baseline)`, baseline a float32 scalar.
    """
    _check_seq("seq_rewards", seq_rewards, valid)
    if not isinstance(decay, jax.core.Tracer) and not 0.0 <= float(decay) < 1.0:
        raise UserError(f"`decay` must be in [0, 1); got {decay!r}.")
    rewards = _checks.as_float(seq_rewards)
    batch_mean = masked_mean(rewards, _valid_weights(rewards, valid), axis_name=axis_name)
    seen = state.count > 0
    correction = 1.0 - decay ** state.count.astype(jnp.float32)
    baseline = jnp.where(seen, state.ema / jnp.where(seen, correction, 1.0), batch_mean)
    new_state = EMABaselineState(decay * state.ema + (1.0 - decay) * batch_mean, state.count + 1)
    return new_state, lax.stop_gradient(baseline)


def _grouped(x, num_samples):
    return jnp.reshape(x, (-1, num_samples))


def rloo_advantages(seq_rewards, *, num_samples: int, valid=None):
    """REINFORCE leave-one-out advantages over the K samples of each prompt.

    A_i = R_i - 1/(K-1) * sum_{j != i} R_j = K/(K-1) * (R_i - mean_j R_j).
    Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!"
    (https://openreview.net/forum?id=r1lgTGL5DE); Ahmadian et al. 2024
    (https://arxiv.org/abs/2402.14740).

    Args:
      seq_rewards: `[N]` sequence rewards, prompt-major groups of `num_samples`.
      num_samples: K >= 2.
      valid: optional `[N]` 0/1. The baseline of a sample is the mean of the
        *valid* other samples of its group; invalid samples, and samples whose
        group has no other valid sample, get advantage 0.

    Returns:
      `[N]` float32 advantages; each group's valid advantages sum to 0.
    """
    _check_seq("seq_rewards", seq_rewards, valid)
    k = _checks.check_num_samples(num_samples, jnp.shape(seq_rewards)[0])
    rewards = _checks.as_float(seq_rewards)
    w = _grouped(_valid_weights(rewards, valid), k)
    r = _grouped(jnp.where(w.reshape(-1) > 0, rewards, 0.0), k)
    others_sum = jnp.sum(w * r, axis=-1, keepdims=True) - w * r
    others_count = jnp.sum(w, axis=-1, keepdims=True) - w
    has_others = (w > 0) & (others_count > 0)
    baseline = others_sum / jnp.where(has_others, others_count, 1.0)
    return jnp.reshape(jnp.where(has_others, r - baseline, 0.0), (-1,))


def grpo_advantages(seq_rewards, *, num_samples: int, scale: str = "group", eps: float = 1e-4, valid=None, axis_name=None):
    """GRPO advantages: reward minus its group mean, optionally over a standard deviation.

    A_i = (R_i - mean_group R) / (std + eps), with
    - scale="group": std of the group (Shao et al. 2024, DeepSeekMath, https://arxiv.org/abs/2402.03300);
    - scale="batch": std of the whole batch (global under `axis_name`);
    - scale="none":  no division (Dr. GRPO, Liu et al. 2025, https://arxiv.org/abs/2503.20783).
    Standard deviations use ddof=1, as `torch.std` in TRL and verl.

    Args:
      seq_rewards: `[N]` sequence rewards, prompt-major groups of `num_samples`.
      num_samples: K >= 2.
      scale: "group" | "batch" | "none".
      eps: added to the std.
      valid: optional `[N]` 0/1; invalid samples are left out of every statistic
        and get advantage 0.
      axis_name: mapped axis for the batch std.

    Returns:
      `[N]` float32 advantages.
    """
    _check_seq("seq_rewards", seq_rewards, valid)
    _checks.check_choice("scale", scale, GRPO_SCALES)
    k = _checks.check_num_samples(num_samples, jnp.shape(seq_rewards)[0])
    rewards = _checks.as_float(seq_rewards)
    w_flat = _valid_weights(rewards, valid)
    w = _grouped(w_flat, k)
    r = _grouped(jnp.where(w_flat > 0, rewards, 0.0), k)
    count = jnp.sum(w, axis=-1, keepdims=True)
    mean = jnp.sum(w * r, axis=-1, keepdims=True) / jnp.maximum(count, 1.0)
    centered = w * (r - mean)
    if scale == "group":
        std = jnp.sqrt(jnp.sum(centered**2, axis=-1, keepdims=True) / jnp.maximum(count - 1.0, 1.0))
        centered = centered / (std + eps)
    elif scale == "batch":
        batch_mean = masked_mean(rewards, w_flat, axis_name=axis_name)
        n_valid = masked_sum(jnp.ones_like(rewards), w_flat, axis_name=axis_name)
        sq = masked_sum((rewards - batch_mean) ** 2, w_flat, axis_name=axis_name)
        std = jnp.sqrt(sq / jnp.maximum(n_valid - 1.0, 1.0))
        centered = centered / (std + eps)
    return jnp.reshape(jnp.where(w > 0, centered, 0.0), (-1,))


def gae(token_rewards, values, mask, *, gamma: float = 1.0, lam: float = 0.95):
    """Generalized Advantage Estimation over the completion tokens.

    delta_t = r_t + gamma * V_{t'} - V_t,   A_t = delta_t + gamma * lam * A_{t'},
    where t' is the next position with mask 1 (V and A are 0 past the last one).
    Positions with mask 0 are skipped, so their rewards and values never matter,
    and get advantage and return 0. Returns R_t = A_t + V_t. Schulman et al. 2016,
    https://arxiv.org/abs/1506.02438. gamma = lam = 1 gives reward-to-go minus value.

    Args:
      token_rewards: `[N, T]` per-token rewards (e.g. from `shape_rewards`).
      values: `[N, T]` value estimates V_t of the state before token t.
      mask: `[N, T]` completion mask.
      gamma: discount.
      lam: GAE lambda.

    Returns:
      `(advantages [N, T], returns [N, T])`, float32, no gradient.
    """
    _checks.check_rank("token_rewards", token_rewards, 2, what="[N, T]")
    _checks.check_float("token_rewards", token_rewards)
    _checks.check_float("values", values)
    _checks.check_shape("values", values, jnp.shape(token_rewards), like="token_rewards")
    _checks.check_mask("mask", mask, jnp.shape(token_rewards), like="token_rewards")
    keep = jnp.asarray(mask) > 0
    rewards = jnp.where(keep, _checks.as_float(lax.stop_gradient(token_rewards)), 0.0)
    values = jnp.where(keep, _checks.as_float(lax.stop_gradient(values)), 0.0)

    def step(carry, inputs):
        next_value, next_advantage = carry
        r_t, v_t, keep_t = inputs
        delta = r_t + gamma * next_value - v_t
        advantage = delta + gamma * lam * next_advantage
        carry = (jnp.where(keep_t, v_t, next_value), jnp.where(keep_t, advantage, next_advantage))
        return carry, jnp.where(keep_t, advantage, 0.0)

    zeros = jnp.zeros(rewards.shape[:1], rewards.dtype)
    # Scan over time (axis 1), last token first.
    _, advantages = lax.scan(step, (zeros, zeros), (rewards.T, values.T, keep.T), reverse=True)
    advantages = advantages.T
    return advantages, jnp.where(keep, advantages + values, 0.0)


def whiten(x, mask=None, *, shift_mean: bool = True, axis_name=None, eps: float = 1e-8):
    """Normalise `x` to zero mean and unit variance over the `mask == 1` entries.

    y = (x - mean) / sqrt(var + eps), with the population variance (ddof=0) as in
    the original TF RLHF code (Ziegler et al. 2019); `shift_mean=False` adds the
    mean back, y = (x - mean) / sqrt(var + eps) + mean. Entries with mask 0 are 0.

    Args:
      x: array of any shape (e.g. `[N, T]` advantages or `[N]`).
      mask: optional 0/1 array of the same shape.
      shift_mean: whether the output keeps zero mean.
      axis_name: mapped axis; mean and variance are then global.
      eps: variance floor.

    Returns:
      float32 array like `x`.
    """
    _checks.check_float("x", x)
    if mask is None:
        mask = jnp.ones(jnp.shape(x), jnp.float32)
    _checks.check_mask("mask", mask, jnp.shape(x), like="x")
    keep = jnp.asarray(mask) > 0
    x = jnp.where(keep, _checks.as_float(x), 0.0)
    mean = masked_mean(x, mask, axis_name=axis_name)
    var = masked_var(x, mask, axis_name=axis_name)
    y = (x - mean) * lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(keep, y, 0.0)
