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


def _map_chunks(fn, inputs, chunk_size):
    """`fn(*chunk) -> pytree of [R] arrays` over the rows of `inputs` (arrays with a leading [R]),
    `chunk_size` rows at a time under `jax.checkpoint` (None: all at once)."""
    rows = inputs[0].shape[0]
    if chunk_size is None or chunk_size >= rows:
        return fn(*inputs)
    num_chunks, remainder = divmod(rows, chunk_size)
    full = num_chunks * chunk_size
    # Recompute each chunk's softmax in the backward pass instead of storing it.
    chunk_fn = jax.checkpoint(lambda args: fn(*args))
    chunked = tuple(x[:full].reshape(num_chunks, chunk_size, *x.shape[1:]) for x in inputs)
    out = jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), lax.map(chunk_fn, chunked))
    if remainder:
        tail = chunk_fn(tuple(x[full:] for x in inputs))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, tail)
    return out


def _map_rows(row_fn, logits, tokens, temperature, chunk_size):
    """Apply `row_fn(scaled_logits [R, V] f32, tokens [R]) -> [R]` over all N*T rows."""
    n, t, v = logits.shape

    def rows(chunk_logits, chunk_tokens):
        # Temperature first: the logprobs must be those of the distribution we sample from.
        return row_fn(_checks.as_float(chunk_logits) / temperature, chunk_tokens)

    out = _map_chunks(rows, (jnp.reshape(logits, (n * t, v)), jnp.reshape(tokens, (n * t,))), chunk_size)
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


def linear_token_logprobs(hidden, unembedding, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                          softcap: float | None = None):
    """Log-probabilities and entropies straight from hidden states, never holding `[N, T, V]`.

    z = softcap(h @ W) / temperature (softcap(x) = c * tanh(x / c) when given), then
    log pi(y_t) = z[y_t] - logsumexp(z) and H_t = -sum_v p_v log p_v, in float32. With
    `chunk_size`, the logits exist only `chunk_size` rows at a time, in the forward and the
    backward pass: this is what lets a 262k-vocabulary model train on long completions.

    Args:
      hidden: `[N, T, D]` final hidden states at the positions that predict `tokens`.
      unembedding: `[D, V]` output projection (the tied embedding transposed, or the LM head).
      tokens: `[N, T]` integer token ids.
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.
      softcap: final-logit soft-capping value (Gemma), or None.

    Returns:
      `(logprobs [N, T], entropy [N, T])`, float32.
    """
    _checks.check_rank("hidden", hidden, 3, what="[N, T, D]")
    _checks.check_float("hidden", hidden)
    _checks.check_rank("unembedding", unembedding, 2, what="[D, V]")
    if jnp.shape(unembedding)[0] != jnp.shape(hidden)[-1]:
        raise ValueError(f"`unembedding` must have shape [D={jnp.shape(hidden)[-1]}, V]; got {jnp.shape(unembedding)}.")
    _checks.check_shape("tokens", tokens, jnp.shape(hidden)[:2], like="hidden[..., 0]")
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise ValueError(f"`tokens` must be integer token ids; got dtype {jnp.result_type(tokens)}.")
    _checks.check_positive_float("temperature", temperature)
    if chunk_size is not None:
        _checks.check_positive_int("chunk_size", chunk_size)
    n, t, d = hidden.shape

    def rows(h, y):
        z = jnp.einsum("rd,dv->rv", h.astype(unembedding.dtype), unembedding, preferred_element_type=jnp.float32)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        z = _checks.as_float(z) / temperature
        return _logprob_rows(z, y), _entropy_rows(lax.stop_gradient(z), y)

    logprobs, entropy = _map_chunks(rows, (jnp.reshape(hidden, (n * t, d)), jnp.reshape(tokens, (n * t,))), chunk_size)
    return jnp.reshape(logprobs, (n, t)), jnp.reshape(entropy, (n, t))
