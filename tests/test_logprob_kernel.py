"""The fused log-prob kernel: values and gradients against the plain log-softmax, chunked any way,
and the memory it was built to save."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxrl_llm
from jaxrl_llm.errors import UserError
from jaxrl_llm.lowering import kernels_of


def plain_logprobs_and_entropy(z, tokens):
    """The textbook formulas, differentiated by JAX: the reference for the custom VJP."""
    log_p = jax.nn.log_softmax(z, axis=-1)
    return (jnp.take_along_axis(log_p, tokens[..., None], axis=-1)[..., 0],
            -jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def lowered_for(platform, fn):
    """`fn` jitted with `platform`'s kernels (`jaxrl_llm.lowering.kernels_of`), lowered for and run
    on this CPU: a CPU checks the numbers of the accelerator's kernel too, without handing XLA:CPU
    a module lowered for CUDA."""
    jitted = jax.jit(fn)

    def call(*args):
        with kernels_of(platform):
            compiled = jitted.trace(*args).lower().compile()
        return compiled(*args)

    return call


# Every platform's kernel: CPU's (cache-sized row blocks, two-pass reductions) and the one
# accelerators get (whole rows, one fused online-softmax reduction).
PLATFORMS = ("cpu", "cuda")


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
@pytest.mark.parametrize("platform", PLATFORMS)
def test_linear_kernel_values_and_gradients_equal_the_plain_formula(chunk_size, vocab_chunk_size, temperature, softcap,
                                                                     platform):
    b = batch()

    def objective(fn):
        def loss(hidden, unembedding):
            logp, entropy = fn(hidden, unembedding)
            # Both outputs in the loss: the entropy's gradient (a bonus) must reach the weights too.
            return jnp.sum(logp * b["g_logp"]) + jnp.sum(entropy * b["g_entropy"]), (logp, entropy)
        return lowered_for(platform, jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

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
@pytest.mark.parametrize("platform", PLATFORMS)
def test_logits_kernel_gradients_equal_the_plain_formula(chunk_size, platform):
    b = batch()
    z = 3.0 * (b["hidden"] @ b["unembedding"])
    temperature = 0.8

    def grad(fn, g):
        return lowered_for(platform, jax.grad(lambda z: jnp.sum(fn(z) * g)))(z)

    plain = lambda z: plain_logprobs_and_entropy(z / temperature, b["tokens"])  # noqa: E731
    np.testing.assert_allclose(
        grad(lambda z: jaxrl_llm.token_logprobs(z, b["tokens"], temperature=temperature, chunk_size=chunk_size),
             b["g_logp"]),
        grad(lambda z: plain(z)[0], b["g_logp"]), atol=1e-5)
    np.testing.assert_allclose(
        grad(lambda z: jaxrl_llm.token_entropy(z, temperature=temperature, chunk_size=chunk_size), b["g_entropy"]),
        grad(lambda z: plain(z)[1], b["g_entropy"]), atol=1e-5)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_bfloat16_logits_get_a_bfloat16_gradient_computed_in_float32(platform):
    b = batch()
    z = (b["hidden"] @ b["unembedding"]).astype(jnp.bfloat16)
    g = lowered_for(platform, jax.grad(lambda z: jnp.sum(jaxrl_llm.token_logprobs(z, b["tokens"]) * b["g_logp"])))(z)
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


@pytest.mark.parametrize("platform", PLATFORMS)
def test_logits_kernel_values_equal_the_plain_formula_at_a_real_vocabulary(platform):
    """Many rows of a large vocabulary with extreme logits: the online merge of (max, sum,
    entropy sum) must match log_softmax where it rescales often, and -inf logits (a masked
    vocabulary) must not turn into NaN."""
    rng = np.random.default_rng(3)
    z = jnp.asarray(rng.standard_normal((2, 24, 5000), dtype=np.float32) * 8)
    z = z.at[0, 0, :100].set(-jnp.inf)
    tokens = jnp.asarray(rng.integers(100, 5000, (2, 24)))
    got = lowered_for(platform, lambda z: (jaxrl_llm.token_logprobs(z, tokens), jaxrl_llm.token_entropy(z)))(z)
    log_p = jax.nn.log_softmax(z, axis=-1)
    want = (jnp.take_along_axis(log_p, tokens[..., None], -1)[..., 0],
            -jnp.sum(jnp.where(jnp.isfinite(log_p), jnp.exp(log_p) * log_p, 0.0), axis=-1))
    for x, y in zip(got, want):
        # float32 sums over 5000 entries: a few ulps of the result per 1000 terms.
        np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-5)
    g = jnp.asarray(rng.standard_normal((2, 2, 24), dtype=np.float32))
    grad = lowered_for(platform, jax.grad(lambda z: jnp.sum(jaxrl_llm.token_logprobs(z, tokens) * g[0])
                                          + jnp.sum(jaxrl_llm.token_entropy(z) * g[1])))(z)
    assert np.isfinite(np.asarray(grad)).all()
    np.testing.assert_array_equal(grad[0, 0, :100], 0.0)  # no probability, no gradient


def exported_program(platform: str) -> str:
    """StableHLO of the log-prob kernel's loss and gradient from [64 x 32, 32000] logits, exported
    for `platform` from this (CPU) host, as `jax.export` and `jaxrl-llm plan` see it."""
    def loss(logits, tokens):
        return jnp.sum(jaxrl_llm.token_logprobs(logits, tokens)) + jnp.sum(jaxrl_llm.token_entropy(logits))

    args = (jax.ShapeDtypeStruct((64, 32, 32000), jnp.float32), jax.ShapeDtypeStruct((64, 32), jnp.int32))
    return jax.export.export(jax.jit(jax.grad(loss)), platforms=[platform])(*args).mlir_module()


def test_the_kernel_blocks_rows_for_the_platform_it_is_lowered_for_not_the_host():
    # XLA:CPU: a loop over cache-sized blocks of rows (16 rows of 32000 here).
    assert "stablehlo.while" in exported_program("cpu")
    # An accelerator: whole rows in one pass, no loop of thousands of tiny steps; the host is a CPU.
    for platform in ("cuda", "tpu"):
        assert "stablehlo.while" not in exported_program(platform), platform
