"""Batched autoregressive sampling with a preallocated KV cache, compiled once per shape.

``generate`` runs prefill and the whole decode loop as ONE jitted function: the prompt batch is
encoded once into a ``KVCache``, then a ``lax.while_loop`` samples one token per row per step
until every row has emitted an EOS token or ``max_new_tokens`` is reached. The cache lives in the
loop carry, so XLA updates it in place (no per-token copy, no host round-trip per token).

Rows never interact, so with a ``mesh`` the prompts are split over its devices under
``shard_map``: each device prefills and decodes its own rows with no communication and leaves the
loop when its own rows are done. The random numbers are drawn for all (step, row) pairs before
the loop, each row's from a key folded with its global index (``row_offset`` + its index in the
call), so a rollout does not depend on how many devices sampled it, nor on how many calls
(micro-batches) it was sampled in. On a multi-core CPU, one
JAX CPU device per core (``jax.config.update("jax_num_cpu_devices", n)`` before JAX starts) with
the prompts split over them is the fastest set-up for small models: each core then runs its own
rows' small matmuls instead of XLA splitting each small matmul over threads.

What comes back is a ``Rollout``, the arrays the objectives consume (``[N, T]`` per-token arrays,
prompt-major groups of K samples, see ARCHITECTURE.md) plus the temperature the logprobs belong to:
recomputing training/reference logprobs at a different temperature than the one used for
sampling silently biases the KL and the importance ratios.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import kept_tokens, token_logprobs

# Number of times the generation function has been traced (tests check it is compiled once).
_TRACE_COUNT = 0


@struct.dataclass
class Rollout:
    """Completions sampled for a batch of prompts, laid out prompt-major.

    With B prompts and K samples per prompt, N = B*K rows ordered
    ``[p0s0, p0s1, ..., p0s(K-1), p1s0, ...]``; T = ``max_new_tokens``; P = prompt length.

    Attributes:
      tokens: [N, T] int32 completion tokens; ``pad_token_id`` after the first EOS.
      mask: [N, T] int32, 1 for completion tokens up to and including the first EOS, else 0.
      logprobs: [N, T] float32 log-probability of each sampled token under the distribution it was
        sampled from (softmax of logits / temperature after top-k/top-p filtering); 0 where mask == 0.
        For greedy decoding (temperature 0) it is the log-softmax of the raw logits (temperature 1,
        no filtering): the token is the argmax of that distribution.
      prompt_ids: [N, P] int32 prompts (left-padded), each repeated K times consecutively.
      prompt_mask: [N, P] int32, 1 for real prompt tokens.
      temperature: the sampling temperature (static; 0.0 for greedy).
      num_samples: K, the completions per prompt (static).
      top_k, top_p: the sampler's filter (static; 0 and 1.0 when none, and for greedy decoding).
      observation_mask: [N, T] int32, 1 for tokens an environment wrote into a multi-turn episode
        (``rollout.episodes``): in the context, never trained on (``mask`` 0); None for one turn.
    """

    tokens: jax.Array
    mask: jax.Array
    logprobs: jax.Array
    prompt_ids: jax.Array
    prompt_mask: jax.Array
    temperature: float = struct.field(pytree_node=False, default=1.0)
    num_samples: int = struct.field(pytree_node=False, default=1)
    top_k: int = struct.field(pytree_node=False, default=0)
    top_p: float = struct.field(pytree_node=False, default=1.0)
    observation_mask: jax.Array | None = None

    @property
    def logprob_temperature(self) -> float:
        """The temperature ``logprobs`` are computed at: ``temperature``, or 1.0 for greedy."""
        return self.temperature if self.temperature > 0 else 1.0


class _Options(NamedTuple):
    """Static (hashable) generation options: one compiled function per distinct value.

    The temperature, top-p value, EOS ids and pad id are traced arguments instead, so changing
    them (a temperature schedule, another tokenizer) does not recompile.
    """

    max_new_tokens: int
    num_samples: int
    greedy: bool
    top_k: int
    use_top_p: bool
    num_eos_slots: int
    cache_dtype: str | None


class _Sampling(NamedTuple):
    """Traced sampling parameters (scalars and the EOS id array, padded with -1)."""

    temperature: jax.Array
    top_p: jax.Array
    eos_token_ids: jax.Array
    pad_token_id: jax.Array
    row_offset: jax.Array  # the global index of this call's first row (its random draws' key)


# EOS id arrays are padded to a multiple of this, so 0-4 EOS ids share one compiled function.
_EOS_SLOTS = 4


# ----------------------------------------------------------------------------- filtering / sampling


def filter_logits(logits: jax.Array, *, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
    """Set the logits outside the top-k / nucleus (top-p) set to -inf, as transformers' warpers do.

    The set is ``jaxrl_llm.objectives.kept_tokens`` (see there for the exact rule), the same one
    the trainer's log-probabilities use. Apply the temperature before calling this
    (``logits / temperature``), as transformers does.

    Args:
      logits: [..., V] float logits.
      top_k: 0 disables; values >= V keep everything.
      top_p: 1.0 disables; must lie in (0, 1].
    Returns:
      [..., V] float32 logits with removed entries set to -inf.
    """
    _check_top_k(top_k)
    if not isinstance(top_p, jax.core.Tracer):
        _check_top_p(top_p)
    logits = jnp.asarray(logits).astype(jnp.float32)
    return jnp.where(kept_tokens(logits, top_k=top_k, top_p=top_p), logits, -jnp.inf)


def _sample_step(logits, uniform, opts: _Options, params: _Sampling) -> tuple[jax.Array, jax.Array]:
    """logits [N, V] float32, uniforms [N] -> (tokens [N] int32, logprobs [N] float32 of those tokens).

    Without filtering, softmax(logits / T) is computed as exp((logits - max) / T) / total, so the
    scaled [N, V] logits are never written out (one pass over the vocabulary fewer per step).
    """
    scale = 1.0
    if opts.greedy:
        x = logits
    elif opts.top_k > 0 or opts.use_top_p:
        x = filter_logits(logits / params.temperature, top_k=opts.top_k, top_p=params.top_p if opts.use_top_p else 1.0)
    else:
        x, scale = logits, 1.0 / params.temperature
    x_max = jnp.max(x, axis=-1, keepdims=True)
    unnormalised = jnp.exp((x - x_max) * scale)  # filtered tokens (-inf) get exactly 0
    if opts.greedy:
        tokens = first_argmax(x, x_max)
        total = jnp.sum(unnormalised, axis=-1)
    else:
        tokens, total = inverse_cdf_sample(unnormalised, uniform)
    chosen = jnp.take_along_axis(x, tokens[:, None], axis=-1)[:, 0]
    return tokens, (chosen - x_max[:, 0]) * scale - jnp.log(total)


def first_argmax(x: jax.Array, x_max: jax.Array) -> jax.Array:
    """``jnp.argmax(x, -1)`` (first index of the max) given ``x_max = max(x, -1, keepdims=True)``.

    Two plain reductions; XLA:CPU runs them several times faster than its variadic argmax reduce.
    """
    iota = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == x_max, iota, x.shape[-1]), axis=-1)


def inverse_cdf_sample(weights: jax.Array, uniform: jax.Array, *, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """Draw one index per row with probability weights / sum(weights) by inverse-transform sampling.

    Token i is chosen iff  C_{i-1} < u * C_V <= C_i  with C the running sum of the weights, so each
    row needs ONE uniform instead of V Gumbel draws (``jax.random.categorical``), which on CPU cost
    more than a small model's forward step. The running sum is two-level (block sums, then the
    chosen block) so no length-V scan is needed. A zero-weight index is never chosen.

    Args:
      weights: [N, V] non-negative float32 weights (e.g. ``exp(z - max z)``), every row with a positive sum.
      uniform: [N] uniforms in [0, 1).
    Returns:
      (indices [N] int32, row sums [N] float32).
    """
    n, vocab = weights.shape
    num_blocks = -(-vocab // block)
    blocks = jnp.pad(weights, ((0, 0), (0, num_blocks * block - vocab))).reshape(n, num_blocks, block)
    block_sums = jnp.sum(blocks, axis=-1)
    block_cdf = jnp.cumsum(block_sums, axis=-1)
    total = block_cdf[:, -1]
    target = total * (1.0 - uniform)  # in (0, total]: a zero-weight prefix can never be hit
    chosen = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), num_blocks - 1)
    before = jnp.take_along_axis(block_cdf - block_sums, chosen[:, None], axis=-1)
    inside = jnp.take_along_axis(blocks, chosen[:, None, None], axis=1)[:, 0]  # [N, block]
    offset = jnp.sum(before + jnp.cumsum(inside, axis=-1) < target[:, None], axis=-1)
    # Rounding can leave the block's own running sum a hair below the target: fall back to the
    # block's last positive-weight index, never to a zero-weight one.
    iota = jnp.arange(block, dtype=jnp.int32)
    last_positive = jnp.max(jnp.where(inside > 0, iota, 0), axis=-1)
    index = chosen * block + jnp.minimum(offset, last_positive)
    return index.astype(jnp.int32), total


def _is_eos(tokens: jax.Array, eos_token_ids: jax.Array) -> jax.Array:
    """[N] bool: the token is one of the EOS ids (padding slots hold -1 and never match)."""
    return jnp.any(tokens[:, None] == eos_token_ids[None, :], axis=-1)


# ----------------------------------------------------------------------------- the compiled loop


def prefill(model, prompt_ids, prompt_mask, cache_length: int, opts: _Options):
    """`(logits [B*K, V] of each row's next token, KVCache of B*K rows and cache_length slots)`.

    Each prompt is prefilled once, then each of its K samples gets a copy of its cache."""
    batch, k = prompt_ids.shape[0], opts.num_samples
    cache = model.init_cache(batch, cache_length, opts.cache_dtype)
    # Left padding: the last column is every row's last token, the only one whose logits we need.
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, None, cache, fresh_cache=True, last_position_only=True)
    logits = model.unembed(hidden[:, -1])
    if k > 1:
        repeat = functools.partial(jnp.repeat, repeats=k, axis=0)
        logits = repeat(logits)
        cache = cache._replace(k=tuple(map(repeat, cache.k)), v=tuple(map(repeat, cache.v)), valid=repeat(cache.valid),
                               positions=repeat(cache.positions))
    return logits, cache


def _sample_rows(opts: _Options, model, prompt_ids, prompt_mask, uniforms, params: _Sampling):
    """Prefill + while_loop decode for the prompts one device holds: [B, P] prompts -> [B*K, T] arrays.

    Rows never interact, so under ``shard_map`` every device runs this on its own rows with no
    communication, and stops as soon as its own rows are done.
    """
    batch, prompt_len = prompt_ids.shape
    k, steps = opts.num_samples, opts.max_new_tokens
    n = batch * k
    # The last sampled token is never fed back, so the cache needs P + T - 1 slots.
    logits, cache = prefill(model, prompt_ids, prompt_mask, prompt_len + steps - 1, opts)

    first, first_lp = _sample_step(logits, uniforms[0], opts, params)
    tokens = jnp.full((n, steps), params.pad_token_id, jnp.int32).at[:, 0].set(first)
    logprobs = jnp.zeros((n, steps), jnp.float32).at[:, 0].set(first_lp)
    lengths = jnp.ones((n,), jnp.int32)
    done = _is_eos(first, params.eos_token_ids)
    ones = jnp.ones((n, 1), jnp.int32)

    def cond(carry):
        t, _, _, done, _, _, _ = carry
        return (t < steps) & ~jnp.all(done)

    def body(carry):
        t, cache, last, done, lengths, tokens, logprobs = carry
        # Default positions (real tokens so far, minus one): bounded by the cache length, which
        # lets RoPE read cos/sin from a constant table.
        hidden, cache = model.hidden_states(last[:, None], ones, None, cache)
        logits = model.unembed(hidden[:, 0])
        new, new_lp = _sample_step(logits, uniforms[t], opts, params)
        new = jnp.where(done, params.pad_token_id, new)
        new_lp = jnp.where(done, 0.0, new_lp)
        tokens = jax.lax.dynamic_update_slice(tokens, new[:, None], (0, t))
        logprobs = jax.lax.dynamic_update_slice(logprobs, new_lp[:, None], (0, t))
        lengths = lengths + (~done).astype(jnp.int32)
        done = done | _is_eos(new, params.eos_token_ids)
        return t + 1, cache, new, done, lengths, tokens, logprobs

    carry = (jnp.int32(1), cache, first, done, lengths, tokens, logprobs)
    _, _, _, _, lengths, tokens, logprobs = jax.lax.while_loop(cond, body, carry)
    mask = (jnp.arange(steps)[None, :] < lengths[:, None]).astype(jnp.int32)
    return tokens, mask, logprobs


def _generate_impl(opts: _Options, mesh, model, prompt_ids, prompt_mask, rng, params: _Sampling):
    """Uniforms for every (step, row), then ``_sample_rows`` on one device or on each device of ``mesh``."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    prompt_ids, prompt_mask = prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32)
    k, steps = opts.num_samples, opts.max_new_tokens
    n = prompt_ids.shape[0] * k
    uniforms = row_uniforms(rng, params.row_offset + jnp.arange(n), steps)
    sample_rows = functools.partial(_sample_rows, opts)
    if mesh is not None:
        rows = P(mesh.axis_names)
        if AxisType.Explicit in mesh.axis_types:
            # `jax.make_mesh`'s default: shard_map then requires the inputs to carry its specs.
            prompt_ids, prompt_mask = (jax.reshard(x, NamedSharding(mesh, rows)) for x in (prompt_ids, prompt_mask))
            uniforms = jax.reshard(uniforms, NamedSharding(mesh, P(None, mesh.axis_names)))
        sample_rows = jax.shard_map(
            sample_rows, mesh=mesh, in_specs=(P(), rows, rows, P(None, mesh.axis_names), P()),
            out_specs=(rows, rows, rows), check_vma=False,
        )
    tokens, mask, logprobs = sample_rows(model, prompt_ids, prompt_mask, uniforms, params)
    return Rollout(
        tokens=tokens,
        mask=mask,
        logprobs=logprobs,
        prompt_ids=jnp.repeat(prompt_ids, k, axis=0),
        prompt_mask=jnp.repeat(prompt_mask, k, axis=0),
        temperature=0.0,  # set by ``generate`` (static metadata, not a traced value)
        num_samples=k,
    )


def row_uniforms(rng, rows, steps: int) -> jax.Array:
    """`[steps, len(rows)]` uniforms in [0, 1): row r's are `uniform(fold_in(rng, r), (steps,))`.

    Keyed by each row's global index, drawn up front (no PRNG work inside the decode loop): a
    row's completion is the same whether its batch is sampled whole, in micro-batches or split
    over any number of devices."""
    draw = lambda row: jax.random.uniform(jax.random.fold_in(rng, row), (steps,), jnp.float32)  # noqa: E731
    return jax.vmap(draw, out_axes=1)(rows)


@functools.lru_cache(maxsize=64)
def _compiled_generate(opts: _Options, mesh):
    """The jitted generation function for one option set and mesh.

    The model goes in as a pytree argument (NNX modules are pytrees): ``jit`` keys its cache on the
    model's structure and the shapes, and flattening a module costs far less than ``nnx.split``.
    """
    return jax.jit(functools.partial(_generate_impl, opts, mesh))


# ----------------------------------------------------------------------------- public API


def generate(
    model,
    prompt_ids,
    prompt_mask,
    *,
    max_new_tokens: int,
    rng: jax.Array,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int = 0,
    cache_dtype=None,
    mesh: Mesh | None = None,
    row_offset: int = 0,
    slots: int | None = None,
) -> Rollout:
    """Sample ``num_samples`` completions of up to ``max_new_tokens`` tokens for each prompt.

    Each step samples y_t ~ softmax(filter(logits_t / temperature)) (top-k, then top-p, as
    transformers' warpers), or y_t = argmax(logits_t) when temperature == 0. A row stops after its
    first EOS token; the loop stops when every row has stopped or T = max_new_tokens tokens are out.
    Compiled once per (model structure, B, P, options); later calls with the same shapes reuse it.

    Args:
      model: a ``jaxrl_llm.models.CausalLM`` (any family).
      prompt_ids: [B, P] integer token ids, LEFT-padded (every row's last column is a real token).
      prompt_mask: [B, P], 1 (True) for real tokens, 0 for padding.
      max_new_tokens: T > 0.
      rng: a PRNG key (``jax.random.key`` or ``PRNGKey``); the same key gives the same rollout.
        Row r (of N = B*K) draws its tokens from ``fold_in(rng, row_offset + r)`` alone.
      num_samples: K >= 1 completions per prompt, laid out prompt-major.
      temperature: >= 0; 0 means greedy.
      top_k: >= 0; 0 disables top-k.
      top_p: in (0, 1]; 1 disables nucleus filtering.
      eos_token_id: an int, a sequence of ints (any of them ends a row), or None (always T tokens).
      pad_token_id: filler token written after EOS.
      cache_dtype: KV-cache dtype; default the model's parameter dtype.
      mesh: a ``jax.sharding.Mesh`` to split the prompts over (all of its axes; B must be a multiple
        of its size). Each device prefills and decodes its own prompts' rows with no communication
        and stops when its own rows are done; the results are the same as on one device (the
        random draws belong to rows, not devices). Default: the mesh of ``prompt_ids`` when it is
        a ``jax.Array`` sharded over several devices by a ``NamedSharding``, else one device.
      row_offset: the global index of this call's first row, when a batch is sampled in parts:
        a part of prompts ``i:j`` (with ``row_offset = i * K``) and the same ``rng`` give exactly
        the rows ``i*K:j*K`` of the whole batch's rollout (a traced value: no recompilation).
      slots: the rows decoding at once on one device (>= K; default all N): the others wait in a
        queue and take a slot as soon as one frees (``jaxrl_llm.rollout.engine``). A memory knob:
        the samples are the same for every value.
    Returns:
      A ``Rollout`` with N = B*K rows (see its docstring for the fields), split over ``mesh`` by rows.
    """
    checked = check_sampling_arguments(locals())  # locals(): generate's arguments, by name
    # The engine's scheduler runs on the host between compiled chunks: it needs concrete arrays,
    # so inside a caller's jit (traced prompts) the one-loop program runs instead.
    if checked.mesh is None and not isinstance(checked.prompt_ids, jax.core.Tracer):
        rollout, _ = _engine_generate(model, checked)
    else:
        fn, args = _one_loop_program(model, checked)
        rollout = fn(*args)
    temperature = checked.temperature
    rollout = rollout.replace(temperature=temperature)
    if temperature > 0:  # greedy logprobs are those of the unfiltered softmax
        rollout = rollout.replace(top_k=int(top_k), top_p=float(top_p))
    return rollout


def lower_generate(model, prompt_ids, prompt_mask, **options) -> jax.stages.Lowered:
    """The one-loop XLA program for these arguments, lowered but not run: the program ``generate``
    runs under a mesh or inside a caller's ``jit`` (on one device it runs the engine's programs,
    ``jaxrl_llm.rollout.engine``, whose samples equal this program's).

    Takes exactly ``generate``'s arguments (``options``: its keyword arguments) and checks them the
    same way. Use it to read the program (``.as_text()``, or ``.compile().as_text()`` for the
    optimised HLO), for XLA's cost or memory analysis, or to map the op names in a profile back to
    their shapes (``benchmarks/rollout.py`` does).
    """
    arguments = inspect.signature(generate).bind(model, prompt_ids, prompt_mask, **options)
    arguments.apply_defaults()
    fn, args, _ = _prepare_generate(arguments.arguments)
    return fn.lower(*args)


def _prepare_generate(arguments: dict):
    """Check ``generate``'s arguments, given by name: (the one-loop program, its arguments, the temperature)."""
    checked = check_sampling_arguments(arguments)
    return (*_one_loop_program(arguments["model"], checked), checked.temperature)


def _one_loop_program(model, checked: CheckedArguments):
    """The one-loop sampler (prefill, then one ``while_loop`` over all rows until the longest ends):
    the program under a mesh, and the reference the engine's samples equal."""
    args = (model, checked.prompt_ids, checked.prompt_mask, checked.rng, checked.params)
    return _compiled_generate(checked.opts, checked.mesh), args


@functools.partial(jax.jit, static_argnums=(2,))
def _uniforms(rng, rows, steps):
    return row_uniforms(rng, rows, steps)


def _engine_generate(model, checked: CheckedArguments, uniforms=None):
    """``generate`` on one device: the rollout engine (slots, a queue, growing caches, shared prompts).

    Returns (the ``Rollout``, the engine's list of ``engine.Schedule`` chunks)."""
    from jaxrl_llm.rollout import engine

    opts, params = checked.opts, checked.params
    k = opts.num_samples
    prompt_ids = jnp.asarray(checked.prompt_ids).astype(jnp.int32)
    prompt_mask = jnp.asarray(checked.prompt_mask).astype(jnp.int32)
    n = prompt_ids.shape[0] * k
    if uniforms is None:
        uniforms = _uniforms(checked.rng, params.row_offset + np.arange(n, dtype=np.int32), opts.max_new_tokens)
    tokens, mask, logprobs, schedule = engine.run(opts, model, prompt_ids, prompt_mask, uniforms, params,
                                                  slots=checked.slots)
    rollout = Rollout(tokens=tokens, mask=mask, logprobs=logprobs, prompt_ids=jnp.repeat(prompt_ids, k, axis=0),
                      prompt_mask=jnp.repeat(prompt_mask, k, axis=0), temperature=checked.temperature,
                      num_samples=k)
    return rollout, schedule


def generate_with_schedule(model, prompt_ids, prompt_mask, *, uniforms=None, **options):
    """``generate`` on one device through the engine, with what its decode chunks ran.

    Takes ``generate``'s arguments (no ``mesh``), and optionally ``uniforms`` [T, N] in [0, 1) to use
    instead of the rows' draws from ``rng`` (a benchmark imposes lengths this way). Returns
    (``Rollout``, list of ``engine.Schedule``: per chunk its slots, cache length, live rows, steps).
    """
    arguments = inspect.signature(generate).bind(model, prompt_ids, prompt_mask, **options)
    arguments.apply_defaults()
    checked = check_sampling_arguments(arguments.arguments)
    if checked.mesh is not None:
        raise UserError("mesh: got a mesh, expected None: the engine's schedule is one device's")
    n, steps = checked.prompt_ids.shape[0] * checked.opts.num_samples, checked.opts.max_new_tokens
    if uniforms is not None:
        uniforms = jnp.asarray(uniforms, jnp.float32)
        if uniforms.shape != (steps, n):
            raise UserError(f"uniforms: got shape {tuple(uniforms.shape)}, expected (max_new_tokens, rows) = "
                            f"({steps}, {n})")
    rollout, schedule = _engine_generate(model, checked, uniforms)
    if checked.temperature > 0:  # as ``generate``
        rollout = rollout.replace(top_k=int(arguments.arguments["top_k"]), top_p=float(arguments.arguments["top_p"]))
    return rollout, schedule


class CheckedArguments(NamedTuple):
    opts: _Options
    params: _Sampling
    mesh: Mesh | None
    prompt_ids: jax.Array
    prompt_mask: jax.Array
    rng: jax.Array
    temperature: float
    slots: int | None = None


def check_sampling_arguments(arguments: dict) -> CheckedArguments:
    """``generate``'s arguments (by name) checked, each error naming its argument, and turned into
    the static options and traced parameters of a compiled sampling function."""
    a = types.SimpleNamespace(**arguments)
    temperature = _check_temperature(a.temperature)
    top_p = _check_top_p(a.top_p)
    eos = _check_eos(a.eos_token_id)
    pad_token_id = _check_int("pad_token_id", a.pad_token_id, minimum=0)
    vocab = a.model.unembedding_matrix().shape[-1]
    for name, value in [("eos_token_id", e) for e in eos] + [("pad_token_id", pad_token_id)]:
        if value >= vocab:
            raise UserError(f"{name}: got {value}, expected a token id in [0, {vocab}) for this model's vocabulary")
    opts = _Options(
        max_new_tokens=_check_int("max_new_tokens", a.max_new_tokens, minimum=1),
        num_samples=_check_int("num_samples", a.num_samples, minimum=1),
        greedy=temperature == 0.0,
        top_k=_check_top_k(a.top_k),
        use_top_p=top_p < 1.0,
        num_eos_slots=max(1, -(-len(eos) // _EOS_SLOTS)) * _EOS_SLOTS,
        cache_dtype=None if a.cache_dtype is None else jnp.dtype(a.cache_dtype).name,
    )
    # numpy, not jnp: jit takes them as arguments without an eager device op each.
    params = _Sampling(
        temperature=np.float32(temperature if temperature > 0 else 1.0),
        top_p=np.float32(top_p),
        eos_token_ids=np.array(eos + (-1,) * (opts.num_eos_slots - len(eos)), np.int32),
        pad_token_id=np.int32(pad_token_id),
        row_offset=np.int32(_check_int("row_offset", a.row_offset, minimum=0)),
    )
    mesh = _sampling_mesh(a.mesh, a.prompt_ids)
    prompt_ids, prompt_mask = _check_prompts(a.prompt_ids, a.prompt_mask)
    if mesh is not None and prompt_ids.shape[0] % mesh.size:
        raise UserError(
            f"prompt_ids: got {prompt_ids.shape[0]} prompts, expected a multiple of the {mesh.size} devices "
            "of the mesh they are split over"
        )
    from jaxrl_llm.rollout.engine import check_slots

    slots = check_slots(getattr(a, "slots", None), opts.num_samples)
    return CheckedArguments(opts, params, mesh, prompt_ids, prompt_mask, _check_rng(a.rng), temperature, slots)


def _sequence_logprobs_impl(chunk_size, top_k, model, temperature, top_p, prompt_ids, prompt_mask, tokens, mask):
    prompt_len, steps = prompt_ids.shape[1], tokens.shape[1]
    ids = jnp.concatenate([prompt_ids, tokens], axis=1)
    attention = jnp.concatenate([prompt_mask, mask], axis=1)
    hidden = model.hidden_states(ids, attention)[0]
    # The hidden state at position i predicts token i + 1: completion token t is predicted at P - 1 + t.
    logits = model.unembed(hidden[:, prompt_len - 1 : prompt_len - 1 + steps])
    logprobs = token_logprobs(logits, tokens, temperature=temperature, chunk_size=chunk_size, top_k=top_k,
                              top_p=top_p)
    return jnp.where(mask.astype(bool), logprobs, 0.0)


@functools.lru_cache(maxsize=64)
def _compiled_sequence_logprobs(chunk_size, top_k):
    return jax.jit(functools.partial(_sequence_logprobs_impl, chunk_size, top_k))


def sequence_logprobs(model, rollout: Rollout, *, temperature: float | None = None, chunk_size: int | None = None,
                      top_k: int | None = None, top_p: float | None = None):
    """Log-probabilities of a rollout's completion tokens under ``model`` (any params), one forward pass.

    log pi(y_t | x, y_<t) = z[y_t] - logsumexp over the kept set of z,  z = logits_t / temperature,
    computed by ``jaxrl_llm.objectives.token_logprobs`` on one forward of concat(prompt, completion)
    with the concatenated attention mask (so positions match the sampler's). By default the
    temperature and top-k / top-p filter are the rollout's own, so for the sampling policy the
    result equals ``rollout.logprobs``; pass ``top_k=0, top_p=1.0`` for the unfiltered softmax
    (what a reference policy's log-probabilities use).

    Args:
      model: a ``CausalLM`` (the policy being trained, or the frozen reference).
      rollout: a ``Rollout`` from ``generate``.
      temperature: > 0; default ``rollout.logprob_temperature`` (the sampling temperature, 1.0 for greedy).
      chunk_size: rows of the flattened [N*T] logits per chunk (memory bound), see ``token_logprobs``.
      top_k, top_p: the filter; default the rollout's.
    Returns:
      [N, T] float32 log-probabilities, 0 where ``rollout.mask`` == 0.
    """
    temperature = rollout.logprob_temperature if temperature is None else temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) or not temperature > 0:
        raise UserError(f"temperature: got {temperature!r}, expected a positive float")
    if chunk_size is not None:
        _check_int("chunk_size", chunk_size, minimum=1)
    top_k = _check_top_k(rollout.top_k if top_k is None else top_k)
    top_p = _check_top_p(rollout.top_p if top_p is None else top_p)
    fn = _compiled_sequence_logprobs(chunk_size, top_k)
    return fn(model, np.float32(temperature), np.float32(top_p), rollout.prompt_ids, rollout.prompt_mask,
              rollout.tokens, rollout.mask)


# ----------------------------------------------------------------------------- argument checks


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise UserError(f"{name}: got {value!r}, expected an integer >= {minimum}")
    return int(value)


def _check_temperature(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise UserError(f"temperature: got {value!r}, expected a float >= 0 (0 = greedy)")
    if not (np.isfinite(value) and value >= 0):
        raise UserError(f"temperature: got {value!r}, expected a finite float >= 0 (0 = greedy)")
    return float(value)


def _check_top_k(value) -> int:
    return _check_int("top_k", value, minimum=0)


def _check_top_p(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not 0 < value <= 1:
        raise UserError(f"top_p: got {value!r}, expected a float in (0, 1] (1 disables nucleus sampling)")
    return float(value)


def _check_eos(value) -> tuple[int, ...]:
    if value is None:
        return ()
    values = [value] if isinstance(value, (int, np.integer)) else value
    try:
        return tuple(_check_int("eos_token_id", v, minimum=0) for v in values)
    except (TypeError, ValueError):
        raise UserError(
            f"eos_token_id: got {value!r}, expected a non-negative int, a list of them, or None"
        ) from None


def _check_prompts(prompt_ids, prompt_mask) -> tuple[jax.Array, jax.Array]:
    ids_dtype = jnp.result_type(prompt_ids)
    if not jnp.issubdtype(ids_dtype, jnp.integer):
        raise UserError(f"prompt_ids: got dtype {ids_dtype}, expected integer token ids")
    if np.ndim(prompt_ids) != 2:
        raise UserError(f"prompt_ids: got shape {np.shape(prompt_ids)}, expected [B, P]")
    if np.shape(prompt_mask) != np.shape(prompt_ids):
        raise UserError(
            f"prompt_mask: got shape {np.shape(prompt_mask)}, expected {np.shape(prompt_ids)} like prompt_ids"
        )
    mask_dtype = jnp.result_type(prompt_mask)
    if not (mask_dtype == jnp.bool_ or jnp.issubdtype(mask_dtype, jnp.integer)):
        raise UserError(f"prompt_mask: got dtype {mask_dtype}, expected bool or integer 0/1")
    # Value checks only where the values are concrete and on this host (a multi-process global
    # array is checked by the process that built it).
    if not isinstance(prompt_mask, jax.core.Tracer) and getattr(prompt_mask, "is_fully_addressable", True):
        mask = np.asarray(prompt_mask)
        if not np.isin(mask, (0, 1)).all():
            raise UserError("prompt_mask: expected only 0/1 values")
        if not mask[:, -1].all():
            rows = np.flatnonzero(~mask[:, -1].astype(bool)).tolist()
            raise UserError(
                f"prompt_mask: rows {rows} end with padding; expected LEFT-padded prompts "
                "(every row's last token real)"
            )
    if not isinstance(prompt_ids, jax.Array):  # lists, numpy: to numpy (jit casts to int32 inside)
        prompt_ids, prompt_mask = np.asarray(prompt_ids), np.asarray(prompt_mask)
    elif not isinstance(prompt_mask, jax.Array):
        prompt_mask = np.asarray(prompt_mask)
    return prompt_ids, prompt_mask


def _sampling_mesh(mesh, prompt_ids) -> Mesh | None:
    """The mesh to split rows over (None: one device, plain ``jit``)."""
    if mesh is None:
        sharding = getattr(prompt_ids, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 and not sharding.is_fully_replicated:
            mesh = sharding.mesh
    elif not isinstance(mesh, Mesh):
        raise UserError(f"mesh: got {type(mesh).__name__}, expected a jax.sharding.Mesh or None")
    return None if mesh is None or mesh.size == 1 else mesh


def _check_rng(rng) -> jax.Array:
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise UserError(f"rng: got a key array of shape {rng.shape}, expected a single key")
        return rng
    if rng.shape == (2,) and rng.dtype == jnp.uint32:
        return jax.random.wrap_key_data(rng)
    raise UserError(f"rng: got shape {rng.shape} dtype {rng.dtype}, expected a PRNG key (jax.random.key(seed))")
