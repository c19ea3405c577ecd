"""Policy-gradient losses: REINFORCE, RLOO, PPO, GRPO, RAFT, and the PPO value loss.

Each takes plain arrays and returns `(loss, aux)`: `loss` a float32 scalar to
differentiate, `aux` a dict of `Stat` metrics (sums and counts, so they merge
exactly across micro-batches and, with `axis_name`, across devices).

Gradient convention. REINFORCE and RLOO build the sequence reward from the
sampling policy's log-probabilities (the KL penalty lives in the reward), and we
treat the resulting advantage as a constant: the gradient is
-sum_n A_n * grad sum_t log pi(y_nt) / N. This is the score-function estimator,
and what TRL, verl and OpenRLHF compute (they take the KL from rollout-time
log-probabilities, with no gradient). The source document's pseudocode computes
the KL from `per_token_logprobs` with `requires_grad=True` and detaches only the
baseline, so its gradient also has a term kl_coef * (sum_t log pi(y_nt)) / N per
sequence flowing through the reward; its loss *value* is the same as ours.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import _checks
from jaxrl_llm.objectives.advantages import (
    reinforce_advantages,
    rloo_advantages,
    sequence_rewards,
)
from jaxrl_llm.objectives.aggregation import LOSS_AGGREGATIONS, Stat, aggregate_loss
from jaxrl_llm.objectives.kl import kl_penalty

NONFINITE_SCORE_MODES = ("raise", "mask")
RATIO_LEVELS = ("token", "sequence", "sequence-mean")
# Bound on |log pi - log pi_old| before exp: keeps the ratio finite (verl uses 20 too).
_MAX_ABS_LOG_RATIO = 20.0


def _check_token_arrays(mask, **arrays):
    """All per-token arrays are float `[N, T]` like the first; mask has the same shape."""
    (first_name, first), *rest = arrays.items()
    _checks.check_rank(first_name, first, 2, what="[N, T]")
    _checks.check_float(first_name, first)
    shape = jnp.shape(first)
    for name, x in rest:
        _checks.check_float(name, x)
        _checks.check_shape(name, x, shape, like=first_name)
    _checks.check_mask("mask", mask, shape, like=first_name)
    return shape


def _masked_f32(x, keep):
    # Garbage (even NaN) under mask 0 must not reach the loss or its gradient.
    return jnp.where(keep, _checks.as_float(x), 0.0)


def _scores_and_validity(scores, n, nonfinite_scores):
    _checks.check_choice("nonfinite_scores", nonfinite_scores, NONFINITE_SCORE_MODES)
    _checks.check_rank("scores", scores, 1, what="[N], one score per completion")
    _checks.check_shape("scores", scores, (n,), like="logprobs[:, 0]")
    _checks.check_float("scores", scores)
    scores = _checks.as_float(scores)
    if nonfinite_scores == "raise":
        _checks.check_finite("scores", scores)
        return scores, None
    valid = jnp.isfinite(scores)
    return jnp.where(valid, scores, 0.0), valid.astype(jnp.float32)


def _bandit_loss(logprobs, ref_logprobs, scores, mask, *, advantage_fn, kl_coef, kl_kind, aggregation, nonfinite_scores,
                 denominator, axis_name, sampling_logprobs=None, loss_rows=None):
    given = {} if sampling_logprobs is None else {"sampling_logprobs": sampling_logprobs}
    n, _ = _check_token_arrays(mask, logprobs=logprobs, ref_logprobs=ref_logprobs, **given)
    scores, valid = _scores_and_validity(scores, n, nonfinite_scores)
    keep = jnp.asarray(mask) > 0
    logprobs = _masked_f32(logprobs, keep)
    ref_logprobs = _masked_f32(ref_logprobs, keep)
    # The reward (KL included) comes from the sampling policy: a constant for the gradient.
    sampling_logprobs = logprobs if sampling_logprobs is None else _masked_f32(sampling_logprobs, keep)
    sampling_logprobs = lax.stop_gradient(sampling_logprobs)
    seq_rewards = sequence_rewards(scores, sampling_logprobs, ref_logprobs, mask, kl_coef=kl_coef, kind=kl_kind)
    advantages = lax.stop_gradient(advantage_fn(seq_rewards, valid))
    seq_mask = valid
    if loss_rows is not None:  # rows kept in the baselines above but out of the loss (truncated ones)
        _checks.check_shape("loss_rows", loss_rows, (n,), like="logprobs[:, 0]")
        loss_rows = jnp.asarray(loss_rows, jnp.float32)
        seq_mask = loss_rows if valid is None else valid * loss_rows
    loss, loss_stat = aggregate_loss(
        -advantages[:, None] * logprobs, mask, aggregation, seq_mask=seq_mask, denominator=denominator,
        axis_name=axis_name)
    k1 = kl_penalty(sampling_logprobs, ref_logprobs, kind="k1")
    weights = jnp.ones((n,), jnp.float32) if valid is None else valid
    token_weights = keep * weights[:, None]
    aux = {
        "loss/policy": loss_stat,
        "kl": Stat.of(k1, token_weights, axis_name=axis_name),
        "kl/sequence": Stat.of(jnp.sum(jnp.where(keep, k1, 0.0), -1), weights, axis_name=axis_name),
        "kl/objective": Stat.of(kl_penalty(sampling_logprobs, ref_logprobs, kind=kl_kind), token_weights,
                                axis_name=axis_name),
        "reward/score": Stat.of(scores, weights, axis_name=axis_name),
        "reward/total": Stat.of(seq_rewards, weights, axis_name=axis_name),
        "advantage": Stat.of(advantages, weights, axis_name=axis_name),
        "completion/length": Stat.of(jnp.sum(keep, -1), weights, axis_name=axis_name),
        "completion/valid": Stat.of(weights, axis_name=axis_name),
    }
    return loss, aux


def reinforce_loss(
    logprobs,
    ref_logprobs,
    scores,
    mask,
    *,
    kl_coef: float = 0.1,
    kl_kind: str = "k1",
    baseline=None,
    aggregation: str = "seq-mean-token-sum",
    nonfinite_scores: str = "raise",
    denominator=None,
    axis_name=None,
    sampling_logprobs=None,
    loss_rows=None,
):
    """REINFORCE with a baseline, the whole completion as one action (bandit).

    R_n = score_n - kl_coef * sum_t kl(y_nt),  A_n = R_n - b,
    loss = -1/N sum_n A_n sum_t log pi(y_nt)      (aggregation "seq-mean-token-sum")

    b is the batch mean of R (default) or a given baseline, e.g. from
    `ema_baseline_update`. Williams 1992; Ahmadian et al. 2024, "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in
    LLMs", https://arxiv.org/abs/2402.14740. A is a constant for the gradient
    (see the module docstring for how this differs from the source pseudocode).

    Args:
      logprobs: `[N, T]` policy log-probabilities of the sampled tokens (with gradient).
      ref_logprobs: `[N, T]` frozen reference log-probabilities.
      scores: `[N]` sequence scores, added at each completion's last token.
      mask: `[N, T]` completion mask (1 up to and including EOS).
      kl_coef: KL coefficient beta.
      kl_kind: "k1" | "k2" | "k3" estimator inside the reward.
      baseline: None (batch mean), a scalar or `[N]`.
      aggregation: see `aggregation.loss_terms`; the default reproduces the paper.
      nonfinite_scores: "raise" (ValueError when called eagerly on NaN/inf scores)
        or "mask" (drop those completions from the baseline, the loss and the metrics).
      denominator: when this call sees one micro-batch of a larger batch, the whole batch's
        `loss_denominator(mask, aggregation, seq_mask=valid)`: the micro-batch losses and
        gradients then add up to the whole batch's (pass `baseline` too: a batch mean of one
        micro-batch is not the batch's). None: this batch's own.
      axis_name: mapped axis the batch is split over (batch mean and loss
        denominators become global).
      sampling_logprobs: `[N, T]` log-probabilities of the policy that sampled, which the
        reward's KL (and the KL metrics) are computed from, without gradient; None: `logprobs`.
        Pass them when the differentiated forward is not the sampling one (dropout in training).
      loss_rows: `[N]` 0/1, the completions that enter the loss (numerator and denominator);
        the others still count in the baseline and the metrics. DAPO drops completions cut at
        the length limit this way (TRL's `mask_truncated_completions`). None: all.

    Returns:
      `(loss, aux)`; aux keys: loss/policy, kl (the k1 estimate of KL(pi || pi_ref) per
      completion token, whatever `kl_kind`), kl/sequence (its sum per completion),
      kl/objective (the `kl_kind` estimator the reward uses, per token), reward/score,
      reward/total, advantage, completion/length, completion/valid.
    """
    return _bandit_loss(
        logprobs, ref_logprobs, scores, mask,
        advantage_fn=lambda r, valid: reinforce_advantages(r, baseline=baseline, valid=valid, axis_name=axis_name),
        kl_coef=kl_coef, kl_kind=kl_kind, aggregation=aggregation,
        nonfinite_scores=nonfinite_scores, denominator=denominator, axis_name=axis_name,
        sampling_logprobs=sampling_logprobs, loss_rows=loss_rows,
    )


def rloo_loss(
    logprobs,
    ref_logprobs,
    scores,
    mask,
    *,
    num_samples: int,
    kl_coef: float = 0.1,
    kl_kind: str = "k1",
    aggregation: str = "seq-mean-token-sum",
    nonfinite_scores: str = "raise",
    denominator=None,
    axis_name=None,
    sampling_logprobs=None,
    loss_rows=None,
):
    """REINFORCE leave-one-out (RLOO): each sample's baseline is the mean of the other K-1.

    R_n as in `reinforce_loss`; for sample i of a prompt with samples 1..K,
    A_i = R_i - 1/(K-1) sum_{j != i} R_j,  loss = -1/N sum_n A_n sum_t log pi(y_nt).
    Kool et al. 2019 (https://openreview.net/forum?id=r1lgTGL5DE); Ahmadian et
    al. 2024 (https://arxiv.org/abs/2402.14740).

    Args:
      logprobs, ref_logprobs, scores, mask: as in `reinforce_loss`, prompt-major
        in groups of `num_samples` (`[p0s0, p0s1, ..., p1s0, ...]`).
      num_samples: K >= 2; N must be divisible by K (per device, when split).
      kl_coef, kl_kind, aggregation, nonfinite_scores, denominator, axis_name,
        sampling_logprobs, loss_rows: as in `reinforce_loss` (micro-batches must hold whole groups).
        With "mask", the leave-one-out mean is over the valid others; a sample with no
        valid other gets advantage 0.

    Returns:
      `(loss, aux)` with the keys of `reinforce_loss`.
    """
    return _bandit_loss(
        logprobs, ref_logprobs, scores, mask,
        advantage_fn=lambda r, valid: rloo_advantages(r, num_samples=num_samples, valid=valid),
        kl_coef=kl_coef, kl_kind=kl_kind, aggregation=aggregation,
        nonfinite_scores=nonfinite_scores, denominator=denominator, axis_name=axis_name,
        sampling_logprobs=sampling_logprobs, loss_rows=loss_rows,
    )


def _token_advantages(advantages, shape):
    _checks.check_float("advantages", advantages)
    if jnp.shape(advantages) == shape[:1]:
        return jnp.broadcast_to(_checks.as_float(advantages)[:, None], shape)
    _checks.check_shape("advantages", advantages, shape, like="logprobs (or [N] for sequence-level advantages)")
    return _checks.as_float(advantages)


def _check_clip(clip_eps, clip_eps_high, dual_clip):
    _checks.check_positive_float("clip_eps", clip_eps)
    if clip_eps_high is not None:
        _checks.check_positive_float("clip_eps_high", clip_eps_high)
    if dual_clip is not None and (isinstance(dual_clip, bool) or not isinstance(dual_clip, (int, float)) or dual_clip <= 1.0):
        raise UserError(f"`dual_clip` must be None or a number > 1 (e.g. 3.0); got {dual_clip!r}.")


def clipped_surrogate(logprobs, old_logprobs, advantages, *, clip_eps=0.2, clip_eps_high=None, dual_clip=None):
    """Per-token PPO clipped surrogate loss (to minimise), with optional asymmetric and dual clip.

    rho = exp(log pi - log pi_old),
    l = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))       (Schulman et al. 2017)
    and, with dual clip c > 1, l = min(l, -c A) where A < 0          (Ye et al. 2020,
    https://arxiv.org/abs/1912.09729). eps_high defaults to eps_low (DAPO raises it,
    https://arxiv.org/abs/2503.14476).

    Returns `(loss [N, T], ratio [N, T], clipped [N, T] bool, log_ratio [N, T])`.
    """
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    log_ratio = jnp.clip(logprobs - old_logprobs, -_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    ratio = jnp.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        loss = jnp.where(advantages < 0, jnp.minimum(loss, -dual_clip * advantages), loss)
    return loss, ratio, clipped > unclipped, log_ratio


def _approx_kl(token_log_ratio, keep, axis_name):
    """k3 estimate of KL(pi_old || pi) per token, on tokens sampled from pi_old: with
    r = log pi - log pi_old, (e^r - 1) - r is non-negative and unbiased (Schulman 2020)."""
    return Stat.of(jnp.expm1(token_log_ratio) - token_log_ratio, keep, axis_name=axis_name)


def _ratio_metrics(ratio, clipped, weights, token_log_ratio, keep, axis_name):
    return {
        "clipfrac": Stat.of(clipped.astype(jnp.float32), weights, axis_name=axis_name),
        "approx_kl": _approx_kl(token_log_ratio, keep, axis_name),
        "ratio": Stat.of(ratio, weights, axis_name=axis_name),
    }


def _clipped_policy_loss(logprobs, old_logprobs, advantages, keep, *, ratio_level, clip_eps, clip_eps_high,
                         dual_clip, axis_name):
    """Per-token clipped surrogate `[N, T]` at the token or the sequence level, and its ratio metrics.

    token:         rho_nt = pi(y_nt) / pi_old(y_nt), one clipped term per token (PPO, GRPO).
    sequence:      rho_n = exp(sum_t log pi(y_nt) - log pi_old(y_nt)), one clipped term l_n per
                   completion (TRL's RLOO: the completion stays one action), spread evenly over
                   its tokens as l_n / |y_n|. Every aggregation mode then weighs a completion as
                   it weighs its tokens, and at rho = 1 the gradient equals the token level's.
    sequence-mean: s_n = (pi(y_n) / pi_old(y_n))^(1 / |y_n|) = exp(1/|y_n| sum_t log-ratio_nt),
                   the length-normalised sequence ratio of GSPO (Zheng et al. 2025,
                   https://arxiv.org/abs/2507.18071), clipped and spread like `sequence`; with
                   `seq-mean-token-sum` the loss is GSPO's -1/N sum_n min(s_n A_n, clip(s_n) A_n).
    `logprobs` and `old_logprobs` are masked float32 (`old_logprobs` without gradient);
    `advantages` `[N]` or `[N, T]` (a constant for the gradient). Returns `(per_token [N, T],
    token advantages [N, T] masked, metrics)`.
    """
    _checks.check_choice("ratio_level", ratio_level, RATIO_LEVELS)
    shape = jnp.shape(logprobs)
    advantages = lax.stop_gradient(advantages)
    token_log_ratio = jnp.clip(logprobs - old_logprobs, -_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    if ratio_level == "token":
        advantages = jnp.where(keep, _token_advantages(advantages, shape), 0.0)
        per_token, ratio, clipped, log_ratio = clipped_surrogate(
            logprobs, old_logprobs, advantages, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
        return per_token, advantages, _ratio_metrics(ratio, clipped, keep, log_ratio, keep, axis_name)
    if jnp.shape(advantages) != shape[:1]:
        raise UserError(
            f"`advantages` must have shape {shape[:1]} (one per completion) for ratio_level={ratio_level!r}; "
            f"got {jnp.shape(advantages)}.")
    _checks.check_float("advantages", advantages)
    advantages = _checks.as_float(advantages)
    length = jnp.sum(keep, axis=-1)
    sequence_logprob, sequence_old_logprob = jnp.sum(logprobs, -1), jnp.sum(old_logprobs, -1)
    if ratio_level == "sequence-mean":  # the log-ratio per token of the completion
        sequence_logprob = sequence_logprob / jnp.maximum(length, 1)
        sequence_old_logprob = sequence_old_logprob / jnp.maximum(length, 1)
    per_sequence, ratio, clipped, _ = clipped_surrogate(
        sequence_logprob, sequence_old_logprob, advantages,
        clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip)
    per_token = jnp.where(keep, (per_sequence / jnp.maximum(length, 1))[:, None], 0.0)
    # clipfrac and ratio per completion, where the clipping happens; approx_kl per token.
    metrics = _ratio_metrics(ratio, clipped, length > 0, token_log_ratio, keep, axis_name)
    return per_token, jnp.where(keep, advantages[:, None], 0.0), metrics


def value_loss(values, old_values, returns, mask, *, clip=0.2, aggregation="token-mean", denominator=None,
               axis_name=None):
    """Clipped value-function loss of PPO.

    v_clip = old_v + clip(v - old_v, -c, c),
    l = 1/2 max((v - R)^2, (v_clip - R)^2),   or 1/2 (v - R)^2 with `clip=None`.
    (The clipped form is from OpenAI baselines' PPO2 and the original RLHF code.)

    Args:
      values: `[N, T]` current value predictions (with gradient).
      old_values: `[N, T]` value predictions at rollout time.
      returns: `[N, T]` targets (e.g. from `gae`).
      mask: `[N, T]` completion mask.
      clip: c > 0, or None for no clipping.
      aggregation, denominator, axis_name: as in `aggregate_loss`.

    Returns:
      `(loss, aux)`; aux keys loss/value, value/error (mean squared error), value/clipfrac.
    """
    _check_token_arrays(mask, values=values, old_values=old_values, returns=returns)
    if clip is not None:
        _checks.check_positive_float("clip", clip)
    keep = jnp.asarray(mask) > 0
    values = _masked_f32(values, keep)
    old_values = _masked_f32(old_values, keep)
    returns = lax.stop_gradient(_masked_f32(returns, keep))
    squared_error = (values - returns) ** 2
    if clip is None:
        per_token, was_clipped = 0.5 * squared_error, jnp.zeros_like(keep)
    else:
        clipped_values = old_values + jnp.clip(values - old_values, -clip, clip)
        clipped_error = (clipped_values - returns) ** 2
        per_token, was_clipped = 0.5 * jnp.maximum(squared_error, clipped_error), clipped_error > squared_error
    loss, loss_stat = aggregate_loss(per_token, mask, aggregation, denominator=denominator, axis_name=axis_name)
    aux = {
        "loss/value": loss_stat,
        "value/error": Stat.of(squared_error, keep, axis_name=axis_name),
        "value/clipfrac": Stat.of(was_clipped.astype(jnp.float32), keep, axis_name=axis_name),
    }
    return loss, aux


def ppo_loss(
    logprobs,
    old_logprobs,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    ratio_level: str = "token",
    values=None,
    old_values=None,
    returns=None,
    value_clip: float | None = 0.2,
    vf_coef: float = 0.1,
    entropy=None,
    entropy_coef: float = 0.0,
    aggregation: str = "token-mean",
    denominator=None,
    axis_name=None,
):
    """PPO: clipped surrogate (per token or per completion), optional clipped value loss and entropy bonus.

    loss = agg(l_clip) + vf_coef * value_loss - entropy_coef * agg(H), with
    l_clip from `clipped_surrogate` on the per-token ratio (`ratio_level="token"`, PPO)
    or on one ratio per completion, rho_n = exp(sum_t log pi(y_nt) - log pi_old(y_nt))
    (`ratio_level="sequence"`, TRL's RLOO: the bandit view of the whole completion as one
    action, which needs `[N]` advantages). Schulman et al. 2017, "Proximal Policy
    Optimization Algorithms", https://arxiv.org/abs/1707.06347; the RLHF set-up of
    Ouyang et al. 2022 (KL in the reward via `shape_rewards`, advantages via `gae`).

    Args:
      logprobs: `[N, T]` current policy log-probabilities (with gradient).
      old_logprobs: `[N, T]` log-probabilities at rollout time.
      advantages: `[N, T]`, or `[N]` for a sequence-level advantage (REINFORCE/RLOO
        with several updates per batch), broadcast over tokens at the token level.
      mask: `[N, T]` completion mask.
      clip_eps, clip_eps_high, dual_clip: see `clipped_surrogate`.
      ratio_level: "token" (one clipped ratio per token), "sequence" (one per completion,
        its loss spread evenly over the completion's tokens so that every aggregation mode
        weighs a completion as it weighs its tokens; at ratio 1 both levels give the same
        gradient) or "sequence-mean" (GSPO's length-normalised ratio, one per completion).
      values, old_values, returns: `[N, T]` each, all or none; with them the
        clipped value loss (`value_loss`) is added with weight `vf_coef`.
      value_clip: value clipping range, or None.
      vf_coef: value loss weight.
      entropy: optional `[N, T]` per-token entropy (`token_entropy`) for a bonus.
      entropy_coef: entropy bonus weight.
      aggregation: see `aggregation.loss_terms`.
      denominator: the whole batch's `loss_denominator(mask, aggregation)` when this call sees
        one micro-batch of it (shared by the policy, value and entropy terms, which aggregate
        over the same mask); None: this batch's own.
      axis_name: mapped axis the batch is split over.

    Returns:
      `(loss, aux)`; aux keys loss/policy, clipfrac and ratio (per token, or per completion
      at the sequence level), approx_kl (k3 of KL(pi_old || pi) per token), advantage,
      and with values loss/value, value/error, value/clipfrac; with entropy, entropy.
    """
    shape = _check_token_arrays(mask, logprobs=logprobs, old_logprobs=old_logprobs)
    _check_clip(clip_eps, clip_eps_high, dual_clip)
    value_args = {"values": values, "old_values": old_values, "returns": returns}
    given = [name for name, x in value_args.items() if x is not None]
    if given and len(given) != 3:
        missing = sorted(set(value_args) - set(given))
        raise UserError(f"`values`, `old_values` and `returns` go together; got {given} without {missing}.")
    keep = jnp.asarray(mask) > 0
    per_token, advantages, ratio_aux = _clipped_policy_loss(
        _masked_f32(logprobs, keep), lax.stop_gradient(_masked_f32(old_logprobs, keep)), advantages, keep,
        ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=dual_clip,
        axis_name=axis_name)
    agg = dict(denominator=denominator, axis_name=axis_name)
    loss, loss_stat = aggregate_loss(per_token, mask, aggregation, **agg)
    aux = {"loss/policy": loss_stat, "advantage": Stat.of(advantages, keep, axis_name=axis_name), **ratio_aux}
    if given:
        v_loss, v_aux = value_loss(
            values, old_values, returns, mask, clip=value_clip, aggregation=aggregation, **agg)
        loss = loss + vf_coef * v_loss
        aux.update(v_aux)
    if entropy is not None:
        _checks.check_float("entropy", entropy)
        _checks.check_shape("entropy", entropy, shape, like="logprobs")
        entropy_mean, entropy_stat = aggregate_loss(_masked_f32(entropy, keep), mask, aggregation, **agg)
        if not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0):  # no backward pass for a 0 bonus
            loss = loss - entropy_coef * entropy_mean
        aux["entropy"] = entropy_stat
    return loss, aux


def grpo_loss(
    logprobs,
    old_logprobs,
    ref_logprobs,
    advantages,
    mask,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    ratio_level: str = "token",
    kl_coef: float = 0.04,
    kl_kind: str = "k3",
    aggregation: str = "seq-mean-token-mean",
    kl_aggregation: str | None = None,
    policy_gradient_tokens=None,
    denominator=None,
    axis_name=None,
):
    """GRPO: the clipped surrogate with group-relative advantages and the KL *in the loss*.

    l_t = l_clip_t + kl_coef * k3(pi || pi_ref)_t, aggregated per sequence then
    averaged (original GRPO; pass aggregation="token-mean" for DAPO or
    "seq-mean-token-sum-norm" for Dr. GRPO). Unlike REINFORCE/RLOO, the KL term here
    carries gradient. Shao et al. 2024, https://arxiv.org/abs/2402.03300.

    GSPO (Zheng et al. 2025) is `ratio_level="sequence-mean"` with
    `aggregation="seq-mean-token-sum"` (one clipped term per completion) and
    `kl_aggregation="seq-mean-token-mean"`: the KL stays GRPO's per-token mean of each
    completion, as TRL and verl compute it, instead of growing with the completion's length.

    Args:
      logprobs: `[N, T]` current policy log-probabilities (with gradient).
      old_logprobs: `[N, T]` log-probabilities at rollout time.
      ref_logprobs: `[N, T]` reference log-probabilities.
      advantages: `[N]` from `grpo_advantages` (or `[N, T]`).
      mask: `[N, T]` completion mask.
      clip_eps, clip_eps_high: see `clipped_surrogate`.
      ratio_level: "token" (the paper), "sequence" or "sequence-mean" (GSPO), as in `ppo_loss`.
      kl_coef: weight of the KL term (0 disables it).
      kl_kind: KL estimator ("k3" in the paper; k1 in the loss has zero expected gradient).
      aggregation, denominator, axis_name: as in `ppo_loss`.
      kl_aggregation: how the KL term is aggregated; None: `aggregation`. It must share
        `aggregation`'s denominator (`denominator` serves both): any two seq-mean modes
        (they count completions), or token-mean with token-mean.
      policy_gradient_tokens: optional `[N, T]` 0/1, the tokens whose clipped surrogate carries
        gradient (the high-entropy tokens of Wang et al. 2025, https://arxiv.org/abs/2506.01939,
        TRL's `top_entropy_quantile`); the KL's gradient still reaches every completion token,
        and no value changes. None: every token.

    Returns:
      `(loss, aux)`; aux keys loss/policy (surrogate + KL), clipfrac, approx_kl,
      ratio, advantage, kl/objective (the `kl_kind` estimate of KL(pi || pi_ref) per token,
      under the current policy).
    """
    _check_token_arrays(mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    _check_clip(clip_eps, clip_eps_high, None)
    _checks.check_choice("aggregation", aggregation, LOSS_AGGREGATIONS)
    kl_aggregation = aggregation if kl_aggregation is None else kl_aggregation
    _checks.check_choice("kl_aggregation", kl_aggregation, LOSS_AGGREGATIONS)
    if (kl_aggregation == "token-mean") != (aggregation == "token-mean"):
        raise UserError(f"`kl_aggregation`: got {kl_aggregation!r} with aggregation={aggregation!r}, expected modes "
                        "that share a denominator (two seq-mean modes, or token-mean with token-mean).")
    keep = jnp.asarray(mask) > 0
    logprobs = _masked_f32(logprobs, keep)
    ref_logprobs = _masked_f32(ref_logprobs, keep)
    surrogate_logprobs = logprobs
    if policy_gradient_tokens is not None:
        _checks.check_shape("policy_gradient_tokens", policy_gradient_tokens, jnp.shape(mask), like="mask")
        surrogate_logprobs = jnp.where(jnp.asarray(policy_gradient_tokens) > 0, logprobs,
                                       lax.stop_gradient(logprobs))
    per_token, advantages, ratio_aux = _clipped_policy_loss(
        surrogate_logprobs, lax.stop_gradient(_masked_f32(old_logprobs, keep)), advantages, keep,
        ratio_level=ratio_level, clip_eps=clip_eps, clip_eps_high=clip_eps_high, dual_clip=None,
        axis_name=axis_name)
    kl = kl_penalty(logprobs, ref_logprobs, kind=kl_kind)
    agg = dict(denominator=denominator, axis_name=axis_name)
    if kl_aggregation == aggregation:
        loss, loss_stat = aggregate_loss(per_token + kl_coef * kl, mask, aggregation, **agg)
    else:
        surrogate, surrogate_stat = aggregate_loss(per_token, mask, aggregation, **agg)
        kl_term, kl_stat = aggregate_loss(kl, mask, kl_aggregation, **agg)
        loss = surrogate + kl_coef * kl_term
        # Both counts are the completions: their numerators add.
        loss_stat = Stat.ratio(surrogate_stat.total + kl_coef * kl_stat.total, surrogate_stat.count)
    aux = {
        "loss/policy": loss_stat,
        "advantage": Stat.of(advantages, keep, axis_name=axis_name),
        "kl/objective": Stat.of(kl, keep, axis_name=axis_name),
        **ratio_aux,
    }
    return loss, aux


def best_of_group(scores, *, num_samples: int):
    """`[N]` 0/1 marking the highest-scoring sample of each group (first on ties)."""
    k = _checks.check_num_samples(num_samples, jnp.shape(scores)[0], minimum=1)
    grouped = jnp.reshape(scores, (-1, k))
    return jnp.reshape(jax.nn.one_hot(jnp.argmax(grouped, axis=-1), k), (-1,))


def raft_selection(scores, *, num_samples: int, min_score: float | None = None, valid=None):
    """`[N]` 0/1: the completions RAFT trains on, the best valid one of each group if it
    scores at least `min_score`. `valid` `[N]` 0/1 (None: all); invalid scores never win, and a
    group with none valid selects nothing."""
    scores = _checks.as_float(scores)
    ranking = scores if valid is None else jnp.where(valid > 0, scores, -jnp.inf)
    selected = best_of_group(ranking, num_samples=num_samples)
    if valid is not None:
        # A group with no valid score has argmax row 0 over all -inf: it selects nothing.
        selected = selected * valid
    if min_score is not None:
        selected = selected * (scores >= min_score)
    return selected


def raft_loss(
    logprobs,
    scores,
    mask,
    *,
    num_samples: int,
    min_score: float | None = None,
    aggregation: str = "token-mean",
    nonfinite_scores: str = "raise",
    denominator=None,
    axis_name=None,
):
    """RAFT: negative log-likelihood of the best of the K samples of each prompt.

    loss = -agg over {n : n = argmax_{j in group} score_j, score_n >= min_score} of log pi(y_nt).
    Reward rAnked FineTuning, Dong et al. 2023, https://arxiv.org/abs/2304.06767. With a
    0/1 verifier, pass `min_score=1`: the best of K wrong answers is still wrong, and
    fine-tuning on it drives the policy to collapse.

    Args:
      logprobs: `[N, T]` policy log-probabilities (with gradient).
      scores: `[N]` sequence scores, prompt-major groups of `num_samples`.
      mask: `[N, T]` completion mask.
      num_samples: K >= 1.
      min_score: a group whose best score is below this is skipped (None: never).
      aggregation: see `aggregation.loss_terms` (only selected samples count).
      nonfinite_scores: "raise", or "mask" (a non-finite score is never selected, and a
        group whose scores are all non-finite trains on nothing).
      denominator: the whole batch's `loss_denominator(mask, aggregation, seq_mask=selected)`
        (`selected` from `raft_selection`) when this call sees one micro-batch of whole groups.
      axis_name: mapped axis the batch is split over.

    Returns:
      `(loss, aux)`; aux keys loss/policy, reward/score (all samples),
      reward/selected (the selected ones).
    """
    n, _ = _check_token_arrays(mask, logprobs=logprobs)
    scores, valid = _scores_and_validity(scores, n, nonfinite_scores)
    selected = raft_selection(scores, num_samples=num_samples, min_score=min_score, valid=valid)
    keep = jnp.asarray(mask) > 0
    loss, loss_stat = aggregate_loss(
        -_masked_f32(logprobs, keep), mask, aggregation, seq_mask=selected, denominator=denominator,
        axis_name=axis_name)
    weights = jnp.ones((n,), jnp.float32) if valid is None else valid
    aux = {
        "loss/policy": loss_stat,
        "reward/score": Stat.of(scores, weights, axis_name=axis_name),
        "reward/selected": Stat.of(scores, selected, axis_name=axis_name),
    }
    return loss, aux


__all__ = [
    "reinforce_loss",
    "rloo_loss",
    "ppo_loss",
    "grpo_loss",
    "raft_loss",
    "value_loss",
    "clipped_surrogate",
    "best_of_group",
    "raft_selection",
]
