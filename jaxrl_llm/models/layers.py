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

from jaxrl_llm.errors import UserError
from jaxrl_llm.models.slot_cache import SlotLayerKV, slot_attention
from jaxrl_llm.lowering import by_platform

# Large negative instead of -inf: a fully masked row (a left-pad query) stays finite.
_MASK_VALUE = -1e30
_INIT_STD = 0.02


# ----------------------------------------------------------------------------- params


class Linear(nnx.Module):
    """``y = x @ kernel + bias``; ``kernel`` is [in, out] (transformers' ``weight`` transposed).

    With a LoRA adapter (``models.lora.add_lora`` sets ``lora``, an ``nnx.LoRA``, and its
    scale and dropout on the instance) ``y += lora_scale * lora(dropout(x))``. The class-level
    defaults below keep the graph of a model without adapters exactly as it was.
    """

    lora: nnx.LoRA | None = None
    lora_scale: float = 1.0  # alpha / rank
    lora_dropout: float = 0.0  # rate on the adapter's input, applied only when a key is set
    lora_dropout_key: nnx.Variable | None = None  # set inside a training forward (lora.set_dropout_key)

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = nnx.Param(
            (_INIT_STD * jax.random.normal(rngs.params(), (in_features, out_features))).astype(dtype)
        )
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y + self.adapter(x, y.dtype) if self.lora is not None else y

    def adapter(self, x: jax.Array, dtype) -> jax.Array:
        """The LoRA term ``lora_scale * lora(dropout(x))`` in ``dtype`` (PEFT's ``lora_B(lora_A(dropout(x))) * scaling``)."""
        if self.lora_dropout and self.lora_dropout_key is not None:
            keep = jax.random.bernoulli(self.lora_dropout_key[...], 1.0 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - self.lora_dropout), 0).astype(x.dtype)
        return (self.lora(x) * self.lora_scale).astype(dtype)


def fused_linear(x: jax.Array, *linears: Linear) -> list[jax.Array]:
    """``[lin(x) for lin in linears]`` (q/k/v, gate/up), as ONE matmul against the concatenated
    kernels where that pays, chosen by the platform the program is lowered for.

    XLA:CPU, and any platform for a few rows (a decode step): one wide matmul keeps more cores
    busy than several narrow ones (XLA:CPU runs a [64, 128] x [128, 512] product on one thread, a
    [64, 128] x [128, 1024] one on two), and in a decode loop XLA hoists the kernels'
    concatenation out of the loop. An accelerator with many rows (training, prefill) runs one
    matmul per projection: the fused product's gradient concatenates the projections'
    cotangents, a full extra pass over the [rows, q + k + v] and [rows, 2 x intermediate]
    activations (6% of an RLOO update of a 0.5B model on an H200, benchmarks/results/gpu_suite.md).
    """
    kernels = tuple(lin.kernel[...] for lin in linears)
    biases = tuple(lin.bias[...] if lin.bias is not None else jnp.zeros(k.shape[1], k.dtype)
                   for lin, k in zip(linears, kernels))
    with_bias = any(lin.bias is not None for lin in linears)

    def fused(x, kernels, biases):
        y = x @ jnp.concatenate(kernels, axis=1)
        if with_bias:
            y = y + jnp.concatenate(biases)
        return tuple(jnp.split(y, np.cumsum([k.shape[1] for k in kernels])[:-1].tolist(), axis=-1))

    def separate(x, kernels, biases):
        return tuple(x @ k + b if with_bias else x @ k for k, b in zip(kernels, biases))

    rows = math.prod(x.shape[:-1])
    if rows < _UNFUSED_MIN_ROWS:
        outs = fused(x, kernels, biases)
    else:
        outs = by_platform(x, kernels, biases, cpu=fused, default=separate)
    return [out + lin.adapter(x, out.dtype) if lin.lora is not None else out for out, lin in zip(outs, linears)]


# Rows from which an accelerator runs one matmul per projection (below it: decode steps, fused).
_UNFUSED_MIN_ROWS = 1024


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
    raise UserError(
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
        raise UserError(
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
      positions: [B, L] int32, the RoPE position of the token in each slot (0 where none).

    A row's real tokens need not be contiguous: multi-turn episodes leave empty slots between
    turns (rows at their own lengths share one write index). Sliding-window layers therefore
    measure their window in these positions, not in slots: a key is in the window of a query
    iff ``position(key) > position(query) - window``, which for a contiguous row is transformers'
    index-based window. The cache is full length for every layer (no ring buffer for sliding
    layers yet). Writing past ``max_length`` cannot be checked under jit
    (``dynamic_update_slice`` clamps): size the cache for prompt + completion.
    """

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    positions: jax.Array

    @property
    def max_length(self) -> int:
        return self.valid.shape[1]


def empty_cache(*, num_layers: int, batch_size: int, max_length: int, num_kv_heads: int, head_dim: int, dtype) -> KVCache:
    """An all-empty ``KVCache`` (see ``models.init_cache``)."""
    if batch_size < 1 or max_length < 1:
        raise UserError(
            f"batch_size/max_length: got {batch_size}/{max_length}, expected positive integers"
        )
    shape = (batch_size, num_kv_heads, max_length, head_dim)
    zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
    return KVCache(
        k=zeros,
        v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
        valid=jnp.zeros((batch_size, max_length), bool),
        index=jnp.zeros((), jnp.int32),
        positions=jnp.zeros((batch_size, max_length), jnp.int32),
    )


# ----------------------------------------------------------------------------- execution options

ATTENTION_IMPLEMENTATIONS = ("auto", "dense", "blockwise", "cudnn")
# The jax.checkpoint_policies attributes that are policies themselves (the others build one from names).
REMAT_POLICIES = (
    "everything_saveable",
    "nothing_saveable",
    "dots_saveable",
    "checkpoint_dots",
    "dots_with_no_batch_dims_saveable",
    "checkpoint_dots_with_no_batch_dims",
)
REMAT_CHOICES = ("auto", "none", "layer", *REMAT_POLICIES)
# "auto" on an accelerator: keep the matmul outputs, recompute the elementwise ops between them
# (H200, RLOO update of a 0.5B model: 472 ms and 40.5 GiB of temporaries, against 497 ms and 63.3 GiB
# keeping everything and 544 ms / 7.1 GiB recomputing whole layers; benchmarks/results/gpu_suite.md).
ACCELERATOR_REMAT = "dots_with_no_batch_dims_saveable"
# "auto" keeps dense attention while one head's float32 scores [S, Lk] hold at most 256 x 256
# entries (256 KiB): tests, short prompts and decode steps stay on the reference path.
_DENSE_MAX_SCORES = 256 * 256


class Execution(NamedTuple):
    """How the decoder runs, not what it computes: memory and compile-time options (static, in the graphdef).

    Every choice gives the same logits and gradients up to float rounding; they trade memory,
    compute and compile time, which matter only at real model sizes.

    remat: "auto" (chosen by the platform the program is lowered for: "none" on CPU, where XLA
      undoes a remat in an unrolled loop anyway, and ``ACCELERATOR_REMAT`` on GPU/TPU); "none";
      "layer" (``jax.checkpoint`` around each decoder layer: the backward pass recomputes a layer
      from its input instead of keeping its activations); or the name of a
      ``jax.checkpoint_policies`` policy (e.g. "dots_with_no_batch_dims_saveable") to keep what it
      allows. Calls with a KV cache never remat (they are not differentiated). Pair it with
      ``scan_layers``: in an unrolled loop XLA may schedule the recomputation early (XLA:CPU does,
      and saves little), inside the scan each step recomputes only its own layer.
    scan_layers: run the decoder layers under ``jax.lax.scan`` (calls without a KV cache, all
      positions), so the layer is traced and compiled once however deep the model. The weights
      stay stored per layer (their paths are the transformers keys) and are stacked at call time:
      one extra copy of the decoder weights while the call runs, and a few small stack/unstack
      ops per layer that still grow with depth.
    attention: "dense" (all scores at once: the reference, best for decode steps), "blockwise"
      (``attention_block`` query rows at a time, each block recomputed in the backward pass),
      "cudnn" (cuDNN flash attention: CUDA GPU, bfloat16/float16, no soft-cap) or "auto"
      (see ``attention_implementation``).
    attention_block: query rows per block of "blockwise" attention.
    """

    remat: str = "auto"
    scan_layers: bool = False
    attention: str = "auto"
    attention_block: int = 512

    def with_options(self, **options) -> Execution:
        """A copy with ``options`` replaced, every field validated (ValueError naming the option)."""
        unknown = sorted(set(options) - set(self._fields))
        if unknown:
            raise UserError(f"execution options: got unknown {unknown}, expected some of {list(self._fields)}")
        new = self._replace(**options)
        if not isinstance(new.remat, str) or new.remat not in REMAT_CHOICES:
            raise UserError(f"remat: got {new.remat!r}, expected one of {REMAT_CHOICES}")
        if not isinstance(new.scan_layers, bool):
            raise UserError(f"scan_layers: got {new.scan_layers!r}, expected True or False")
        if not isinstance(new.attention, str) or new.attention not in ATTENTION_IMPLEMENTATIONS:
            raise UserError(f"attention: got {new.attention!r}, expected one of {ATTENTION_IMPLEMENTATIONS}")
        if new.attention == "cudnn" and not on_cuda_gpu():
            raise UserError(
                f"attention: got 'cudnn', which needs a CUDA GPU; the default backend is {jax.default_backend()!r} "
                "(use 'auto', 'blockwise' or 'dense')"
            )
        block = new.attention_block
        if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block < 1:
            raise UserError(f"attention_block: got {block!r}, expected a positive integer")
        return new._replace(attention_block=int(block))


def on_cuda_gpu() -> bool:
    """True when JAX computes on an NVIDIA GPU (where cuDNN attention exists)."""
    if jax.default_backend() != "gpu":
        return False
    try:  # ROCm is also the "gpu" backend, without cuDNN
        from jax.extend import backend

        return "rocm" not in backend.get_backend().platform_version.lower()
    except Exception:  # noqa: BLE001 - an unknown client: assume CUDA, JAX raises if not
        return True


class Context(NamedTuple):
    """Per-call attention bookkeeping shared by every layer of one forward pass.

    q_slot: [S] int, the key-axis slot of each new token.
    kv_valid: [B, Lk] bool, which key slots hold real tokens.
    positions: [B, S] int, RoPE positions of the new tokens.
    cache_index: int32 scalar write offset, or None without a cache.
    attend_cache: True when attention reads keys/values from the cache (slots 0..Lk-1); False
      when it reads only the new tokens' (no cache, or a fresh cache that holds nothing else).
    max_position: static bound on ``positions`` when they are the default ones (None when given).
    execution: the backbone's ``Execution`` options (``run_layers`` sets it), read by attention.
    segment_ids: [B, Lk] int, packed sequences (no cache): a token sees only keys of its own
      segment; 0 marks padding. None: one sequence per row.
    kv_positions: [B, Lk] int, the position of the token in each key slot: sliding windows are
      measured in positions (see ``KVCache``). None: the slots themselves (contiguous rows).
    """

    q_slot: jax.Array
    kv_valid: jax.Array
    positions: jax.Array
    cache_index: jax.Array | None
    attend_cache: bool = False
    max_position: int | None = None
    execution: Execution = Execution()
    segment_ids: jax.Array | None = None
    kv_positions: jax.Array | None = None


def make_context(
    input_ids: jax.Array,
    attention_mask: jax.Array | None,
    positions: jax.Array | None,
    cache: KVCache | None,
    *,
    fresh_cache: bool = False,
    segment_ids: jax.Array | None = None,
) -> tuple[Context, KVCache | None]:
    """Validate inputs and build the ``Context``; with a cache, also write the new validity slots.

    Default positions are ``cumsum(mask) - 1`` clipped at 0 over every token seen so far, which is
    what transformers' ``generate`` uses for left-padded prompts. ``fresh_cache=True`` promises the
    cache is empty (index 0, as from ``empty_cache``): the new tokens are written to it but attend
    only to each other, so a prompt prefill does not read the cache's empty slots.

    ``segment_ids`` [B, S] (packed sequences, no cache): each row holds several sequences, each a
    contiguous run of one id > 0 (0: padding). A token attends only within its segment, and the
    default positions restart at 0 with each segment, so every sequence sees exactly what it would
    in a row of its own. The attention mask is then ``segment_ids > 0`` (``attention_mask`` must
    agree with it or be None).
    """
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise UserError(f"input_ids: got shape {input_ids.shape} dtype {input_ids.dtype}, expected [B, S] integers")
    batch, seq = input_ids.shape
    if attention_mask is None:
        attention_mask = jnp.ones((batch, seq), bool)
    elif attention_mask.shape != (batch, seq):
        raise UserError(f"attention_mask: got shape {attention_mask.shape}, expected {(batch, seq)} like input_ids")
    mask = attention_mask.astype(bool)
    if positions is not None and positions.shape != (batch, seq):
        raise UserError(f"positions: got shape {positions.shape}, expected {(batch, seq)} like input_ids")
    if segment_ids is not None:
        if cache is not None:
            raise UserError("segment_ids: packed sequences are for a forward pass without a KV cache, got a cache")
        if segment_ids.shape != (batch, seq) or not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise UserError(f"segment_ids: got shape {segment_ids.shape} dtype {segment_ids.dtype}, expected "
                            f"{(batch, seq)} integers like input_ids")
        mask = mask & (segment_ids > 0)
        bound = None if positions is not None else seq
        if positions is None:
            positions = segment_positions(segment_ids)
        positions = positions.astype(jnp.int32)
        return Context(jnp.arange(seq), mask, positions, None, False, bound, segment_ids=segment_ids.astype(jnp.int32),
                       kv_positions=positions), None
    if cache is not None:
        if cache.valid.shape[0] != batch:
            raise UserError(f"cache: built for batch {cache.valid.shape[0]}, got input_ids batch {batch}")
        if seq > cache.max_length:
            raise UserError(f"input_ids: {seq} tokens do not fit a cache of max_length {cache.max_length}")
    # Default positions count real tokens, so they stay below the number of slots: a static bound.
    bound = None if positions is not None else (seq if cache is None or fresh_cache else cache.max_length)
    valid = None if cache is None else jax.lax.dynamic_update_slice(cache.valid, mask, (0, cache.index))
    if cache is None or fresh_cache:  # the new tokens attend only to each other
        if positions is None:
            positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        positions = positions.astype(jnp.int32)
        index = None if cache is None else cache.index
        ctx = Context(jnp.arange(seq), mask, positions, index, False, bound, kv_positions=positions)
    else:
        if positions is None:
            all_positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
            positions = jax.lax.dynamic_slice(all_positions, (0, cache.index), (batch, seq))
        positions = positions.astype(jnp.int32)
    if cache is None:
        return ctx, None
    cached_positions = jax.lax.dynamic_update_slice(cache.positions, positions, (0, cache.index))
    if not fresh_cache:
        ctx = Context(cache.index + jnp.arange(seq), valid, positions, cache.index, True, bound,
                      kv_positions=cached_positions)
    return ctx, cache._replace(valid=valid, index=cache.index + seq, positions=cached_positions)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """[B, S] positions that restart at 0 where each segment (a run of one id) starts."""
    slots = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
    return slots - jax.lax.cummax(jnp.where(starts, slots, 0), axis=1)


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
    """Causal, padding-masked grouped-query attention, by the implementation ``ctx.execution`` picks.

    Query i (slot ``ctx.q_slot[i]``) sees key slot j iff ``j <= q_slot[i]``, ``ctx.kv_valid[b, j]``,
    and, for a sliding-window layer, ``pos[b, j] > pos[b, q_slot[i]] - sliding_window`` with
    ``pos = ctx.kv_positions``: the window is measured in positions, which for a row of contiguous
    tokens is transformers' index-based window, and stays right when a cache has empty slots.
    Every implementation computes this same function (``dense_attention`` is the reference); they
    differ in memory and speed (see ``attention_implementation``).

    Args:
      q: [B, S, H, Dh]; k, v: [B, K, Lk, Dh] (heads-major, as the KV cache) with H a multiple of K.
    Returns:
      [B, S, H, Dh] in q's dtype.
    """
    seq, kv_len = q.shape[1], k.shape[2]
    implementation = attention_implementation(
        ctx.execution.attention,
        seq=seq,
        kv_len=kv_len,
        self_attention=not ctx.attend_cache and seq == kv_len,
        dtype=q.dtype,
        head_dim=q.shape[-1],
        softcap=softcap,
        segments=ctx.segment_ids is not None,
    )
    options = dict(scale=scale, sliding_window=sliding_window)
    if implementation == "cudnn":
        return cudnn_attention(q, k, v, ctx, **options)
    if implementation == "blockwise":
        return blockwise_attention(q, k, v, ctx, softcap=softcap, block=ctx.execution.attention_block, **options)
    return dense_attention(q, k, v, ctx, softcap=softcap, **options)


def attention_implementation(
    choice: str,
    *,
    seq: int,
    kv_len: int,
    self_attention: bool,
    dtype,
    head_dim: int,
    softcap: float | None,
    on_gpu: bool | None = None,
    segments: bool = False,
) -> str:
    """The implementation ("dense", "blockwise" or "cudnn") that ``choice`` means for one attention call.

    "auto" takes cuDNN where its flash kernel applies (a CUDA GPU, bfloat16/float16, no soft-cap,
    S > 1 new tokens attending to each other, head width a multiple of 8 up to 128); else dense when
    one head's scores are small (S == 1 or S * Lk <= 256 * 256: decode steps, short sequences);
    else blockwise. An explicit "cudnn" falls back the same way on calls that read a KV cache or
    query one position (decode, ``last_only``): cuDNN's sequence-length masks describe only tokens
    that attend to each other. ``on_gpu`` overrides the backend check (tests). Packed sequences
    (``segments``) never take cuDNN: ``jax.nn.dot_product_attention`` has no segment ids, and a
    mask would need the bias gradient it lacks; "auto" then means dense or blockwise.
    """
    if choice not in ATTENTION_IMPLEMENTATIONS:
        raise UserError(f"attention: got {choice!r}, expected one of {ATTENTION_IMPLEMENTATIONS}")
    on_gpu = on_cuda_gpu() if on_gpu is None else on_gpu
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if choice == "cudnn":
        if not on_gpu:
            raise UserError(
                f"attention: got 'cudnn', which needs a CUDA GPU; the default backend is {jax.default_backend()!r}"
            )
        if softcap is not None:
            raise UserError(f"attention: got 'cudnn' for a layer with soft-capping ({softcap}); cuDNN has none")
        if not half:
            raise UserError(f"attention: got 'cudnn' with {jnp.dtype(dtype)} activations, expected bfloat16/float16")
        if segments:
            raise UserError("attention: got 'cudnn' for packed sequences (train.packing), which cuDNN's attention "
                            "in jax.nn cannot mask; expected 'auto', 'dense' or 'blockwise' with packing")
    if choice in ("dense", "blockwise"):
        return choice
    flash = self_attention and seq > 1
    if choice == "cudnn" and flash:
        return "cudnn"
    if choice == "auto" and flash and not segments and on_gpu and half and softcap is None and head_dim % 8 == 0 and head_dim <= 128:
        return "cudnn"
    return "dense" if seq == 1 or seq * kv_len <= _DENSE_MAX_SCORES else "blockwise"


def attention_mask(q_slot: jax.Array, kv_valid: jax.Array, *, kv_len: int, sliding_window: int | None,
                   segment_ids: jax.Array | None = None, kv_positions: jax.Array | None = None) -> jax.Array:
    """[B, S, Lk] bool: which key slots each query sees (the rule ``dot_product_attention`` states),
    with ``segment_ids`` [B, Lk] also only those of the query's own segment. The window is measured
    in ``kv_positions`` [B, Lk] (the slots themselves when None)."""
    kv_slot = jnp.arange(kv_len)
    allowed = (kv_slot[None, :] <= q_slot[:, None])[None, :, :] & kv_valid[:, None, :]  # [B, S, Lk]
    if sliding_window is not None:
        if kv_positions is None:
            allowed = allowed & (kv_slot[None, :] > q_slot[:, None] - sliding_window)[None]
        else:
            # A padded query (slot -1, blockwise) sees no key already; clip keeps its lookup in range.
            q_positions = jnp.take(kv_positions, q_slot, axis=1, mode="clip")  # [B, S]
            allowed = allowed & (kv_positions[:, None, :] > q_positions[:, :, None] - sliding_window)
    if segment_ids is not None:
        # A padded query (slot -1, blockwise) sees no key already; clip keeps its lookup in range.
        query_segment = jnp.take(segment_ids, q_slot, axis=1, mode="clip")  # [B, S]
        allowed = allowed & (query_segment[:, :, None] == segment_ids[:, None, :])
    return allowed


def dense_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: Context,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> jax.Array:
    """``dot_product_attention`` with every head's scores [B, K, G, S, Lk] at once: the reference.

    Scores are computed in q's dtype, the softmax in float32, as transformers' eager attention.
    """
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[1]
    groups = heads // kv_heads
    qg = q.reshape(batch, seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,bktd->bkgst", qg, k) * jnp.asarray(scale, q.dtype)
    scores = scores.astype(jnp.float32)
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    allowed = attention_mask(ctx.q_slot, ctx.kv_valid, kv_len=k.shape[2], sliding_window=sliding_window,
                             segment_ids=ctx.segment_ids, kv_positions=ctx.kv_positions)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,bktd->bskgd", probs, v)
    return out.reshape(batch, seq, heads, head_dim)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: Context,
    *,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    block: int = 512,
) -> jax.Array:
    """``dense_attention`` on ``block`` query rows at a time; the backward pass recomputes each block.

    Peak memory holds one block's scores [B, K, G, block, Lk] instead of [B, K, G, S, Lk], forward
    and backward: ``jax.checkpoint`` keeps only each block's inputs for the backward pass. S is
    padded to a multiple of ``block`` with queries at slot -1, which see no key (finite, as any
    fully masked row) and are dropped.
    """
    batch, seq, heads, head_dim = q.shape
    block = min(block, seq)
    n_blocks = -(-seq // block)
    pad = n_blocks * block - seq
    q_slot = ctx.q_slot
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_slot = jnp.concatenate([q_slot, jnp.full((pad,), -1, q_slot.dtype)])
    q_blocks = jnp.moveaxis(q.reshape(batch, n_blocks, block, heads, head_dim), 1, 0)

    @jax.checkpoint
    def one_block(args):
        q_block, slot_block = args
        block_ctx = ctx._replace(q_slot=slot_block)
        return dense_attention(q_block, k, v, block_ctx, scale=scale, sliding_window=sliding_window, softcap=softcap)

    out = jax.lax.map(one_block, (q_blocks, q_slot.reshape(n_blocks, block)))
    return jnp.moveaxis(out, 0, 1).reshape(batch, n_blocks * block, heads, head_dim)[:, :seq]


def cudnn_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    ctx: Context,
    *,
    scale: float,
    sliding_window: int | None = None,
    implementation: str = "cudnn",
) -> jax.Array:
    """``dot_product_attention`` of S tokens attending to each other, by cuDNN's flash attention.

    cuDNN takes padding as sequence lengths (real tokens first), not as a mask: an explicit
    boolean mask becomes an additive bias, and the bias gradient JAX 0.10 then asks for exists
    only for batch 1 (jax-ml/jax#30593). So each row is rotated left by its leading padding, which
    right-pads it without changing causal order or window distances among its real tokens, and
    attention runs with ``is_causal`` + sequence lengths + ``local_window_size``. This needs each
    row's real tokens to be contiguous (left and/or right padding, the layout of every caller
    here); a row with a hole gives NaN, loudly, instead of wrong numbers. Padding rows give 0.
    ``implementation="xla"`` runs the same construction with JAX's reference kernel (tests).

    Args:
      q: [B, S, H, Dh]; k, v: [B, K, S, Dh] heads-major, for the same S tokens (``ctx.q_slot`` is
        0..S-1 and ``ctx.kv_valid`` [B, S] marks the real ones).
    """
    batch, seq, heads, head_dim = q.shape
    if k.shape[2] != seq:
        raise UserError(f"cudnn_attention: got {seq} queries and {k.shape[2]} keys, expected the same tokens")
    valid = ctx.kv_valid
    length = jnp.sum(valid, axis=1, dtype=jnp.int32)
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)  # 0 for a row without real tokens
    last = seq - 1 - jnp.argmax(valid[:, ::-1], axis=1).astype(jnp.int32)
    contiguous = (length == 0) | (last - first + 1 == length)
    slots = jnp.arange(seq, dtype=jnp.int32)[None, :]

    def rotate(x, shift):  # x [B, S, heads, Dh]: row b's slot t takes slot (t + shift[b]) % S
        return jnp.take_along_axis(x, ((slots + shift[:, None]) % seq)[:, :, None, None], axis=1)

    lengths = jnp.maximum(length, 1)  # an all-padding row attends to one (padding) key; zeroed below
    out = jax.nn.dot_product_attention(
        rotate(q, first),
        rotate(jnp.swapaxes(k, 1, 2), first),
        rotate(jnp.swapaxes(v, 1, 2), first),
        scale=scale,
        is_causal=True,
        query_seq_lengths=lengths,
        key_value_seq_lengths=lengths,
        local_window_size=None if sliding_window is None else (sliding_window - 1, 0),
        implementation=implementation,
    )
    out = jnp.where(valid[:, :, None, None], rotate(out, -first), 0)
    return jnp.where(contiguous[:, None, None, None], out, jnp.nan).astype(q.dtype)


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
            raise UserError(
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
    if isinstance(kv, SlotLayerKV):  # a decode step of the rollout engine (one token per slot)
        q = apply_rope(q, ctx.positions, rope, max_position=ctx.max_position)
        k = apply_rope(k, ctx.positions, rope, max_position=ctx.max_position)
        return slot_attention(q, k, v, kv, ctx.positions, **attention_options)
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


def run_layers(
    decoder_layers, x: jax.Array, ctx: Context, kv, *, last_only: bool = False, execution: Execution = Execution()
):
    """Apply decoder layers in order; ``kv`` is None or one (k, v) cache pair per layer.

    With ``last_only``, the final layer computes its output for the last position only (every
    layer still writes every position's keys and values): a prefill needs nothing else.
    ``execution`` (the backbone's options) reaches attention through ``ctx``; without a cache the
    layers run under ``execution.remat`` and, for all positions, ``execution.scan_layers``.
    Returns (x [B, S or 1, D], new kv list or None).
    """
    if kv is None and execution.remat == "auto":
        # Chosen by the platform the program is lowered for, around the whole stack: a choice per
        # layer inside a scan would make every step keep both branches' residuals.
        def stack(remat):
            options = execution._replace(remat=remat)
            return lambda x: run_layers(decoder_layers, x, ctx, None, last_only=last_only, execution=options)[0]

        return by_platform(x, cpu=stack("none"), default=stack(ACCELERATOR_REMAT)), None
    ctx = ctx._replace(execution=execution)
    if kv is None and not last_only and execution.scan_layers:
        return scan_layers(decoder_layers, x, ctx, remat=execution.remat), None
    new_kv = []
    last = len(decoder_layers) - 1
    for i, layer in enumerate(decoder_layers):
        layer_last_only = last_only and i == last
        if kv is None and execution.remat != "none":
            graphdef, state = nnx.split(layer)
            x = _layer_fn(graphdef, ctx, remat=execution.remat, last_only=layer_last_only)(state, x)
            new_kv.append(None)
        else:
            x, layer_kv = layer(x, ctx, None if kv is None else kv[i], last_only=layer_last_only)
            new_kv.append(layer_kv)
    return x, (None if kv is None else new_kv)


def _layer_fn(graphdef, ctx: Context, *, remat: str, last_only: bool = False):
    """``(layer state, x) -> x``: one decoder layer without a cache as a pure function, under ``remat``.

    A pure function of the layer's state, so ``jax.checkpoint`` and ``jax.lax.scan`` see the weights as
    explicit inputs (saved or sliced), not as constants captured from the enclosing trace.
    """

    def apply(state, x):
        out, _ = nnx.merge(graphdef, state)(x, ctx, None, last_only=last_only)
        return out

    if remat == "none":
        return apply
    if remat == "layer":  # keep only the layer's inputs; recompute everything else
        return jax.checkpoint(apply)
    if remat not in REMAT_POLICIES:
        raise UserError(f"remat: got {remat!r}, expected one of {REMAT_CHOICES}")
    return jax.checkpoint(apply, policy=getattr(jax.checkpoint_policies, remat))


def layer_period(graphdefs) -> int:
    """Smallest P with layer i structurally identical to layer i % P for every i (the repeating pattern)."""
    n = len(graphdefs)
    return next(p for p in range(1, n + 1) if all(graphdefs[i] == graphdefs[i % p] for i in range(n)))


def scan_layers(decoder_layers, x: jax.Array, ctx: Context, *, remat: str = "none") -> jax.Array:
    """Decoder layers without a cache under ``jax.lax.scan``: one traced layer group however deep the model.

    Layers repeat with period P (P = 1 when identical; Gemma 3 alternates 5 sliding-window layers
    and 1 global one, P = 6): the scan runs over the n // P whole groups, with their per-layer
    weights stacked at call time, and the n % P layers left over run after it, unrolled.
    Raises ValueError when the pattern does not repeat at least twice (nothing to scan over).
    """
    graphdefs, states = zip(*(nnx.split(layer) for layer in decoder_layers))
    n = len(graphdefs)
    period = layer_period(graphdefs)
    groups = n // period
    if groups < 2 and n > 1:
        differs = next(i for i in range(n) if graphdefs[i] != graphdefs[0])
        raise UserError(
            f"scan_layers: needs identical decoder layers (or a pattern repeating at least twice); layer {differs} "
            f"differs from layer 0 in structure or static attributes (e.g. its sliding window or RoPE). "
            "Use scan_layers=False for this model."
        )
    fns = [_layer_fn(graphdefs[j], ctx, remat=remat) for j in range(period)]

    def group(x, group_states):
        for fn, state in zip(fns, group_states):
            x = fn(state, x)
        return x, None

    stacked = tuple(
        jax.tree.map(lambda *leaves: jnp.stack(leaves), *states[j : groups * period : period]) for j in range(period)
    )
    x, _ = jax.lax.scan(group, x, stacked)
    for i in range(groups * period, n):
        x = fns[i % period](states[i], x)
    return x


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
