"""Token log-probabilities and entropy from logits or hidden states, in one fused, chunked kernel.

The log-softmax over the vocabulary is the largest computation of an RL step on a real
vocabulary (Gemma's has 262,144 entries; N=64 completions of T=512 tokens make a float32
`[N, T, V]` of 34 GB). Without a top-k / top-p filter both entry points run a kernel with a
custom VJP (`jax.custom_vjp`):

* forward: per row, the log-sum-exp and the entropy (one pass over the logits), and z[y];
  only those two floats per row are kept for the backward pass, never a `[N, T, V]` softmax;
* backward: the softmax is recomputed from the saved log-sum-exp, and the cotangent of the
  logits written once: dz = g_logp * (onehot(y) - p) - g_H * p * (log p + H).

Its floor is memory traffic: read the logits once for the statistics, once more for the
gradient, write the gradient once. How the forward reads them is chosen by the platform the
program is lowered for (`lax.platform_dependent`), never by the host, so that `jax.export(...,
platforms=["cuda"])` or `jaxrl-llm plan --platform cuda` on a CPU host gets the accelerator's
program:

* XLA:CPU: blocks of rows small enough (~2 MB) for the max and the sum of exponentials to read
  each block from the cache, whatever `chunk_size` (which only lowers the block);
* GPU/TPU: whole rows (or `chunk_size` rows) in ONE pass, a variadic reduction that merges
  (max, sum of exponentials, entropy sum) online, so the logits are read once from memory.

Either way no `[N, T, V]` temporary is kept, and the backward pass is one elementwise pass into
the gradient. `linear_token_logprobs` goes further, as
Liger's fused linear cross-entropy does (Hsu et al. 2024, https://arxiv.org/abs/2410.10989): the
unembedding matmul runs inside the chunk, and `vocab_chunk_size` splits the vocabulary too, with
an online log-sum-exp (Milakov & Gimelshein 2018, https://arxiv.org/abs/1805.02867), so no
logits exist beyond `[chunk_size, vocab_chunk_size]` in the forward or the backward pass.

With top-k / top-p the kept set is recomputed per row from the full logits (a sort), so the
filtered path differentiates the plain formula under `jax.checkpoint`, chunked over rows.
The kernel does not differentiate with respect to `temperature` (a sampling constant).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrl_llm.errors import UserError
from jaxrl_llm.lowering import by_platform
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
    if chunk_size is None or chunk_size >= inputs[0].shape[0]:
        return fn(*inputs)
    # Recompute each chunk's softmax in the backward pass instead of storing it.
    chunk_fn = jax.checkpoint(fn)
    return _scan_row_blocks(lambda carry, *chunk: (carry, chunk_fn(*chunk)), None, inputs, chunk_size)[1]


def _flat(x):
    return jnp.reshape(x, (-1, *jnp.shape(x)[2:]))


# ---------------------------------------------------------------------------------------------
# The fused kernel (no filter). z = logits / temperature (or softcap(h @ W) / temperature),
# log p = z - lse, p = exp(log p), H = -sum p log p:
#   d log p(y) / dz = onehot(y) - p,      dH / dz = -p * (log p + H).


def _scan_row_blocks(fn, carry, inputs, block):
    """`fn(carry, *block_inputs) -> (carry, outputs)` over the rows of `inputs` (arrays with a
    leading [R]), `block` rows at a time (None: all at once): a `lax.scan` over the whole blocks,
    so that XLA holds one block's temporaries at a time, then the remaining rows."""
    rows = inputs[0].shape[0]
    block = rows if block is None else min(block, rows)
    num_blocks, tail = divmod(rows, block)
    if num_blocks == 1 and not tail:
        return fn(carry, *inputs)
    full = num_blocks * block
    stacked = tuple(x[:full].reshape(num_blocks, block, *x.shape[1:]) for x in inputs)
    carry, out = lax.scan(lambda c, args: fn(c, *args), carry, stacked)
    # [num_blocks, block, ...] -> [full, ...] is a reshape of contiguous memory: no copy.
    out = jax.tree.map(lambda y: y.reshape(full, *y.shape[2:]), out)
    if tail:
        carry, rest = fn(carry, *(x[full:] for x in inputs))
        out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, rest)
    return carry, out


def _row_stats(z, tokens, with_entropy, source_bytes: int = 4):
    """`(z[y] - max, max, log sum e^(z - max), sum p (z - max) or None)` per row of z [R, Vb].
    Shifted by the row's max, as log_softmax does: nothing large cancels.

    How the reductions run is chosen by the platform the program is lowered for
    (`lax.platform_dependent`), never by the host: XLA:CPU gets two cache-friendly passes; an
    accelerator one fused pass over float32 logits (`_row_stats_one_pass`) and XLA's two plain
    reductions over 2-byte ones (`source_bytes`: the logits' itemsize before the float32 cast),
    which read half the bytes, so the one pass's extra exponentials no longer pay for the
    second read (H200, [16384, 151936] logits, loss and gradient: float32 8.4 ms one pass vs
    9.6 two; bfloat16 6.8 vs 6.2; benchmarks/results/gpu_suite.md)."""
    def two_pass(z, tokens):
        return _row_stats_two_pass(z, tokens, with_entropy)

    def one_pass(z, tokens):
        return _row_stats_one_pass(z, tokens, with_entropy)

    choice = ACCELERATOR_ROW_STATS or ("one_pass" if source_bytes >= 4 else "two_pass")
    accelerator = one_pass if choice == "one_pass" else two_pass
    return by_platform(z, tokens, cpu=two_pass, default=accelerator)


# The accelerators' forward: None (by the logits' dtype, see `_row_stats`), or "one_pass" /
# "two_pass" for every dtype (benchmarks/gpu_suite.py times both).
ACCELERATOR_ROW_STATS = None


def _row_stats_two_pass(z, tokens, with_entropy):
    """The max, then the sum of exponentials (and the entropy's sum): each a plain reduction that
    XLA:CPU vectorises; the second reads the block from the cache (the caller keeps blocks small)."""
    peak = jnp.max(z, axis=-1)
    shifted = z - peak[:, None]
    log_total = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))
    target = _column(shifted, tokens)
    mean_shifted = None
    if with_entropy:
        # A second reduction that recomputes exp: sharing it with the first would make XLA:CPU
        # write the [R, Vb] exponentials out and read them back twice.
        # A -inf logit (a masked vocabulary entry) has p log p = 0, not 0 * -inf: held at -1e30
        # (e^-1e30 is 0 too). A clamp, not a select: XLA:CPU keeps it inside the fused passes.
        shifted2 = jnp.maximum(lax.optimization_barrier(shifted), -1e30)
        weighted = jnp.exp(shifted2) * shifted2
        mean_shifted = jnp.sum(weighted, axis=-1) / jnp.exp(log_total)
    return target, peak, log_total, mean_shifted


def _online_softmax_combine(a, b):
    """Merge two partial row statistics `(m, s, u)`, each relative to its own max m:
    s = sum e^(z - m), u = sum e^(z - m) (z - m). One exp per merge: only the smaller max is
    rescaled, by e^d with d = min - max <= 0 (Milakov & Gimelshein 2018)."""
    (m1, s1, u1), (m2, s2, u2) = a, b
    first_larger = m1 >= m2
    peak = jnp.maximum(m1, m2)
    # -inf - -inf (two empty partials) is NaN: such a d is 0, and -inf is held at a finite value
    # so that 0 * d stays 0.
    d = jnp.where(m1 == m2, 0.0, jnp.maximum(jnp.minimum(m1, m2) - peak, -1e30))
    e = jnp.exp(d)
    s_big, u_big = jnp.where(first_larger, s1, s2), jnp.where(first_larger, u1, u2)
    s_small, u_small = jnp.where(first_larger, s2, s1), jnp.where(first_larger, u2, u1)
    return peak, s_big + e * s_small, u_big + e * (u_small + s_small * d)


def _row_stats_one_pass(z, tokens, with_entropy):
    """The same statistics from ONE read of each row: a variadic reduction whose partial results
    are (max, sum of exponentials, and for the entropy sum e^(z - m) (z - m)), merged online.
    On a GPU the row's max and its sum of exponentials are otherwise two passes over memory;
    the logits of a real vocabulary do not fit in any cache."""
    ones = jnp.ones(z.shape, z.dtype)
    if with_entropy:
        init = (jnp.array(-jnp.inf, z.dtype), jnp.array(0, z.dtype), jnp.array(0, z.dtype))
        peak, total, weighted = lax.reduce((z, ones, jnp.zeros(z.shape, z.dtype)), init, _online_softmax_combine,
                                           (z.ndim - 1,))
        mean_shifted = weighted / total
    else:
        def combine(a, b):
            return _online_softmax_combine((*a, 0.0), (*b, 0.0))[:2]

        peak, total = lax.reduce((z, ones), (jnp.array(-jnp.inf, z.dtype), jnp.array(0, z.dtype)), combine,
                                 (z.ndim - 1,))
        mean_shifted = None
    target = _column(z, tokens) - peak
    return target, peak, jnp.log(total), mean_shifted


def _column(z, tokens):
    """z[r, tokens[r]] for each row (an index outside [0, Vb) reads a clipped column: callers mask it)."""
    return jnp.take_along_axis(z, jnp.clip(tokens, 0, z.shape[-1] - 1)[:, None], axis=-1)[:, 0]


def _logit_cotangent(z, token_index, lse, g_logp, entropy=None, g_entropy=None, *, scale=1.0, dtype=jnp.float32):
    """`scale * dL/dz` in `dtype`, for z [R, Vb] a block of the logits; `token_index` [R]: each row's
    token's column in the block, or any index outside [0, Vb) when the block does not hold it.

    dL/dz = g_logp (onehot(y) - p) - g_H p (log p + H). The one-hot term is a scatter of R values
    on CPU (no [R, Vb] compare); on an accelerator a compare inside the one elementwise pass, so
    that the scaled, cast cotangent is written once (a scatter between the pass and the cast
    would write and read the [R, Vb] float32 cotangent twice more)."""
    with_entropy = g_entropy is not None

    def cotangent(z, lse, g_logp, entropy, g_entropy):
        # Held at -1e30: p (log p + H) is 0 where p is (a -inf logit), never 0 * -inf.
        log_p = jnp.maximum(z - lse[:, None], -1e30)
        p = jnp.exp(log_p)
        dz = -p * g_logp[:, None]
        if with_entropy:
            dz = dz - (g_entropy[:, None] * p) * (log_p + entropy[:, None])
        return dz

    def scattered(z, token_index, lse, g_logp, entropy, g_entropy, scale):
        dz = cotangent(z, lse, g_logp, entropy, g_entropy)
        outside = (token_index < 0) | (token_index >= z.shape[-1])
        dz = dz.at[jnp.arange(z.shape[0]), jnp.where(outside, z.shape[-1], token_index)].add(g_logp, mode="drop")
        return (dz * scale).astype(dtype)

    def fused(z, token_index, lse, g_logp, entropy, g_entropy, scale):
        dz = cotangent(z, lse, g_logp, entropy, g_entropy)
        hit = jnp.arange(z.shape[-1])[None, :] == token_index[:, None]
        return ((dz + jnp.where(hit, g_logp[:, None], 0.0)) * scale).astype(dtype)

    zeros = jnp.zeros_like(lse)
    args = (z, token_index, lse, g_logp, entropy if with_entropy else zeros, g_entropy if with_entropy else zeros,
            scale)
    return by_platform(*args, cpu=scattered, default=fused)


def _vocab_loop(lower: int, upper: int, body, carry):
    """`body(i, carry) -> carry` for the vocabulary blocks lower..upper-1: a `fori_loop` on CPU (one
    block's temporaries at a time), unrolled on an accelerator, where the few blocks' static
    slices let XLA schedule the matmuls freely and no loop runs per block."""
    def rolled(carry):
        return lax.fori_loop(lower, upper, body, carry)

    def unrolled(carry):
        for i in range(lower, upper):
            carry = body(i, carry)
        return carry

    if upper - lower <= 1:
        return unrolled(carry)
    return by_platform(carry, cpu=rolled, default=unrolled)


# --- from logits ----------------------------------------------------------------------------

# XLA:CPU: rows per block of the forward pass, about 2 MB of float32 logits, so that the max and
# the sum of exponentials read each block from the cache, not twice from memory. Measured on a
# 2-core EPYC, loss + gradient from [1024, 262144] logits: 1180 ms in one block, 565 ms in blocks
# of 2 rows; from [8192, 32000]: 473 ms vs 496 ms in blocks of 16 (benchmarks/objectives_vs_pytorch.py).
# An accelerator runs the same blocks as a loop of thousands of tiny steps (3.2x slower than
# PyTorch eager on an H200 at V=151936): there the forward reads whole rows in one fused pass.
_CPU_BLOCK_ELEMENTS = 1 << 19


def _cpu_block_rows(vocab: int, chunk_size: int | None) -> int:
    rows = max(1, _CPU_BLOCK_ELEMENTS // vocab)
    return rows if chunk_size is None else min(rows, chunk_size)


def _logits_stats(logits, tokens, temperature, chunk_size, with_entropy):
    """Per row `(log p(y), lse, H or None)`, in row blocks chosen for the platform the program is
    lowered for: cache-sized on CPU, `chunk_size` rows (None: all) on an accelerator."""
    def in_blocks(block, target_outside=False):
        # target_outside (XLA:CPU): the blocks return (max, log sum exp) only, and z[y] - max is
        # gathered from the logits after the loop (within an ulp of the in-loop value: XLA may
        # fold the division by the temperature differently in the two places). With the target
        # and the log-prob leaving the loop too, XLA:CPU wrote each block's z - max out instead of
        # fusing it into the sum: the loss and its gradient from [8192, 32000] logits took 309 ms
        # instead of 252 (2-core Xeon, benchmarks/results/objectives_vs_pytorch.md).
        def stats(carry, x, y, temperature):
            target, peak, log_total, mean_shifted = _row_stats(_checks.as_float(x) / temperature, y, with_entropy,
                                                               jnp.dtype(x.dtype).itemsize)
            entropy = None if mean_shifted is None else log_total - mean_shifted
            if target_outside:
                return carry, (peak, log_total, entropy)
            return carry, (target - log_total, peak + log_total, entropy)

        def run(logits, tokens, temperature):
            out = _scan_row_blocks(lambda c, x, y: stats(c, x, y, temperature), None, (logits, tokens), block)[1]
            if not target_outside:
                return out
            peak, log_total, entropy = out
            target = _checks.as_float(_column(logits, tokens)) / temperature - peak  # shifted[y]
            return target - log_total, peak + log_total, entropy

        return run

    cpu_block = _cpu_block_rows(logits.shape[-1], chunk_size)
    return by_platform(logits, tokens, temperature, cpu=in_blocks(cpu_block, target_outside=True),
                                  default=in_blocks(chunk_size))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused_logits(logits, tokens, temperature, block, with_entropy):
    logp, _, entropy = _logits_stats(logits, tokens, temperature, block, with_entropy)
    return logp, entropy


def _fused_logits_fwd(logits, tokens, temperature, block, with_entropy):
    logp, lse, entropy = _logits_stats(logits, tokens, temperature, block, with_entropy)
    # Kept for the backward pass: the inputs (which the caller holds anyway) and <= 2 floats a row.
    return (logp, entropy), (logits, tokens, temperature, lse, entropy)


def _fused_logits_bwd(block, with_entropy, saved, cotangents):
    del block  # the cotangent is one elementwise pass into its [R, V] output: no temporaries to bound
    logits, tokens, temperature, lse, entropy = saved
    g_logp, g_entropy = cotangents
    z = _checks.as_float(logits) / temperature
    # Blocks would only add a copy: a scan writes each block out and then into the stacked result.
    dz = _logit_cotangent(z, tokens, lse, g_logp, *((entropy, g_entropy) if with_entropy else ()),
                          scale=1.0 / temperature, dtype=logits.dtype)
    return dz, None, None


_fused_logits.defvjp(_fused_logits_fwd, _fused_logits_bwd)


# --- from hidden states: the unembedding inside the kernel -----------------------------------

def _vocab_blocks(vocab: int, block: int | None):
    """`(block, count)`: `count` blocks of `block` columns cover [0, vocab). Block i starts at
    min(i * block, vocab - block): the last one may overlap its predecessor, and its columns
    below i * block are masked, so every slice has one static shape."""
    block = vocab if block is None else min(block, vocab)
    return block, -(-vocab // block)


def _block_logits(h, unembedding, start, width, softcap, temperature):
    """`(z, tanh or None)`: z = softcap(h @ W[:, start:start + width]) / temperature in float32."""
    w = lax.dynamic_slice_in_dim(unembedding, start, width, axis=1)
    raw = jnp.einsum("rd,dv->rv", h.astype(unembedding.dtype), w, preferred_element_type=jnp.float32)
    if softcap is None:
        return raw / temperature, None
    capped = jnp.tanh(raw / softcap)
    return softcap * capped / temperature, capped


def _block_start(i, block, vocab):
    return jnp.minimum(i * block, vocab - block)


def _column_mask(i, start, block):
    """Columns of block i already covered by block i - 1 (the overlapping last block)."""
    return (start + jnp.arange(block)) >= i * block


def _linear_stats(hidden, unembedding, tokens, temperature, softcap, block, vocab_block):
    """Per row: (log p(y), lse, H), with an online log-sum-exp over the vocabulary blocks."""
    vocab = unembedding.shape[1]
    width, count = _vocab_blocks(vocab, vocab_block)

    def block_stats(h, y, i):
        start = _block_start(i, width, vocab)
        z, _ = _block_logits(h, unembedding, start, width, softcap, temperature)
        if count > 1:
            # A large finite value, not -inf: e^(-1e30 - max) is 0, and 0 * -1e30 is not a NaN.
            z = jnp.where(_column_mask(i, start, width), z, -1e30)
        holds = (y >= i * width) & (y < start + width)
        target, peak, log_total, mean_shifted = _row_stats(z, y - start, True)
        return jnp.where(holds, target + peak, 0.0), peak, jnp.exp(log_total), mean_shifted

    def rows(carry, h, y):
        z_y, peak, total, mean_shifted = block_stats(h, y, 0)

        def merge(i, acc):
            # Two partial sums over disjoint columns, each relative to its own max, rescaled to
            # the larger max: total = sum e^(z - m), mean_shifted = sum p (z - m).
            z_y, peak, total, mean_shifted = acc
            b_z_y, b_peak, b_total, b_mean = block_stats(h, y, i)
            new_peak = jnp.maximum(peak, b_peak)
            a, b = total * jnp.exp(peak - new_peak), b_total * jnp.exp(b_peak - new_peak)
            mean = (a * (mean_shifted + peak - new_peak) + b * (b_mean + b_peak - new_peak)) / (a + b)
            return z_y + b_z_y, new_peak, a + b, mean

        z_y, peak, total, mean_shifted = _vocab_loop(1, count, merge, (z_y, peak, total, mean_shifted))
        log_total = jnp.log(total)
        return carry, (z_y - peak - log_total, peak + log_total, log_total - mean_shifted)

    return _scan_row_blocks(rows, None, (hidden, tokens), block)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_linear(hidden, unembedding, tokens, temperature, softcap, block, vocab_block):
    logp, _, entropy = _linear_stats(hidden, unembedding, tokens, temperature, softcap, block, vocab_block)
    return logp, entropy


def _fused_linear_fwd(hidden, unembedding, tokens, temperature, softcap, block, vocab_block):
    logp, lse, entropy = _linear_stats(hidden, unembedding, tokens, temperature, softcap, block, vocab_block)
    return (logp, entropy), (hidden, unembedding, tokens, temperature, lse, entropy)


def _fused_linear_bwd(softcap, block, vocab_block, saved, cotangents):
    hidden, unembedding, tokens, temperature, lse, entropy = saved
    g_logp, g_entropy = cotangents
    vocab = unembedding.shape[1]
    width, count = _vocab_blocks(vocab, vocab_block)

    def rows(d_unembedding, h, y, lse, entropy, g_logp, g_entropy):
        def vocab_step(i, acc):
            d_h, d_unembedding = acc
            start = _block_start(i, width, vocab)
            z, capped = _block_logits(h, unembedding, start, width, softcap, temperature)
            # d raw / dz: 1 / temperature, times the soft-cap's derivative; 0 on the columns the
            # previous (overlapped) block already covered.
            scale = 1.0 / temperature if softcap is None else (1.0 - capped * capped) / temperature
            if count > 1:
                scale = jnp.where(_column_mask(i, start, width), scale, 0.0)
            w = lax.dynamic_slice_in_dim(unembedding, start, width, axis=1)
            d_raw = _logit_cotangent(z, jnp.where(y >= i * width, y - start, -1), lse, g_logp, entropy, g_entropy,
                                     scale=scale, dtype=w.dtype)
            d_h = d_h + jnp.einsum("rv,dv->rd", d_raw, w, preferred_element_type=jnp.float32)
            d_w = jnp.einsum("rd,rv->dv", h.astype(w.dtype), d_raw, preferred_element_type=jnp.float32)
            previous = lax.dynamic_slice_in_dim(d_unembedding, start, width, axis=1)
            return d_h, lax.dynamic_update_slice_in_dim(d_unembedding, previous + d_w, start, axis=1)

        acc = (jnp.zeros(h.shape, jnp.float32), d_unembedding)
        d_h, d_unembedding = _vocab_loop(0, count, vocab_step, acc)
        return d_unembedding, d_h.astype(h.dtype)

    d_unembedding = jnp.zeros(unembedding.shape, jnp.float32)
    d_unembedding, d_hidden = _scan_row_blocks(rows, d_unembedding, (hidden, tokens, lse, entropy, g_logp, g_entropy), block)
    return d_hidden, d_unembedding.astype(unembedding.dtype), None, None


_fused_linear.defvjp(_fused_linear_fwd, _fused_linear_bwd)


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
      chunk_size: at most this many rows of `[N*T]` at a time (None: all at once). Without a
        filter the kernel keeps no `[N, T, V]` temporary either way (on CPU it already works in
        cache-sized row blocks, which this can only lower); with top-k / top-p it bounds the
        filter's temporaries.
      top_k, top_p: the sampler's filter (0 and 1.0: none), so that the log-probabilities are
        those of the distribution the tokens were drawn from.

    Returns:
      `[N, T]` float32 log-probabilities.
    """
    _check_logits(logits, temperature, chunk_size)
    _check_tokens(tokens, jnp.shape(logits)[:2], like="logits[..., 0]")
    _check_filter(top_k, top_p)
    if _is_filtered(top_k, top_p):
        rows = _rows_from_logits(top_k, top_p, temperature, with_entropy=False)
        logprobs, _ = _map_chunks(rows, (_flat(logits), _flat(tokens)), chunk_size)
    else:
        logprobs, _ = _fused_logits(_flat(logits), _flat(tokens), temperature, chunk_size, False)
    return jnp.reshape(logprobs, jnp.shape(tokens))


def token_entropy(logits, *, temperature: float = 1.0, chunk_size: int | None = None, top_k: int = 0,
                  top_p: float = 1.0):
    """Entropy of softmax(filter(logits / temperature)) at every position, in nats, with its gradient.

    H_t = -sum_{v kept} p_v log p_v, float32 (kept: see `token_logprobs`; here without a
    sampled token, so exactly the top-k / top-p set).

    Args:
      logits: `[N, T, V]` float logits.
      temperature: the sampling temperature (> 0).
      chunk_size: at most this many rows of `[N*T]` at a time (None: all at once). Without a
        filter the kernel keeps no `[N, T, V]` temporary either way (on CPU it already works in
        cache-sized row blocks, which this can only lower); with top-k / top-p it bounds the
        filter's temporaries.
      top_k, top_p: the sampler's filter (0 and 1.0: none).

    Returns:
      `[N, T]` float32 entropies.
    """
    _check_logits(logits, temperature, chunk_size)
    _check_filter(top_k, top_p)
    # The most likely token is always in the kept set, so using it as the "sampled" token
    # leaves the set exactly as top-k / top-p define it.
    top_token = jnp.argmax(lax.stop_gradient(logits), axis=-1)
    if _is_filtered(top_k, top_p):
        rows = _rows_from_logits(top_k, top_p, temperature)
        _, entropy = _map_chunks(rows, (_flat(logits), _flat(top_token)), chunk_size)
    else:
        _, entropy = _fused_logits(_flat(logits), _flat(top_token), temperature, chunk_size, True)
    return jnp.reshape(entropy, jnp.shape(logits)[:2])


def linear_token_logprobs(hidden, unembedding, tokens, *, temperature: float = 1.0, chunk_size: int | None = None,
                          vocab_chunk_size: int | None = None, softcap: float | None = None, top_k: int = 0,
                          top_p: float = 1.0):
    """Log-probabilities and entropies straight from hidden states, never holding `[N, T, V]`.

    z = softcap(h @ W) / temperature (softcap(x) = c * tanh(x / c) when given), then
    log pi(y_t) = z[y_t] - logsumexp(z) and H_t = -sum_v p_v log p_v over the kept set (all
    tokens, or the top-k / top-p set as in `token_logprobs`), in float32, both with their
    gradients (an entropy bonus in the loss reaches the parameters). With `chunk_size`, the
    logits exist only `chunk_size` rows at a time, in the forward and the backward pass, and with
    `vocab_chunk_size` only `[chunk_size, vocab_chunk_size]` of them (an online log-sum-exp over
    the vocabulary blocks): this is what lets a 262k-vocabulary model train on long completions.
    Without a filter this is the fused kernel of this module (the module docstring): the backward
    pass recomputes each block's logits from `hidden` and `unembedding` rather than storing them,
    one more `[rows, D] x [D, V]` matmul for no `[N, T, V]` array.

    Args:
      hidden: `[N, T, D]` final hidden states at the positions that predict `tokens`.
      unembedding: `[D, V]` output projection (the tied embedding transposed, or the LM head).
      tokens: `[N, T]` integer token ids.
      temperature: the sampling temperature (> 0).
      chunk_size: rows of `[N*T]` per chunk; None computes all at once.
      vocab_chunk_size: vocabulary entries per block (None: the whole vocabulary at once); used
        without a top-k / top-p filter (the filter needs each row's whole distribution).
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
    if vocab_chunk_size is not None:
        _checks.check_positive_int("vocab_chunk_size", vocab_chunk_size)
    _check_filter(top_k, top_p)
    if not _is_filtered(top_k, top_p):
        logprobs, entropy = _fused_linear(_flat(hidden), unembedding, _flat(tokens), temperature, softcap, chunk_size,
                                          vocab_chunk_size)
        return jnp.reshape(logprobs, jnp.shape(tokens)), jnp.reshape(entropy, jnp.shape(tokens))
    rows_from_logits = _rows_from_logits(top_k, top_p, temperature)

    def rows(h, y):
        z = jnp.einsum("rd,dv->rv", h.astype(unembedding.dtype), unembedding, preferred_element_type=jnp.float32)
        if softcap is not None:
            z = softcap * jnp.tanh(z / softcap)
        return rows_from_logits(z, y)

    logprobs, entropy = _map_chunks(rows, (_flat(hidden), _flat(tokens)), chunk_size)
    return jnp.reshape(logprobs, jnp.shape(tokens)), jnp.reshape(entropy, jnp.shape(tokens))
