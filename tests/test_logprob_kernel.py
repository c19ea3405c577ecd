"""The fused log-prob kernel: values and gradients against the plain log-softmax, chunked any way,
and the memory it was built to save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_llm
from jaxrl_llm.errors import UserError


def plain_logprobs_and_entropy(z, tokens):
    """The textbook formulas, differentiated by JAX: the reference for the custom VJP."""
    log_p = jax.nn.log_softmax(z, axis=-1)
    return (jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0],
            -jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def batch(n=3, t=5, d=8, v=37, seed=0):
    rng = np.random.default_rng(seed)
    return dict(hidden=jnp.asarray(rng.standard_normal((n, t, d), dtype=np.float32)),
                unembedding=jnp.asarray(rng.standard_normal((d, v), dtype=np.float32)),
                tokens=jnp.asarray(rng.integers(0, v, (n, t))),
                g_logp=jnp.asarray(rng.standard_normal((n, t), dtype=np.float32)),
                g_entropy=jnp.asarray(rng.standard_normal((n, t), dtype=np.float32)))


# chunk_size 4 and 7 leave a tail of rows; vocab blocks of 5, 8 and 16 overlap the last block
# with the one before it (37 is not a multiple), 37 and 64 are one block.
@pytest.mark.parametrize("chunk_size, vocab_chunk_size, temperature, softcap", [
    (None, None, 1.0, None), (4, 5, 0.7, 5.0), (7, 8, 1.0, None), (15, 16, 0.7, 5.0), (None, 37, 1.3, None),
    (100, 64, 1.0, 30.0)])
def test_linear_kernel_values_and_gradients_equal_the_plain_formula(chunk_size, vocab_chunk_size, temperature, softcap):
    b = batch()

    def objective(fn):
        def loss(hidden, unembedding):
            logp, entropy = fn(hidden, unembedding)
            # Both outputs in the loss: the entropy's gradient (a bonus) must reach the weights too.
            return jnp.sum(logp * b["g_logp"]) + jnp.sum(entropy * b["g_entropy"]), (logp, entropy)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    def plain(hidden, unembedding):
        z = hidden @ unembedding
        z = z if softcap is None else softcap * jnp.tanh(z / softcap)
        return plain_logprobs_and_entropy(z / temperature, b["tokens"])

    def ours(hidden, unembedding):
        return jaxrl_llm.linear_token_logprobs(hidden, unembedding, b["tokens"], temperature=temperature,
                                               chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
                                               softcap=softcap)

    (_, want), want_grads = objective(plain)(b["hidden"], b["unembedding"])
    (_, got), got_grads = objective(ours)(b["hidden"], b["unembedding"])
    for x, y in zip((*got, *got_grads), (*want, *want_grads)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("chunk_size", [None, 4, 15])
def test_logits_kernel_gradients_equal_the_plain_formula(chunk_size):
    b = batch()
    z = 3.0 * (b["hidden"] @ b["unembedding"])
    temperature = 0.8

    def grad(fn, g):
        return jax.grad(lambda z: jnp.sum(fn(z) * g))(z)

    plain = lambda z: plain_logprobs_and_entropy(z / temperature, b["tokens"])  # noqa: E731
    np.testing.assert_allclose(
        grad(lambda z: jaxrl_llm.token_logprobs(z, b["tokens"], temperature=temperature, chunk_size=chunk_size),
             b["g_logp"]),
        grad(lambda z: plain(z)[0], b["g_logp"]), atol=1e-5)
    np.testing.assert_allclose(
        grad(lambda z: jaxrl_llm.token_entropy(z, temperature=temperature, chunk_size=chunk_size), b["g_entropy"]),
        grad(lambda z: plain(z)[1], b["g_entropy"]), atol=1e-5)


def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_float32():
    b = batch()
    z = (b["hidden"] @ b["unembedding"]).astype(jnp.bfloat16)
    g = jax.grad(lambda z: jnp.sum(jaxrl_llm.token_logprobs(z, b["tokens"]) * b["g_logp"]))(z)
    want = jax.grad(lambda z: jnp.sum(plain_logprobs_and_entropy(z, b["tokens"])[0] * b["g_logp"]))(
        z.astype(jnp.float32))
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(jnp.float32), want, atol=1e-2)


def compiled_temporaries(**chunks) -> int:
    n, t, d, v = 8, 64, 16, 4096
    args = (jax.ShapeDtypeStruct((n, t, d), jnp.float32), jax.ShapeDtypeStruct((d, v), jnp.float32),
            jax.ShapeDtypeStruct((n, t), jnp.int32))

    def loss(hidden, unembedding, tokens):
        logp, entropy = jaxrl_llm.linear_token_logprobs(hidden, unembedding, tokens, **chunks)
        return jnp.sum(logp) + jnp.sum(entropy)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_chunks_bound_the_memory_of_the_logits():
    rows_by_vocab = 8 * 64 * 4096 * 4  # one float32 [N*T, V]: what the unchunked pass holds
    unchunked = compiled_temporaries()
    chunked = compiled_temporaries(chunk_size=64, vocab_chunk_size=512)
    assert unchunked >= rows_by_vocab
    # The gradient of the unembedding (256 KB here) and [64, 512] blocks: far below one [N*T, V].
    assert chunked < rows_by_vocab / 8, (chunked, unchunked)


def test_vocab_chunk_size_must_be_a_positive_integer():
    b = batch()
    with pytest.raises(UserError, match="vocab_chunk_size"):
        jaxrl_llm.linear_token_logprobs(b["hidden"], b["unembedding"], b["tokens"], vocab_chunk_size=0)
