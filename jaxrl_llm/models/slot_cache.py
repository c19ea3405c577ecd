"""The rollout engine's KV cache for one layer: prompts stored once, each slot's own tokens apart.

A decode step of the engine (``jaxrl_llm.rollout.engine``) feeds one token per slot. Its keys and
values are written into the slot's own cache at the slot's own index, and the query attends to
two parts, merged by their log-sum-exp (cascade attention, as FlashInfer's shared-prefix decode):

  * the prompt part, ``pool_k/pool_v`` [M, K, P, Dh]: one entry per prompt in flight, shared by the
    samples of that prompt. ``members`` [M, R] lists the slots holding each entry's samples (-1
    where none), so the queries of one prompt's samples are gathered (small: [R, H, Dh]) and meet
    the prompt's keys in ONE read of them, not one read per sample;
  * the own part, ``own_k`` [S, K, Dh, Lc] and ``own_v`` [S, K, Lc, Dh]: slot s's completion
    tokens, valid at ``0..write_index[s]`` after this step's write. Lc is a length bucket the
    engine resizes to the longest live row, so the work follows the tokens that exist, not
    ``max_new_tokens``. The keys are stored transposed: the score of one query against Lc keys
    is then a matrix-vector product that reads the keys contiguously (XLA:CPU streams it at the
    memory's bandwidth; with Dh innermost it reaches about 60% of it).

The merge is exact: with m = max(m_p, m_o), out = (o_p e^(m_p-m) + o_o e^(m_o-m)) / (l_p e^(m_p-m)
+ l_o e^(m_o-m)), which is the softmax over the concatenated keys.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

# Finite, as ``layers._MASK_VALUE``: a part whose keys are all masked gets weight e^(-huge) = 0.
_MASK_VALUE = -1e30


class SlotLayerKV(NamedTuple):
    """One layer's engine cache and the bookkeeping of the step (see the module docstring).

    own_k: [S, K, Dh, Lc], own_v: [S, K, Lc, Dh] each slot's completion keys (transposed) and values.
    pool_k, pool_v: [M, K, P, Dh] each prompt entry's keys/values.
    pool_valid: [M, P] bool, real prompt tokens; pool_positions: [M, P] int32 their positions.
    members: [M, R] int32, the slot of each entry's r-th sample (-1: none in flight).
    slot_entry, slot_member: [S] int32, each slot's entry and its index r in ``members``.
    write_index: [S] int32, the own slot this step's token is written to (its completion index).
    """

    own_k: jax.Array
    own_v: jax.Array
    pool_k: jax.Array
    pool_v: jax.Array
    pool_valid: jax.Array
    pool_positions: jax.Array
    members: jax.Array
    slot_entry: jax.Array
    slot_member: jax.Array
    write_index: jax.Array


def slot_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv: SlotLayerKV, positions: jax.Array, *,
                   scale: float, sliding_window: int | None = None, softcap: float | None = None):
    """One decode step: q [S, 1, H, Dh], the new k, v [S, 1, K, Dh] (RoPE applied), positions [S, 1].

    Attends to [its prompt] + [its own tokens before this one] + [this token] (the rule of
    ``layers.dot_product_attention``: a sliding window counts positions), writes k, v into each
    slot's own cache at ``kv.write_index``, and returns (out [S, 1, H, Dh] in q's dtype, the
    updated ``SlotLayerKV``). The new token is a part of its own, so the cache is read before it is
    written: its only consumer after the write is the loop's carry, and XLA updates it in place
    (reading the written cache too makes XLA copy the whole cache every step).
    """
    slots, _, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = heads // kv_heads
    qg = q[:, 0].reshape(slots, kv_heads, groups, head_dim)
    q_position = positions[:, 0]
    scale = jnp.asarray(scale, q.dtype)
    # The new key/value as the cache will hold them (its dtype), as the one-loop sampler reads them.
    k_new = k[:, 0].astype(kv.own_k.dtype)  # [S, K, Dh]
    v_new = v[:, 0].astype(kv.own_v.dtype)

    def finish(scores, allowed):  # -> (max, sum of exp, probs unnormalised) over the last axis
        scores = scores.astype(jnp.float32)
        if softcap is not None:
            scores = jnp.tanh(scores / softcap) * softcap
        scores = jnp.where(allowed, scores, _MASK_VALUE)
        top = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - top)
        return top[..., 0], jnp.sum(weights, axis=-1), weights

    # The own part, the tokens before this one: [S, K, G, Lc].
    own_len = kv.own_v.shape[2]
    j = jnp.arange(own_len)
    own_allowed = j[None, :] < kv.write_index[:, None]
    if sliding_window is not None:  # own token j sits at position q_position - (write_index - j)
        own_allowed &= j[None, :] > kv.write_index[:, None] - sliding_window
    own_scores = jnp.einsum("skgd,skdt->skgt", qg, kv.own_k.astype(q.dtype)) * scale
    own_max, own_sum, own_w = finish(own_scores, own_allowed[:, None, None, :])
    own_out = jnp.einsum("skgt,sktd->skgd", own_w.astype(v.dtype), kv.own_v.astype(v.dtype)).astype(jnp.float32)

    # This token: [S, K, G], always allowed (weight exp(score - score) = 1).
    self_scores = jnp.einsum("skgd,skd->skg", qg, k_new.astype(q.dtype)) * scale
    self_max, self_sum, _ = finish(self_scores[..., None], True)
    self_out = jnp.broadcast_to(v_new.astype(jnp.float32)[:, :, None, :], own_out.shape)

    # The prompt part, one read of each entry's keys for all its samples: [M, R, K, G, P].
    member_slot = jnp.maximum(kv.members, 0)
    qm = qg[member_slot]  # [M, R, K, G, Dh]
    pool_allowed = kv.pool_valid[:, None, :]  # [M, 1, P]
    if sliding_window is not None:
        qm_position = q_position[member_slot]  # [M, R]
        pool_allowed = pool_allowed & (kv.pool_positions[:, None, :] > qm_position[:, :, None] - sliding_window)
    pool_scores = jnp.einsum("mrkgd,mkpd->mrkgp", qm, kv.pool_k.astype(q.dtype)) * scale
    pool_max, pool_sum, pool_w = finish(pool_scores, pool_allowed[:, :, None, None, :])
    pool_out = jnp.einsum("mrkgp,mkpd->mrkgd", pool_w.astype(v.dtype), kv.pool_v.astype(v.dtype)).astype(jnp.float32)
    # Back to slots (small arrays: [S, K, G] and [S, K, G, Dh]).
    take = lambda x: x[kv.slot_entry, kv.slot_member]  # noqa: E731
    pool_max, pool_sum, pool_out = take(pool_max), take(pool_sum), take(pool_out)

    parts = ((own_max, own_sum, own_out), (self_max, self_sum, self_out), (pool_max, pool_sum, pool_out))
    top = jnp.maximum(jnp.maximum(own_max, self_max), pool_max)
    total = sum(part_sum * jnp.exp(part_max - top) for part_max, part_sum, _ in parts)
    out = sum(part_out * jnp.exp(part_max - top)[..., None] for part_max, _, part_out in parts) / total[..., None]

    # Write the new token (a free slot, write_index = Lc, writes its own last index instead:
    # nothing reads a free slot, and a row admitted later masks it until it overwrites it).
    # The barrier orders the write after the reads above; else XLA may schedule it first and copy
    # the cache to keep the old one for them.
    out, own_k, own_v = jax.lax.optimization_barrier((out, kv.own_k, kv.own_v))
    rows, index = jnp.arange(slots), jnp.minimum(kv.write_index, own_len - 1)
    own_k = own_k.at[rows, :, :, index].set(k_new, mode="promise_in_bounds")
    own_v = own_v.at[rows, :, index].set(v_new, mode="promise_in_bounds")
    return out.reshape(slots, 1, heads, head_dim).astype(q.dtype), kv._replace(own_k=own_k, own_v=own_v)
