"""The rollout engine: slots refilled from a queue, caches that grow with the rows, prompts stored once.

``generate`` on one device runs here. Its cost follows the tokens produced, not the cache
preallocated nor the longest row:

* **Slots and a queue (continuous batching).** The N = B*K (prompt, sample) rows wait in a queue
  in prompt-major order; ``slots`` of them decode at once. A compiled chunk of decode steps
  (``lax.while_loop``) runs until some slots have finished and rows are waiting, then the host
  admits the next rows into the free slots (a new row's first token is sampled from its prompt's
  prefill logits at the start of the next chunk). Between chunks the slots are resized to the
  live rows plus those that can be admitted now (a power of two, at least ``slot_floor``): with
  the queue empty, or waiting for a free prompt entry, the live rows move into fewer slots, so
  the rows a step computes stay within 2x of the live rows.
* **Caches sized to the rows (length buckets).** Each slot's own completion cache holds ``Lc``
  tokens, a bucket at least the longest live row's length (powers of two, quarter octaves past
  512), resized between chunks as the rows grow and end: the cache a step reads is at most 2x
  the longest live row (1.25x past 512 tokens).
* **Prompts stored once.** A prompt is prefilled once into a pool entry that its K samples share
  (``models.slot_cache``, cascade attention): its keys and values are stored and read once per
  prompt, not once per sample. An entry is freed when its last sample ends.
* **Same samples.** Row r's uniforms are ``row_uniforms(rng, row_offset + r)``, its position in
  the completion indexes them, and every row's arithmetic is its own: the tokens and
  log-probabilities are the ones ``_sample_rows`` (the one-loop sampler) gives, for any ``slots``.

The host touches only small arrays between chunks (each slot's row, length and done flag).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrl_llm.errors import UserError
from jaxrl_llm.models.layers import Context
from jaxrl_llm.models.slot_cache import SlotLayerKV

# Slots are not compacted below this many while the caches are small: a step's matmuls hardly
# get cheaper below it (``slot_floor``).
_MIN_SLOTS = 8
# Smallest completion-cache bucket (tokens): short rollouts compile one decode program.
_MIN_BUCKET = 32
# Completion caches longer than this make attention most of a step: past it the slots compact
# down to one and the length buckets are quarter octaves (``slot_floor``, ``bucket``).
_SMALL_CACHE = 512
# Traces of the engine's programs (tests check that repeated calls reuse them).
_TRACE_COUNT = 0


class Pool(NamedTuple):
    """Prompt entries shared by their samples: per layer k, v [M, K, P, Dh]; valid, positions [M, P];
    length [M] (real prompt tokens); logits [M, V] (the prefill's next-token logits)."""

    k: tuple
    v: tuple
    valid: jax.Array
    positions: jax.Array
    length: jax.Array
    logits: jax.Array


class Slots(NamedTuple):
    """The decoding state, one entry per slot. row -1 marks a free slot; t is the number of tokens the
    slot's row has produced; last its last token (the next one fed)."""

    own_k: tuple  # per layer [S, K, Dh, Lc] (transposed: see ``models.slot_cache``)
    own_v: tuple  # per layer [S, K, Lc, Dh]
    row: jax.Array
    entry: jax.Array
    member: jax.Array
    t: jax.Array
    last: jax.Array
    done: jax.Array


class Outputs(NamedTuple):
    """The rollout being written: tokens, logprobs [N, T]; length [N]."""

    tokens: jax.Array
    logprobs: jax.Array
    length: jax.Array


def bucket(length: int, cap: int) -> int:
    """The cache length for ``length`` tokens, capped at ``cap``: a power of two >= it (at least
    ``_MIN_BUCKET``) up to ``_SMALL_CACHE``; past it, where attention is most of a step, the next
    quarter of an octave (640, 768, 896, 1024, 1280, ...): at most 1.25x the length, for a few more
    compiled programs."""
    size = max(_MIN_BUCKET, 1 << max(0, int(length) - 1).bit_length())
    if size > _SMALL_CACHE:
        step = size // 8  # length is in (size / 2, size]: quarters of that octave
        size = -(-int(length) // step) * step
    return min(size, cap)


def slot_count(live: int, cap: int, *, floor: int = 1) -> int:
    """Slots for ``live`` rows: a power of two >= it, at least ``floor``, at most ``cap``."""
    return min(max(floor, 1 << max(0, int(live) - 1).bit_length()), cap)


def slot_floor(own_len: int) -> int:
    """The fewest slots worth compacting to with completion caches of ``own_len`` tokens: below
    ``_MIN_SLOTS`` a step's matmuls hardly get cheaper, but past ``_SMALL_CACHE`` tokens its
    attention, which reads every slot's cache, is most of the step: compact down to one slot."""
    return _MIN_SLOTS if own_len <= _SMALL_CACHE else 1


def pool_entries(slots: int, num_samples: int, num_prompts: int) -> int:
    """Prompt entries for ``slots`` slots: twice the prompts the slots hold at once (rows of
    partly finished prompts keep theirs), never more than there are prompts."""
    return min(num_prompts, 2 * -(-slots // num_samples))


# ----------------------------------------------------------------------------- compiled pieces


def _empty_pool(model, entries: int, prompt_len: int, dtype) -> Pool:
    shape = (entries, model.num_kv_heads, prompt_len, model.head_dim)
    vocab = model.unembedding_matrix().shape[-1]
    zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(model.num_layers))  # noqa: E731
    return Pool(zeros(), zeros(), jnp.zeros((entries, prompt_len), bool), jnp.zeros((entries, prompt_len), jnp.int32),
                jnp.zeros((entries,), jnp.int32), jnp.zeros((entries, vocab), jnp.float32))


def _empty_slots(model, slots: int, own_len: int, dtype) -> Slots:
    shape = (slots, model.num_kv_heads, own_len, model.head_dim)
    k_shape = (slots, model.num_kv_heads, model.head_dim, own_len)
    zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(model.num_layers))  # noqa: E731
    minus = jnp.full((slots,), -1, jnp.int32)
    return Slots(zeros(k_shape), zeros(shape), minus, jnp.zeros_like(minus), jnp.zeros_like(minus), jnp.zeros_like(minus),
                 jnp.zeros_like(minus), jnp.ones((slots,), bool))


def _prefill_impl(model, pool: Pool, prompt_ids, prompt_mask, entries):
    """Prefill prompts [Bq, P] into pool ``entries`` [Bq] (index M: a padding prompt, dropped)."""
    batch, prompt_len = prompt_ids.shape
    cache = model.init_cache(batch, prompt_len, pool.k[0].dtype)
    hidden, cache = model.hidden_states(prompt_ids, prompt_mask, None, cache, fresh_cache=True,
                                        last_position_only=True)
    logits = model.unembed(hidden[:, -1])
    put = lambda old, new: old.at[entries].set(new.astype(old.dtype), mode="drop")  # noqa: E731
    return Pool(tuple(map(put, pool.k, cache.k)), tuple(map(put, pool.v, cache.v)), put(pool.valid, cache.valid),
                put(pool.positions, cache.positions), put(pool.length, jnp.sum(prompt_mask, axis=1)),
                put(pool.logits, logits))


def _decode_impl(opts, model, pool: Pool, slots: Slots, out: Outputs, uniforms, params, admit, members, stop_free):
    """Admit rows into slots, then decode until ``stop_free`` slots are free, the completion cache is
    full, or every row is done. ``admit`` = (row, entry, member) [S] each, row -1 where none."""
    global _TRACE_COUNT
    _TRACE_COUNT += 1
    from jaxrl_llm.rollout.sampler import _is_eos, _sample_step  # the one-loop sampler's own steps

    steps = opts.max_new_tokens
    n_slots, own_len = slots.row.shape[0], slots.own_v[0].shape[2]
    n_rows = out.length.shape[0]
    admit_row, admit_entry, admit_member = admit

    def write(out, row, t, token, logprob, live):
        row = jnp.where(live, row, n_rows)  # out of range: dropped
        return out._replace(tokens=out.tokens.at[row, t].set(token, mode="drop"),
                            logprobs=out.logprobs.at[row, t].set(logprob, mode="drop"),
                            length=out.length.at[row].set(t + 1, mode="drop"))

    # Admission: the first token of each new row, from its prompt's prefill logits.
    admitted = admit_row >= 0
    first, first_lp = _sample_step(pool.logits[admit_entry], uniforms[0, jnp.maximum(admit_row, 0)], opts, params)
    out = write(out, admit_row, jnp.zeros_like(admit_row), first, first_lp, admitted)
    first_done = _is_eos(first, params.eos_token_ids) | (steps == 1)
    pick = lambda new, old: jnp.where(admitted, new, old)  # noqa: E731
    slots = slots._replace(row=pick(admit_row, slots.row), entry=pick(admit_entry, slots.entry),
                           member=pick(admit_member, slots.member), t=pick(1, slots.t), last=pick(first, slots.last),
                           done=pick(first_done, slots.done))
    max_position = pool.valid.shape[1] + steps

    def live_of(slots):
        return (slots.row >= 0) & ~slots.done

    def cond(carry):
        step, slots, _ = carry
        live = live_of(slots)
        room = jnp.all(jnp.where(live, slots.t - 1 < own_len, True))
        free = jnp.sum(~live)
        return jnp.any(live) & room & ((step == 0) | (free < stop_free))

    def body(carry):
        step, slots, out = carry
        live = live_of(slots)
        write_index = jnp.where(live, slots.t - 1, own_len)  # the fed token's own slot (own_len: none)
        positions = (pool.length[slots.entry] + slots.t - 1)[:, None]
        ctx = Context(q_slot=jnp.zeros((1,), jnp.int32), kv_valid=None, positions=positions, cache_index=None,
                      attend_cache=True, max_position=max_position)
        kv = [SlotLayerKV(k, v, pk, pv, pool.valid, pool.positions, members, slots.entry, slots.member, write_index)
              for k, v, pk, pv in zip(slots.own_k, slots.own_v, pool.k, pool.v)]
        hidden, kv = model.backbone(slots.last[:, None], ctx, kv)
        logits = model.unembed(hidden[:, 0])
        t = jnp.minimum(slots.t, steps - 1)
        token, logprob = _sample_step(logits, uniforms[t, jnp.maximum(slots.row, 0)], opts, params)
        out = write(out, slots.row, t, token, logprob, live)
        new_t = slots.t + live.astype(jnp.int32)
        done = slots.done | (live & (_is_eos(token, params.eos_token_ids) | (new_t >= steps)))
        slots = slots._replace(own_k=tuple(x.own_k for x in kv), own_v=tuple(x.own_v for x in kv), t=new_t,
                               last=jnp.where(live, token, slots.last), done=done)
        return step + 1, slots, out

    steps_run, slots, out = jax.lax.while_loop(cond, body, (jnp.int32(0), slots, out))
    return slots, out, steps_run


def _resize_impl(own_len: int, slots: Slots, keep):
    """The slots ``keep`` [S'] (-1: an empty slot) with completion caches of ``own_len`` tokens."""
    src = jnp.maximum(keep, 0)
    empty = keep < 0

    def cache(x, axis):  # the kept slots, the length axis cut or zero-padded to own_len
        x = jax.lax.slice_in_dim(x[src], 0, min(own_len, x.shape[axis]), axis=axis)
        pad = [(0, 0)] * x.ndim
        pad[axis] = (0, own_len - x.shape[axis])
        return jnp.pad(x, pad)

    return Slots(tuple(cache(x, 3) for x in slots.own_k), tuple(cache(x, 2) for x in slots.own_v),
                 jnp.where(empty, -1, slots.row[src]), slots.entry[src], slots.member[src], slots.t[src],
                 slots.last[src], jnp.where(empty, True, slots.done[src]))


@functools.lru_cache(maxsize=8)
def _programs(opts):
    """The engine's jitted programs for one option set (each compiles once per shape)."""
    donate_prefill = jax.jit(_prefill_impl, donate_argnums=(1,))
    decode = jax.jit(functools.partial(_decode_impl, opts), donate_argnums=(2, 3))
    resize = jax.jit(_resize_impl, static_argnums=(0,))  # new shapes: nothing to donate
    return donate_prefill, decode, resize


# ----------------------------------------------------------------------------- the host's schedule


class Schedule(NamedTuple):
    """What one decode chunk ran: its slots, completion-cache length and prompt-pool entries, the live
    rows and the longest of their lengths at its start, and its decode steps (``run`` lists them;
    tests check that the work follows the live rows)."""

    slots: int
    own_length: int
    pool_entries: int
    live_rows: int
    longest_row: int
    steps: int


def run(opts, model, prompt_ids, prompt_mask, uniforms, params, *, slots: int | None):
    """Sample every row of ``prompt_ids`` [B, P] through the slots (see the module docstring).

    Returns (tokens [N, T], mask [N, T], logprobs [N, T], the list of ``Schedule`` entries)."""
    num_prompts, prompt_len = prompt_ids.shape
    k, steps = opts.num_samples, opts.max_new_tokens
    n_rows = num_prompts * k
    max_slots = n_rows if slots is None else min(int(slots), n_rows)
    dtype = jnp.dtype(opts.cache_dtype) if opts.cache_dtype else model.unembedding_matrix().dtype
    n_entries = pool_entries(max_slots, k, num_prompts)
    own_cap = max(steps - 1, 1)  # the last token is never fed back
    prefill, decode, resize = _programs(opts)

    pool = _empty_pool(model, n_entries, prompt_len, dtype)
    state = _empty_slots(model, max_slots, bucket(1, own_cap), dtype)
    out = Outputs(jnp.full((n_rows, steps), params.pad_token_id, jnp.int32), jnp.zeros((n_rows, steps), jnp.float32),
                  jnp.zeros((n_rows,), jnp.int32))
    prompt_ids_host, prompt_mask_host = np.asarray(prompt_ids, np.int32), np.asarray(prompt_mask, np.int32)

    # Host mirrors of the small bookkeeping: each slot's row (-1: free), entry and tokens so far;
    # each pool entry's prompt (-1: free), the slots of its samples and how many have not ended.
    slot_row = np.full(max_slots, -1, np.int64)
    slot_entry = np.zeros(max_slots, np.int64)
    slot_t = np.zeros(max_slots, np.int64)
    members = np.full((n_entries, k), -1, np.int32)
    entry_prompt = np.full(n_entries, -1, np.int64)
    entry_left = np.zeros(n_entries, np.int64)
    prompt_entry: dict[int, int] = {}
    next_row = 0
    schedule: list[Schedule] = []

    def admissible() -> int:
        """Queued rows that could take a slot now: the rest of the prompt in admission (it holds an
        entry) and K rows for each free entry."""
        if next_row >= n_rows:
            return 0
        started = k - next_row % k if next_row // k in prompt_entry else 0
        return min(n_rows - next_row, started + k * int((entry_prompt < 0).sum()))

    while True:
        n_slots = len(slot_row)
        # Admit queued rows into free slots (a new prompt needs a free pool entry).
        admit = np.full((3, n_slots), -1, np.int32)
        new_prompts, new_entries = [], []
        for s in np.flatnonzero(slot_row < 0):
            if next_row >= n_rows:
                break
            prompt = next_row // k
            if prompt not in prompt_entry:
                free_entries = np.flatnonzero(entry_prompt < 0)
                if not len(free_entries):
                    break
                e = int(free_entries[0])
                prompt_entry[prompt], entry_prompt[e], entry_left[e] = e, prompt, k
                new_prompts.append(prompt)
                new_entries.append(e)
            e, j = prompt_entry[prompt], next_row % k
            admit[:, s] = (next_row, e, j)
            members[e, j] = s
            slot_row[s], slot_entry[s], slot_t[s] = next_row, e, 1
            next_row += 1
        if new_prompts:
            width = min(n_entries, 1 << (len(new_prompts) - 1).bit_length())
            pad = width - len(new_prompts)
            rows = np.array(new_prompts + [new_prompts[-1]] * pad)
            entries = np.array(new_entries + [n_entries] * pad, np.int32)
            pool = prefill(model, pool, prompt_ids_host[rows], prompt_mask_host[rows], entries)
        live = slot_row >= 0
        if not live.any():  # nothing decoding, so every entry is free: the queue is empty too
            break
        free = int((~live).sum())
        # Stop for the host once an eighth of the slots (at least one) is free while rows could
        # take them; else once half the slots are free (the live rows then move into fewer slots).
        own_len = state.own_v[0].shape[2]
        if next_row < n_rows:
            stop_free = free + max(1, n_slots // 8)
        else:
            stop_free = n_slots - n_slots // 2 if n_slots > slot_floor(own_len) else n_slots + 1
        chunk = (n_slots, own_len, n_entries, int(live.sum()), int(slot_t[live].max()))
        state, out, steps_run = decode(model, pool, state, out, uniforms, params, tuple(map(jnp.asarray, admit)),
                                       jnp.asarray(members), np.int32(stop_free))
        t, done, steps_run = jax.device_get((state.t, state.done, steps_run))
        schedule.append(Schedule(*chunk, int(steps_run)))
        slot_t = np.asarray(t, np.int64)
        for s in np.flatnonzero((slot_row >= 0) & np.asarray(done)):  # retire the rows that ended
            e = int(slot_entry[s])
            members[e, slot_row[s] % k] = -1
            entry_left[e] -= 1
            if entry_left[e] == 0:
                del prompt_entry[int(entry_prompt[e])]
                entry_prompt[e] = -1
            slot_row[s] = -1
        live = slot_row >= 0
        if not live.any() and next_row >= n_rows:
            break
        # Resize to the work that exists: the cache to the longest live row (a power of two, at
        # most 2x its length), the slots to the live rows and those that can be admitted now.
        new_len = bucket(int(slot_t[live].max(initial=1)), own_cap)
        n_new = slot_count(int(live.sum()) + admissible(), max_slots, floor=slot_floor(new_len))
        if new_len != own_len or n_new != n_slots:
            keep = np.full(n_new, -1, np.int32)
            if n_new < n_slots:  # the live slots, packed to the front
                keep[:live.sum()] = np.flatnonzero(live)
            else:  # every slot where it is, new ones free
                keep[:n_slots] = np.arange(n_slots)
            state = resize(new_len, state, jnp.asarray(keep))
            remap = np.full(n_slots, -1, np.int32)
            remap[keep[keep >= 0]] = np.flatnonzero(keep >= 0)
            members = np.where(members >= 0, remap[np.maximum(members, 0)], -1).astype(np.int32)
            src = np.maximum(keep, 0)
            slot_row = np.where(keep >= 0, slot_row[src], -1)
            slot_entry, slot_t = slot_entry[src], np.where(keep >= 0, slot_t[src], 0)

    mask = (jnp.arange(steps)[None, :] < out.length[:, None]).astype(jnp.int32)
    return out.tokens, mask, out.logprobs, schedule


def check_slots(slots, num_samples: int) -> int | None:
    """``slots`` checked: None (every row at once) or an integer >= ``num_samples``."""
    if slots is None:
        return None
    if isinstance(slots, bool) or not isinstance(slots, (int, np.integer)) or slots < num_samples:
        raise UserError(f"slots: got {slots!r}, expected an integer >= num_samples ({num_samples}): "
                        "the rows decoding at once, at least one prompt's samples")
    return int(slots)
