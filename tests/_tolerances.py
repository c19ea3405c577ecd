"""Tolerances for comparing two float32 computations of one quantity.

Two programs that compute the same thing in another order (another backend's fusions and
reduction trees, a scan instead of a loop, micro-batches instead of one pass) differ by rounding
only. A sum of n float32 terms of size s carries an error of about sqrt(n) * eps * s (independent
roundings add up as a random walk; n * eps * s at worst), and the errors of the reductions on
the path from the inputs to a result add up. So a tolerance that holds on any backend is

    tol = safety * eps * scale * sum_i sqrt(n_i)

over the lengths n_i of the reductions on the path (one rounding at least), with `safety`
covering the largest of many compared elements. For the small models and batches of the tests
this is 1e-6 to 1e-4 relative, while a real bug (a wrong mask, a missing term) shows as 1e-3 or
more. (A GPU run failed a fixed 2e-6 with 2.15e-6: XLA reorders float32 sums there.)
"""

import math

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 1.19e-7, float32's relative resolution


def float32_tolerance(*reduction_lengths: int, scale: float = 1.0, safety: float = 4.0) -> float:
    """`safety * eps * scale * sum(sqrt(n) for n in reduction_lengths)`: the largest difference
    expected between two float32 computations of values of size `scale` that differ only in the
    order of their operations (see the module docstring)."""
    return safety * EPS32 * float(scale) * sum(math.sqrt(n) for n in (reduction_lengths or (1,)))


def model_reductions(*, num_layers: int, hidden: int, intermediate: int, seq: int, vocab: int) -> tuple[int, ...]:
    """The reduction lengths on the path through a decoder (per layer: attention over `seq` keys,
    the projections over `hidden`, the MLP over `intermediate`; the unembedding over `hidden`,
    the log-softmax over `vocab`), for `float32_tolerance` of its logits and gradients."""
    return (seq, hidden, intermediate) * num_layers + (hidden, vocab)
