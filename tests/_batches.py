"""Random masked batches shared by the objective tests."""

import numpy as np


def random_batch(rng, n=8, t=6, *, empty_row=True, garbage=0.0):
    """A masked batch: prefix masks of random length (one row empty), finite values."""
    lengths = rng.integers(1, t + 1, size=n)
    if empty_row:
        lengths[1] = 0
    mask = (np.arange(t)[None, :] < lengths[:, None]).astype(np.float32)
    logprobs = -rng.gamma(2.0, 1.0, size=(n, t)).astype(np.float32)
    ref_logprobs = (logprobs + rng.normal(0, 0.3, size=(n, t))).astype(np.float32)
    old_logprobs = (logprobs + rng.normal(0, 0.2, size=(n, t))).astype(np.float32)
    if garbage is not None:
        for a in (logprobs, ref_logprobs, old_logprobs):
            a[mask == 0] = garbage
    return dict(
        mask=mask,
        logprobs=logprobs,
        ref_logprobs=ref_logprobs,
        old_logprobs=old_logprobs,
        scores=rng.normal(size=n).astype(np.float32),
        values=rng.normal(size=(n, t)).astype(np.float32),
        old_values=rng.normal(size=(n, t)).astype(np.float32),
        returns=rng.normal(size=(n, t)).astype(np.float32),
        token_rewards=rng.normal(size=(n, t)).astype(np.float32),
        entropy=rng.gamma(2.0, 1.0, size=(n, t)).astype(np.float32),
    )
