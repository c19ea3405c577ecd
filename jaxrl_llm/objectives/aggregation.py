"""Masked reductions, loss aggregation modes, and metrics that aggregate exactly.

Every batch-global quantity here is a ratio of two sums. Keeping the sums (not
the ratio) is what makes results exact when a batch is split into micro-batches
or across devices: sums add, means do not. With `axis_name`, the sums are
`lax.psum`-ed over that mapped axis (`shard_map`, `pmap`, or `vmap` with an
axis name), so the answer equals the single-device answer on the whole batch.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import _checks

LOSS_AGGREGATIONS = (
    "token-mean",
    "seq-mean-token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)


def psum_if(x, axis_name):
    """`lax.psum(x, axis_name)`, or `x` when there is no mapped axis."""
    return x if axis_name is None else lax.psum(x, axis_name)


class Stat(NamedTuple):
    """A metric as sums, so it merges exactly across micro-batches and devices.

    Two `Stat`s of disjoint data combine with `jax.tree.map(jnp.add, a, b)`; the
    mean and standard deviation of the union are then exact. `std` is the
    population standard deviation (ddof=0).
    """

    total: jax.Array
    total_sq: jax.Array
    count: jax.Array

    @property
    def mean(self) -> jax.Array:
        return _safe_divide(self.total, self.count)

    @property
    def std(self) -> jax.Array:
        var = _safe_divide(self.total_sq, self.count) - self.mean**2
        return jnp.sqrt(jnp.maximum(var, 0.0))

    @classmethod
    def of(cls, values, weights=None, *, axis_name=None) -> "Stat":
        """Statistics of `values` where `weights` (0/1, broadcastable) is 1."""
        values = _checks.as_float(values)
        w = jnp.ones_like(values) if weights is None else jnp.broadcast_to(
            jnp.asarray(weights, jnp.float32), values.shape
        )
        values = jnp.where(w > 0, values, 0.0)
        stat = cls(jnp.sum(w * values), jnp.sum(w * values**2), jnp.sum(w))
        return jax.tree.map(lambda s: psum_if(lax.stop_gradient(s), axis_name), stat)

    @classmethod
    def ratio(cls, numerator, denominator) -> "Stat":
        """A ratio metric (e.g. a loss) already summed; `std` is not meaningful."""
        numerator = lax.stop_gradient(_checks.as_float(numerator))
        return cls(numerator, jnp.zeros_like(numerator), _checks.as_float(denominator))


def _safe_divide(numerator, denominator):
    """`numerator / denominator`, and 0 where the denominator is 0 (an empty mask)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1.0), 0.0)


def summarize(aux) -> dict[str, jax.Array]:
    """`{name: mean}` from an `aux` dict of `Stat`s (works under jit; `float()` on the host)."""
    return {name: stat.mean for name, stat in aux.items()}


def masked_sum(x, mask, *, axis=None, axis_name=None):
    """Sum of `x` where `mask` is 1; entries under mask 0 never reach the result."""
    mask = jnp.asarray(mask, jnp.float32)
    total = jnp.sum(jnp.where(mask > 0, x, 0.0) * mask, axis=axis)
    return psum_if(total, axis_name)


def masked_mean(x, mask, *, axis=None, axis_name=None):
    """Mean of `x` over `mask == 1` entries (0 when the mask is empty)."""
    total = masked_sum(x, mask, axis=axis, axis_name=axis_name)
    count = masked_sum(jnp.ones_like(jnp.asarray(x, jnp.float32)), mask, axis=axis, axis_name=axis_name)
    return total / jnp.maximum(count, 1.0)


def masked_var(x, mask, *, axis_name=None):
    """Population variance (ddof=0) of `x` over `mask == 1` entries."""
    mean = masked_mean(x, mask, axis_name=axis_name)
    return masked_mean((x - mean) ** 2, mask, axis_name=axis_name)



def top_quantile_mask(values, mask, quantile: float):
    """`[N, T]` 0/1: the masked entries whose value is in the top `quantile` fraction of all masked
    entries (threshold: their (1 - quantile)-quantile, linearly interpolated as `torch.quantile`;
    ties at it kept). The high-entropy "forking" tokens of Wang et al. 2025, "Beyond the 80/20
    Rule" (https://arxiv.org/abs/2506.01939), TRL's `top_entropy_quantile`: pass entropies and
    the completion mask. `quantile=1` keeps every masked entry. The selection is a constant for
    the gradient; under `jit` over a sharded batch the quantile is the whole batch's."""
    _checks.check_positive_float("quantile", quantile)
    if quantile > 1:
        raise UserError(f"`quantile`: got {quantile!r}, expected a fraction in (0, 1].")
    values = lax.stop_gradient(jnp.asarray(values, jnp.float32))
    keep = jnp.asarray(mask) > 0
    if quantile == 1:
        return keep.astype(jnp.float32)
    threshold = jnp.nanquantile(jnp.where(keep, values, jnp.nan), 1.0 - quantile)
    return (keep & (values >= threshold)).astype(jnp.float32)

def loss_terms(loss_mat, mask, mode: str = "token-mean", *, seq_mask=None):
    """This shard's numerator and denominator of an aggregated per-token loss.

    For a per-token loss `l[n, t]`, completion mask `m[n, t]` and sequence weights
    `s[n]` (default: 1 for a row with at least one token in the mask, 0 for an empty one),
    with `T` the padded completion length:

    - `token-mean`:              sum_{n,t} s m l / sum_{n,t} s m
    - `seq-mean-token-mean`:     sum_n s (sum_t m l / sum_t m) / sum_n s
    - `seq-mean-token-sum`:      sum_n s (sum_t m l) / sum_n s
    - `seq-mean-token-sum-norm`: sum_n s (sum_t m l / T) / sum_n s   (Dr. GRPO,
      Liu et al. 2025, https://arxiv.org/abs/2503.20783: a constant normaliser T)

    `token-mean` weighs every token equally (DAPO); `seq-mean-token-sum` is the
    bandit REINFORCE/RLOO estimator of the source document; `seq-mean-token-mean`
    is the original GRPO. verl names the same four modes and, as here, its seq-mean
    modes average over the sequences that have a token in the mask (a row masked out
    entirely, e.g. a failed reward or a truncated completion left out of the loss, is
    not counted); its `seq-mean-token-sum-norm` is sum_n (sum_t m l / T) over those
    sequences divided by their number, ours too. TRL's `dr_grpo` and `grpo` losses
    instead divide by every row of the batch, masked-out ones included.

    Returns `(numerator, denominator)`, both scalars, summed over this shard only.
    """
    _checks.check_choice("aggregation", mode, LOSS_AGGREGATIONS)
    mask = jnp.asarray(mask, jnp.float32)
    if seq_mask is not None:
        mask = mask * jnp.asarray(seq_mask, jnp.float32)[:, None]
        seq_weight = jnp.asarray(seq_mask, jnp.float32)
    else:  # an empty row is no completion: it counts in no denominator
        seq_weight = (jnp.sum(mask, axis=-1) > 0).astype(jnp.float32)
    # `where` before multiplying: a NaN/inf under mask 0 must not leak (0 * inf = nan).
    token_losses = jnp.where(mask > 0, loss_mat, 0.0) * mask
    if mode == "token-mean":
        return jnp.sum(token_losses), jnp.sum(mask)
    seq_sums = jnp.sum(token_losses, axis=-1)
    if mode == "seq-mean-token-mean":
        seq_losses = seq_sums / jnp.maximum(jnp.sum(mask, axis=-1), 1.0)
    elif mode == "seq-mean-token-sum":
        seq_losses = seq_sums
    else:  # seq-mean-token-sum-norm
        seq_losses = seq_sums / mask.shape[-1]
    return jnp.sum(seq_weight * seq_losses), jnp.sum(seq_weight)


def loss_denominator(mask, mode: str = "token-mean", *, seq_mask=None, axis_name=None):
    """The denominator `aggregate_loss` divides by, from the mask alone (no loss needed).

    Computed once on a whole batch and passed as `denominator=` to a loss called on each
    micro-batch of it, it makes the micro-batch losses (and their gradients) add up to the
    whole batch's exactly: gradient accumulation that leaves the objective unchanged.
    """
    mask = jnp.asarray(mask, jnp.float32)
    _, denominator = loss_terms(jnp.zeros_like(mask), mask, mode, seq_mask=seq_mask)
    return psum_if(denominator, axis_name)


def aggregate_loss(loss_mat, mask, mode: str = "token-mean", *, seq_mask=None, denominator=None, axis_name=None):
    """Reduce a per-token loss `[N, T]` to a scalar; see `loss_terms` for the modes.

    Args:
      loss_mat: `[N, T]` per-token loss.
      mask: `[N, T]` completion mask.
      mode: one of `LOSS_AGGREGATIONS`.
      seq_mask: optional `[N]` 0/1 weights of sequences that count.
      denominator: optional global denominator (e.g. the token count of all
        micro-batches of a step), so that summing micro-batch losses gives the
        full-batch loss exactly.
      axis_name: mapped axis the batch is split over, if any.

    Returns:
      `(loss, stat)`. `loss` is this shard's numerator over the global
      denominator, plus a constant (no gradient) that makes its *value* the
      global loss on every device. Its gradient is therefore this shard's share of
      the global gradient: under `pmap`, combine with `lax.psum(grads, axis)`;
      under `shard_map` with replicated parameters JAX inserts that psum itself
      (there the loss is typed as varying over the axis; return it with
      `P(axis)` or read the global value from `stat`).
      `stat` is a `Stat` ratio (numerator, denominator), summed over devices.
      An empty mask gives loss 0, not NaN.
    """
    numerator, local_denominator = loss_terms(loss_mat, mask, mode, seq_mask=seq_mask)
    global_denominator = psum_if(local_denominator, axis_name)
    if denominator is None:
        denominator = global_denominator
    denominator = lax.stop_gradient(_checks.as_float(denominator))
    local_loss = _safe_divide(numerator, denominator)
    global_numerator = psum_if(numerator, axis_name)
    loss = local_loss
    if axis_name is not None:
        loss = local_loss + lax.stop_gradient(_safe_divide(global_numerator, denominator) - local_loss)
    # The stat keeps this batch's own denominator, so micro-batch stats add up exactly.
    return loss, Stat.ratio(global_numerator, global_denominator)
