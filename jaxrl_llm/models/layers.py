"""Building blocks shared by every model family: linear layers, embeddings,
norms, rotary position embeddings, activations, masked attention and the KV cache.

Conventions (all modules):
  * ``B`` batch, ``S`` new tokens in this call, ``L`` cache length, ``D`` model
    width, ``H`` query heads, ``K`` key/value heads, ``Dh`` head width.
  * Parameters live in ``dtype`` (float32 or bfloat16) and activations are
    computed in that dtype, with the same float32 islands transformers uses
    (norm statistics, RoPE angles, attention softmax), so bfloat16 parity with
    transformers' PyTorch models is as close as the two libraries allow.
  * Attribute names mirror the Hugging Face module names, so the flat NNX state
    path of a parameter *is* its transformers state-dict key (see ``hf_io``).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Large negative instead of -inf: a fully masked row (a left-pad query) stays finite.
_MASK_VALUE = -1e30
_INIT_STD = 0.02


# ----------------------------------------------------------------------------- params


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; ``kernel`` is [in, out] (transformers' ``weight`` transposed)."""

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            (_INIT_STD * jax.random.normal(rngs.params(), (in_features, out_features))).astype(dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def fused_linear(x: jax.Array, *linears: Linear) -> list[jax.Array]:
    """``[lin(x) for lin in linears]`` as ONE matmul against the concatenated kernels.

    One wide matmul keeps more cores busy than several narrow ones (XLA:CPU runs a
    [64, 128] x [128, 512] product on one thread, a [64, 128] x [128, 1024] one on two), and
    inside a decode loop XLA hoists the loop-invariant weight concatenation out of the loop.
    """
    kernels = [lin.kernel[...] for lin in linears]
    y = x @ jnp.concatenate(kernels, axis=1)
    if any(lin.bias is not None for lin in linears):
        y = y + jnp.concatenate(
            [lin.bias[...] if lin.bias is not None else jnp.zeros(k.shape[1], k.dtype) for lin, k in zip(linears, kernels)]
        )
    return jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1].tolist(), axis=-1)


class Embedding(nnx.Module):
    """Token embedding table ``weight`` [V, D] (same layout as transformers)."""

    def __init__(self, num_embeddings: int, features: int, *, dtype, rngs: nnx.Rngs):
        self.weight = nnx.Param(
            (_INIT_STD * jax.random.normal(rngs.params(), (num_embeddings, features))).astype(dtype)
        )

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], input_ids, axis=0)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis.

    ``plus_one=False`` (Llama, Qwen): ``w * (x / rms(x)).astype(dtype)``, ``w`` initialised to 1.
    ``plus_one=True`` (Gemma): ``((x / rms(x)) * (1 + w)).astype(dtype)`` in float32, ``w`` initialised to 0.
    The statistics are always float32, as in transformers.
    """

    def __init__(self, features: int, *, eps: float, plus_one: bool = False, dtype):
        self.eps = eps
        self.plus_one = plus_one
        self.weight = nnx.Param(jnp.zeros((features,), dtype) if plus_one else jnp.ones((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.plus_one:
            return (normed * (1.0 + self.weight[...].astype(jnp.float32))).astype(x.dtype)
        return self.weight[...] * normed.astype(x.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale ``weight`` and ``bias`` (GPT-NeoX), statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


# ----------------------------------------------------------------------------- activations


def activation(name: str):
    """The transformers ``ACT2FN`` activation called ``name`` (the subset these families use)."""
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_python_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(
        f"hidden_act: got {name!r}, expected one of 'silu', 'gelu', 'gelu_pytorch_tanh', 'gelu_new', 'relu'"
    )


# ----------------------------------------------------------------------------- RoPE


class RopeSpec(NamedTuple):
    """Static RoPE description: inverse frequencies (python floats, hashable), cos/sin scale, rotated width."""

    inv_freq: tuple[float, ...]
    attention_scaling: float
    rotary_dim: int


def rope_spec(params: dict, *, head_dim: int, max_position_embeddings: int) -> RopeSpec:
    """Inverse frequencies for one ``rope_parameters`` dict, as transformers' ``modeling_rope_utils``.

    Supports ``rope_type`` default, linear, llama3 and yarn; ``partial_rotary_factor`` rotates only
    the first ``int(head_dim * factor)`` channels (GPT-NeoX ``rotary_pct``).
    """
    rope_type = params.get("rope_type", params.get("type", "default"))
    base = float(params["rope_theta"])
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    exponents = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    scaling = 1.0
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv_freq = (inv_freq / np.float32(params["factor"])).astype(np.float32)
    elif rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope_type == "yarn":
        orig = params["original_max_position_embeddings"]
        factor = params.get("factor") or max_position_embeddings / orig

        def mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        scaling = params.get("attention_factor")
        if scaling is None:
            m, m_all = params.get("mscale"), params.get("mscale_all_dim")
            scaling = float(mscale(factor, m) / mscale(factor, m_all)) if (m and m_all) else mscale(factor)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def correction_dim(rotations):
            return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        pos_freqs = np.float32(base) ** exponents
        inv_freq = ((1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation).astype(
            np.float32
        )
    else:
        raise ValueError(
            f"rope_parameters['rope_type']: got {rope_type!r}, expected one of 'default', 'linear', 'llama3', 'yarn'"
        )
    return RopeSpec(tuple(float(f) for f in inv_freq), float(scaling), dim)


# Largest [positions x rotary_dim] table of cos/sin kept as a compile-time constant.
_ROPE_TABLE_MAX_ELEMENTS = 1 << 20


@functools.lru_cache(maxsize=32)
def _rope_table(spec: RopeSpec, length: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 cos/sin [length, rotary_dim] (scaled) for positions 0..length-1, computed once on the host."""
    inv_freq = np.asarray(spec.inv_freq, np.float32)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq
    emb = np.concatenate([freqs, freqs], axis=-1)
    scale = np.float32(spec.attention_scaling)
    return (np.cos(emb) * scale).astype(np.float32), (np.sin(emb) * scale).astype(np.float32)


def rope_cos_sin(positions: jax.Array, spec: RopeSpec, dtype, *, max_position: int | None = None):
    """cos and sin [B, S, 1, rotary_dim] of the RoPE angles ``positions * inv_freq``, in ``dtype``.

    The angles are float32 and cos/sin are cast to ``dtype`` before the product, as transformers
    does. When every position is known to be < ``max_position`` (a static bound), cos/sin are
    gathered from a table computed on the host: XLA:CPU otherwise fuses sin/cos into each consumer
    and evaluates them again for every head, which costs more than the rotation itself.
    """
    rot = spec.rotary_dim
    if max_position is not None and max_position * rot <= _ROPE_TABLE_MAX_ELEMENTS:
        cos_table, sin_table = _rope_table(spec, max_position)
        cos = jnp.take(cos_table, positions, axis=0, mode="clip")
        sin = jnp.take(sin_table, positions, axis=0, mode="clip")
    else:
        inv_freq = jnp.asarray(spec.inv_freq, jnp.float32)
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, rot/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        cos = jnp.cos(emb) * spec.attention_scaling
        sin = jnp.sin(emb) * spec.attention_scaling
    return cos.astype(dtype)[:, :, None, :], sin.astype(dtype)[:, :, None, :]


def apply_rope(x: jax.Array, positions: jax.Array, spec: RopeSpec, *, max_position: int | None = None) -> jax.Array:
    """Rotate the first ``spec.rotary_dim`` channels of x [B, S, heads, Dh] by ``positions`` [B, S].

    Half-split ("rotate_half") layout, the one every Hugging Face checkpoint of these families uses.
    ``max_position``: a static bound on the positions, if known (see ``rope_cos_sin``).
    """
    cos, sin = rope_cos_sin(positions, spec, x.dtype, max_position=max_position)
    rot, passthrough = x[..., : spec.rotary_dim], x[..., spec.rotary_dim :]
    half = spec.rotary_dim // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    return jnp.concatenate([out, passthrough], axis=-1) if passthrough.shape[-1] else out


# ----------------------------------------------------------------------------- KV cache


class KVCache(NamedTuple):
    """Preallocated key/value cache, a pytree that jitted prefill/decode steps carry.

    Attributes:
      k, v: one array per layer, each [B, K, L, Dh]: head-major, so attention reads each head's
        keys as one contiguous [L, Dh] block instead of transposing the whole cache every step.
      valid: [B, L] bool, True for slots holding a real (non-pad) token; unwritten
        slots and left-padding slots are False and never attended.
      index: int32 scalar, the next slot to write (a traced value, so one compiled
        decode step serves every position).

    Slot j of every row holds token j of the (left-padded) sequence, so sliding-window layers
    apply their window on slots exactly as transformers applies it on indices. The cache is
    full length for every layer (no ring buffer for sliding layers yet). Writing past
    ``max_length`` cannot be checked under jit (``dynamic_update_slice`` clamps): size the
    cache for prompt + completion.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


def empty_cache(*, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An all-empty ``KVCache`` (see ``models.init_cache``)."""
    if batch_size < 1 or max_length < 1:
        raise ValueError(
            f"batch_size/max_length: got {batch_size}/{max_length}, expected positive integers"
        )
    shape = (batch_size, num_kv_heads, max_length, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        valid=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
    )


class Context(NamedTuple):
    """Per-call attention bookkeeping shared by every layer of one forward pass.

    q_slot: [S] int, the key-axis slot of each new token.
    kv_valid: [B, Lk] bool, which key slots hold real tokens.
    positions: [B, S] int, RoPE positions of the new tokens.
    cache_index: int32 scalar write offset, or None without a cache.
    attend_cache: True when attention reads keys/values from the cache (slots 0..Lk-1); False
      when it reads only the new tokens' (no cache, or a fresh cache that holds nothing else).
    max_position: static bound on ``positions`` when they are the default ones (None when given).
    """

    q_slot: jax.Array
    kv_valid: jax.Array
    positions: jax.Array
    cache_index: jax.Array | None
    attend_cache: bool = False
    max_position: int | None = None


def make_context(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    positions: jax.Array | None,
    cache: KVCache | None,
    *,
    fresh_cache: bool = False,
) -> tuple[Context, KVCache | None]:
    """Validate inputs and build the ``Context``; with a cache, also write the new validity slots.

    Default positions are ``cumsum(mask) - 1`` clipped at 0 over every token seen so far, which is
    what transformers' ``generate`` uses for left-padded prompts. ``fresh_cache=True`` promises the
    cache is empty (index 0, as from ``empty_cache``): the new tokens are written to it but attend
    only to each other, so a prompt prefill does not read the cache's empty slots.
    """
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"input_ids: got shape {input_ids.shape} dtype {input_ids.dtype}, expected [B, S] integers")
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), bool)
    elif attention_mask.shape != (batch, seq):
        raise ValueError(f"attention_mask: got shape {attention_mask.shape}, expected {(batch, seq)} like input_ids")
    mask = attention_mask.astype(bool)
    if positions is not None and positions.shape != (batch, seq):
        raise ValueError(f"positions: got shape {positions.shape}, expected {(batch, seq)} like input_ids")
    if cache is not None:
        if cache.valid.shape[0] != batch:
            raise ValueError(f"cache: built for batch {cache.valid.shape[0]}, got input_ids batch {batch}")
        if seq > cache.max_length:
            raise ValueError(f"input_ids: {seq} tokens do not fit a cache of max_length {cache.max_length}")
    # Default positions count real tokens, so they stay below the number of slots: a static bound.
    bound = None if positions is not None else (seq if cache is None or fresh_cache else cache.max_length)
    valid = None if cache is None else jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    if cache is None or fresh_cache:  # the new tokens attend only to each other
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        index = None if cache is None else cache.index
        ctx = Context(jnp.arange(seq), mask, positions.astype(jnp.int32), index, False, bound)
    else:
        if positions is None:
            all_positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            positions = jax.lax.dynamic_slice(all_positions, (0, cache.index), (batch, seq))
        ctx = Context(cache.index + jnp.arange(seq), valid, positions.astype(jnp.int32), cache.index, True, bound)
    return ctx, (None if cache is None else cache._replace(valid=valid, index=cache.index + seq))


def heads_major(x: jax.Array) -> jax.Array:
    """[B, S, K, Dh] -> [B, K, S, Dh], the layout of the KV cache and of attention's keys/values."""
    return jnp.swapaxes(x, 1, 2)


def update_layer_cache(
    k_cache: jax.Array, v_cache: jax.Array, k: jax.Array, v: jax.Array, index: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Write k, v [B, K, S, Dh] into a layer's [B, K, L, Dh] cache at slot ``index``."""
    start = (0, 0, index, 0)
    k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
    v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
    return k_cache, v_cache


# ----------------------------------------------------------------------------- attention


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: Context,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """Causal, padding-masked grouped-query attention.

    Query i (slot ``ctx.q_slot[i]``) sees key slot j iff ``j <= q_slot[i]``, ``ctx.kv_valid[b, j]``,
    and, for a sliding-window layer, ``j > q_slot[i] - sliding_window`` (transformers' index-based window).

    Args:
      q: [B, S, H, Dh]; k, v: [B, K, Lk, Dh] (heads-major, as the KV cache) with H a multiple of K.
    Returns:
      [B, S, H, Dh] in q's dtype. Scores are computed in q's dtype, the softmax in float32.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    qg = q.reshape(batch, seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,bktd->bkgst", qg, k) * jnp.asarray(scale, q.dtype)
    scores = scores.astype(jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    kv_slot = jnp.arange(k.shape[2])
    allowed = kv_slot[None, :] <= ctx.q_slot[:, None]  # [S, Lk]
    if sliding_window is not None:
        allowed = allowed & (kv_slot[None, :] > ctx.q_slot[:, None] - sliding_window)
    allowed = allowed[None, :, :] & ctx.kv_valid[:, None, :]  # [B, S, Lk]
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bskgd", probs, v)
    return out.reshape(batch, seq, heads, head_dim)


class Attention(nnx.Module):
    """Multi-head attention with separate q/k/v/o projections (Llama, Mistral, Qwen2/3, Gemma 3).

    Optional q/k/v and output biases, optional per-head q/k RMSNorm (Qwen3, Gemma 3), RoPE,
    sliding window, logit soft-capping, and a KV cache.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool,
        o_bias: bool,
        qk_norm: bool,
        norm_eps: float,
        norm_plus_one: bool,
        scale: float,
        rope: RopeSpec,
        sliding_window: int | None,
        softcap: float | None,
        dtype,
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(
                f"num_key_value_heads: got {num_kv_heads}, expected a divisor of num_attention_heads={num_heads}"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.rope, self.sliding_window, self.softcap = scale, rope, sliding_window, softcap
        self.q_proj = Linear(hidden_size, num_heads * head_dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(hidden_size, num_kv_heads * head_dim, use_bias=qkv_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(num_heads * head_dim, hidden_size, use_bias=o_bias, dtype=dtype, rngs=rngs)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps=norm_eps, plus_one=norm_plus_one, dtype=dtype)
            self.k_norm = RMSNorm(head_dim, eps=norm_eps, plus_one=norm_plus_one, dtype=dtype)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x: jax.Array, ctx: Context, kv: tuple[jax.Array, jax.Array] | None, *, last_only: bool = False):
        """x [B, S, D] -> ([B, S', D], updated (k_cache, v_cache) or None).

        S' = S, or 1 with ``last_only``: every position's keys and values are computed (and cached)
        but only the last position queries (``rotary_attention``).
        """
        batch, seq, _ = x.shape
        q, k, v = fused_linear(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.reshape(batch, seq, self.num_heads, self.head_dim)
        k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out, kv = rotary_attention(
            q, k, v, ctx, kv, rope=self.rope, last_only=last_only,
            scale=self.scale, sliding_window=self.sliding_window, softcap=self.softcap,
        )
        return self.o_proj(out.reshape(batch, out.shape[1], self.num_heads * self.head_dim)), kv


def rotary_attention(q, k, v, ctx: Context, kv, *, rope: RopeSpec, last_only: bool = False, **attention_options):
    """RoPE on q [B, S, H, Dh] and k, v [B, S, K, Dh], write k/v to the layer's cache, attend.

    With ``last_only`` only the last position queries (every position's keys and values are still
    computed and cached). Returns (out [B, S or 1, H, Dh], updated (k_cache, v_cache) or None).
    """
    q_ctx = ctx
    if last_only:
        q, q_ctx = q[:, -1:], ctx._replace(q_slot=ctx.q_slot[-1:], positions=ctx.positions[:, -1:])
    q = apply_rope(q, q_ctx.positions, rope, max_position=ctx.max_position)
    k = heads_major(apply_rope(k, ctx.positions, rope, max_position=ctx.max_position))
    v = heads_major(v)
    if kv is not None:
        kv = update_layer_cache(*kv, k, v, ctx.cache_index)
        if ctx.attend_cache:
            k, v = kv
    return dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), q_ctx, **attention_options), kv


def run_layers(decoder_layers, x: jax.Array, ctx: Context, kv, *, last_only: bool = False):
    """Apply decoder layers in order; ``kv`` is None or one (k, v) cache pair per layer.

    With ``last_only``, the final layer computes its output for the last position only (every
    layer still writes every position's keys and values): a prefill needs nothing else.
    Returns (x [B, S or 1, D], new kv list or None).
    """
    new_kv = []
    last = len(decoder_layers) - 1
    for i, layer in enumerate(decoder_layers):
        x, layer_kv = layer(x, ctx, None if kv is None else kv[i], last_only=last_only and i == last)
        new_kv.append(layer_kv)
    return x, (None if kv is None else new_kv)


class GatedMLP(nnx.Module):
    """``down(act(gate(x)) * up(x))`` (SwiGLU for Llama/Qwen, GeGLU for Gemma)."""

    def __init__(self, hidden_size: int, intermediate_size: int, *, act: str, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.act = act
        activation(act)  # validate early
        self.gate_proj = Linear(hidden_size, intermediate_size, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden_size, intermediate_size, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(intermediate_size, hidden_size, use_bias=use_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate, up = fused_linear(x, self.gate_proj, self.up_proj)
        return self.down_proj(activation(self.act)(gate) * up)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)``, or x unchanged when cap is None."""
    return x if cap is None else jnp.tanh(x / cap) * cap
