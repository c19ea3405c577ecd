"""Per-token estimators of KL(pi || pi_ref) from sampled tokens.

J. Schulman, "Approximating KL Divergence" (2020), http://joschu.net/blog/kl-approx.html.
With tokens sampled from pi and the log-ratio `d = log pi(y_t) - log pi_ref(y_t)`:

- k1 = d                          unbiased, can be negative, high variance
- k2 = d**2 / 2                   biased, non-negative, low variance
- k3 = exp(-d) - 1 + d            unbiased, non-negative, low variance

k1 is what the source document and the InstructGPT/TRL reward penalty use; k3 is
GRPO's in-loss KL.
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxrl_llm.objectives import _checks

KL_KINDS = ("k1", "k2", "k3")

# exp(-d) overflows float32 near d = -88; clamping d keeps k3 finite for tokens the
# policy finds wildly unlikely relative to the reference (verl clamps k3 itself).
_MAX_ABS_LOG_RATIO = 20.0


def kl_penalty(logprobs, ref_logprobs, *, kind: str = "k1"):
    """Per-token KL estimate between the policy and a frozen reference.

    Args:
      logprobs: `[N, T]` log pi(y_t | ...) of the sampled tokens.
      ref_logprobs: `[N, T]` log pi_ref(y_t | ...) of the same tokens.
      kind: "k1", "k2" or "k3" (see the module docstring for formulas).

    Returns:
      `[N, T]` float32 estimate; apply the completion mask yourself (see
      `shape_rewards`). k3 clamps the log-ratio to +-20 to stay finite.
    """
    _checks.check_choice("kind", kind, KL_KINDS)
    _checks.check_float("logprobs", logprobs)
    _checks.check_float("ref_logprobs", ref_logprobs)
    _checks.check_shape("ref_logprobs", ref_logprobs, jnp.shape(logprobs), like="logprobs")
    log_ratio = _checks.as_float(logprobs) - _checks.as_float(ref_logprobs)
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio**2
    log_ratio = jnp.clip(log_ratio, -_MAX_ABS_LOG_RATIO, _MAX_ABS_LOG_RATIO)
    return jnp.expm1(-log_ratio) + log_ratio
