"""Token log-probabilities and entropy from logits, optionally in memory-bounded chunks.

With a 262k vocabulary a float32 log-softmax of `[N, T, V]` is the largest array
of an RL step (N=64, T=512: 34 GB). `chunk_size` processes `chunk_size` rows of
the flattened `[N*T, V]` logits at a time under `jax.checkpoint`, so neither the
forward nor the backward pass ever holds more than `[chunk_size, V]` in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxrl_llm.objectives import _checks


def _check_logits(logits, temperature, chunk_size):
    _checks.check_rank("logits", logits, 3, what="[N, T, V]")
    _checks.check_float("logits", logits)
    _checks.check_positive_float("temperature", temperature)
    if chunk_size is not None:
        _checks.check_positive_int("chunk_size", chunk_size)


def _map_rows(row_fn, logits, tokens, temperature, chunk_size):
    """Apply `row_fn(scaled_logits [R, V] f32, tokens [R]) -> [R]` over all rows."""
    n, t, v = logits.shape
    flat_logits = jnp.reshape(logits, (n * t, v))
    flat_tokens = jnp.reshape(tokens, (n * t,))

    def rows(chunk_logits, chunk_tokens):
        # Temperature first: the logprobs must be those of the distribution we sample from.
        return row_fn(_checks.as_float(chunk_logits) / temperature, chunk_tokens)

    if chunk_size is None or chunk_size >= n * t:
        return jnp.reshape(rows(flat_logits, flat_tokens), (n, t))
    num_chunks, remainder = divmod(n * t, chunk_size)
    full = num_chunks * chunk_size
    # Recompute each chunk's softmax in the backward pass instead of storing it.
    chunk_fn = jax.checkpoint(lambda args: rows(*args))
    out = lax.map(
        chunk_fn,
        (
            flat_logits[:full].reshape(num_chunks, chunk_size, v),
            flat_tokens[:full].reshape(num_chunks, chunk_size),
        ),
    ).reshape(full)
    if remainder:
        out = jnp.concatenate([out, chunk_fn((flat_logits[full:], flat_tokens[full:]))])
    return jnp.reshape(out, (n, t))


def _logprob_rows(z, tokens):
    target = jnp.take_along_axis(z, tokens[:, None], axis=-1)[:, 0]
    return target - jax.nn.logsumexp(z, axis=-1)


def _entropy_rows(z, tokens):
    del tokens
    log_p = jax.nn.log_softmax(z, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def token_logprobs(logits, tokens, *, temperature: float = 1.0, chunk_size: int | None = None):
    """Log-probability of each token under softmax(logits / temperature).

    log pi(y_t) = z[y_t] - logsumexp(z),  z = logits_t / temperature, in float32.
    `logits[n, t]` must be the logits that predict `tokens[n, t]` (i.e. already
    shifted by one relative to the input ids).

    Args:
      logits: `[N, T, V]` float logits (any float dtype).
      tokens: `[N, T]` integer token ids in [0, V).
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.

    Returns:
      `[N, T]` float32 log-probabilities.
    """
    _check_logits(logits, temperature, chunk_size)
    _checks.check_shape("tokens", tokens, jnp.shape(logits)[:2], like="logits[..., 0]")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"`tokens` must be integer token ids; got dtype {jnp.result_type(tokens)}.")
    return _map_rows(_logprob_rows, logits, tokens, temperature, chunk_size)


def token_entropy(logits, *, temperature: float = 1.0, chunk_size: int | None = None):
    """Entropy of softmax(logits / temperature) at every position, in nats.

    H_t = -sum_v p_v log p_v, float32.

    Args:
      logits: `[N, T, V]` float logits.
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.

    Returns:
      `[N, T]` float32 entropies.
    """
    _check_logits(logits, temperature, chunk_size)
    tokens = jnp.zeros(jnp.shape(logits)[:2], jnp.int32)
    return _map_rows(_entropy_rows, logits, tokens, temperature, chunk_size)
