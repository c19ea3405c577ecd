"""Token log-probabilities and entropy from logits, optionally in memory-bounded chunks.

With a 262k vocabulary a float32 log-softmax of `[N, T, V]` is the largest array
of an RL step (N=64, T=512: 34 GB). `chunk_size` processes `chunk_size` rows of
the flattened `[N*T, V]` logits at a time under `jax.checkpoint`, so neither the
forward nor the backward pass ever holds more than `[chunk_size, V]` in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import _checks


def _check_logits(logits, temperature, chunk_size):
    _checks.check_rank("logits", logits, 3, what="[N, T, V]")
    _checks.check_float("logits", logits)
    _checks.check_positive_float("temperature", temperature)
    if chunk_size is not None:
        _checks.check_positive_int("chunk_size", chunk_size)


def _check_tokens(tokens, leading_shape, like):
    _checks.check_shape("tokens", tokens, leading_shape, like=like)
    if not jnp.issubdtype(jnp.result_type(tokens), jnp.integer):
        raise UserError(f"`tokens` must be integer token ids; got dtype {jnp.result_type(tokens)}.")


def _check_filter(top_k, top_p):
    _checks.check_positive_int("top_k", top_k, minimum=0)
    if not isinstance(top_p, jax.core.Tracer) and (
            isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.integer, np.floating))
            or not 0 < top_p <= 1):
        raise UserError(f"`top_p` must be a number in (0, 1] (1 disables nucleus filtering); got {top_p!r}.")


def kept_tokens(z, *, top_k: int = 0, top_p=1.0):
    """`[..., V]` bool: the tokens top-k then top-p (nucleus) sampling may draw from `softmax(z)`.

    top-k keeps tokens whose logit is >= the k-th largest (ties with the k-th are kept);
    top-p (Holtzman et al. 2020, https://arxiv.org/abs/1904.09751) then keeps the smallest set
    of most likely tokens whose mass under softmax(z) (after top-k) reaches top_p: token i is
    kept iff the mass ranked strictly above it is < top_p, so the most likely token always
    stays (ties at the boundary are kept). This is the rule of transformers' warpers; the
    sampler and the training log-probabilities both use it, so they agree on the kept set.
    `z` are the logits already divided by the temperature. No gradient flows through the set.

    Args:
      z: `[..., V]` float logits / temperature.
      top_k: 0 disables; values >= V keep everything.
      top_p: 1.0 disables; in (0, 1] (may be traced).
    """
    _check_filter(top_k, top_p)
    z = lax.stop_gradient(_checks.as_float(z))
    kept = jnp.ones(z.shape, bool)
    vocab = z.shape[-1]
    if 0 < top_k < vocab:
        kth = lax.top_k(z, top_k)[0][..., -1:]
        kept = z >= kth
        z = jnp.where(kept, z, -jnp.inf)
    if isinstance(top_p, jax.core.Tracer) or top_p < 1.0:
        sorted_desc = -jnp.sort(-z, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        num_kept = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_desc, num_kept - 1, axis=-1)
        kept = kept & (z >= threshold)
    return kept


def _is_filtered(top_k, top_p) -> bool:
    return top_k > 0 or isinstance(top_p, jax.core.Tracer) or top_p < 1.0


def _logprob_and_entropy_rows(z, tokens, top_k, top_p, with_entropy=True):
    """`(log p(tokens) [R], entropy [R] or None)` of softmax(z) over the kept set, with gradients.

    The sampled token always counts as kept: it was in the set when it was drawn, and after a
    policy update that moved it out a -inf log-probability would make ratios 0 and gradients NaN.
    """
    kept = None
    if _is_filtered(top_k, top_p):
        kept = kept_tokens(z, top_k=top_k, top_p=top_p) | (jnp.arange(z.shape[-1]) == tokens[:, None])
        z = jnp.where(kept, z, -jnp.inf)
    # Shifted by the row's max first, as log_softmax does: z - max loses nothing, where
    # z[y] - logsumexp(z) would cancel the leading digits of two large numbers.
    shifted = z - lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    log_normaliser = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    target = jnp.take_along_axis(shifted, tokens[:, None], axis=-1)[:, 0] - log_normaliser
    if not with_entropy:
        return target, None
    log_p = shifted - log_normaliser[:, None]
    if kept is not None:
        # p log p is 0 for removed tokens (p = 0); the inner `where` keeps 0 * -inf (NaN) out
        # of the gradient too.
        log_p = jnp.where(kept, log_p, 0.0)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p * (1.0 if kept is None else kept), axis=-1)
    return target, entropy


def _rows_from_logits(top_k, top_p, temperature, with_entropy=True):
    def rows(chunk_logits, chunk_tokens):
        # Temperature first: the logprobs must be those of the distribution we sample from.
        z = _checks.as_float(chunk_logits) / temperature
        return _logprob_and_entropy_rows(z, chunk_tokens, top_k, top_p, with_entropy)

    return rows


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


def _flat(x):
    return jnp.reshape(x, (-1, *jnp.shape(x)[2:]))


def token_logprobs(logits, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                   top_k: int = 0, top_p: float = 1.0):
    """Log-probability of each token under softmax(filter(logits / temperature)).

    log pi(y_t) = z[y_t] - logsumexp_{v kept} z[v],  z = logits_t / temperature, in float32,
    where the kept set is all tokens, or the top-k / top-p set of `kept_tokens` (the sampled
    token always included). `logits[n, t]` must be the logits that predict `tokens[n, t]`
    (i.e. already shifted by one relative to the input ids).

    Args:
      logits: `[N, T, V]` float logits (any float dtype).
      tokens: `[N, T]` integer token ids in [0, V).
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.
      top_k, top_p: the sampler's filter (0 and 1.0: none), so that the log-probabilities are
        those of the distribution the tokens were drawn from.

    Returns:
      `[N, T]` float32 log-probabilities.
    """
    _check_logits(logits, temperature, chunk_size)
    _check_tokens(tokens, jnp.shape(logits)[:2], like="logits[..., 0]")
    _check_filter(top_k, top_p)
    rows = _rows_from_logits(top_k, top_p, temperature, with_entropy=False)
    logprobs, _ = _map_chunks(rows, (_flat(logits), _flat(tokens)), chunk_size)
    return jnp.reshape(logprobs, jnp.shape(tokens))


def token_entropy(logits, *, temperature: float = 1.0, chunk_size: int | None = None, top_k: int = 0,
                  top_p: float = 1.0):
    """Entropy of softmax(filter(logits / temperature)) at every position, in nats, with its gradient.

    H_t = -sum_{v kept} p_v log p_v, float32 (kept: see `token_logprobs`; here without a
    sampled token, so exactly the top-k / top-p set).

    Args:
      logits: `[N, T, V]` float logits.
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.
      top_k, top_p: the sampler's filter (0 and 1.0: none).

    Returns:
      `[N, T]` float32 entropies.
    """
    _check_logits(logits, temperature, chunk_size)
    _check_filter(top_k, top_p)
    # The most likely token is always in the kept set, so using it as the "sampled" token
    # leaves the set exactly as top-k / top-p define it.
    top_token = jnp.argmax(lax.stop_gradient(logits), axis=-1)
    _, entropy = _map_chunks(_rows_from_logits(top_k, top_p, temperature), (_flat(logits), _flat(top_token)), chunk_size)
    return jnp.reshape(entropy, jnp.shape(logits)[:2])


def linear_token_logprobs(hidden, unembedding, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                          softcap: float | None = None, top_k: int = 0, top_p: float = 1.0):
    """Log-probabilities and entropies straight from hidden states, never holding `[N, T, V]`.

    z = softcap(h @ W) / temperature (softcap(x) = c * tanh(x / c) when given), then
    log pi(y_t) = z[y_t] - logsumexp(z) and H_t = -sum_v p_v log p_v over the kept set (all
    tokens, or the top-k / top-p set as in `token_logprobs`), in float32, both with their
    gradients (an entropy bonus in the loss reaches the parameters). With `chunk_size`, the
    logits exist only `chunk_size` rows at a time, in the forward and the backward pass: this
    is what lets a 262k-vocabulary model train on long completions.

    Args:
      hidden: `[N, T, D]` final hidden states at the positions that predict `tokens`.
      unembedding: `[D, V]` output projection (the tied embedding transposed, or the LM head).
      tokens: `[N, T]` integer token ids.
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.
      softcap: final-logit soft-capping value (Gemma), or None.
      top_k, top_p: the sampler's filter (0 and 1.0: none).

    Returns:
      `(logprobs [N, T], entropy [N, T])`, float32.
    """
    _checks.check_rank("hidden", hidden, 3, what="[N, T, D]")
    _checks.check_float("hidden", hidden)
    _checks.check_rank("unembedding", unembedding, 2, what="[D, V]")
    if jnp.shape(unembedding)[0] != jnp.shape(hidden)[-1]:
        raise UserError(f"`unembedding` must have shape [D={jnp.shape(hidden)[-1]}, V]; got {jnp.shape(unembedding)}.")
    _check_tokens(tokens, jnp.shape(hidden)[:2], like="hidden[..., 0]")
    _checks.check_positive_float("temperature", temperature)
    if chunk_size is not None:
        _checks.check_positive_int("chunk_size", chunk_size)
    _check_filter(top_k, top_p)
    rows_from_logits = _rows_from_logits(top_k, top_p, temperature)

    def rows(h, y):
        z = jnp.einsum("rd,dv->rv", h.astype(unembedding.dtype), unembedding, preferred_element_type=jnp.float32)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        return rows_from_logits(z, y)

    logprobs, entropy = _map_chunks(rows, (_flat(hidden), _flat(tokens)), chunk_size)
    return jnp.reshape(logprobs, jnp.shape(tokens)), jnp.reshape(entropy, jnp.shape(tokens))
