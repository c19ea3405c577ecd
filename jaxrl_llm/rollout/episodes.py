"""Multi-turn episodes: the policy's turns interleaved with an environment's observations, over
one KV cache that is continued, never recomputed.

    prompt ─► prefill ─► decode a turn ─► (host) env.step(turn text) ─► observation tokens
           ─► append them to the cache (a prefill of the new tokens) ─► decode the next turn ─► ...

Each row of the batch is one episode with its own environment. A turn ends at a stop token (an
EOS id), at the end of a stop sequence (e.g. ``</call>``), after ``max_new_tokens`` tokens, or when
the episode's ``max_total_tokens`` are used up. The environment then reads the turn's text and
answers with an observation, or with None: the episode is over. Rows at different lengths and
rows already over share the batch: a row that is over (or waits) feeds masked-out tokens that no
other token ever attends to.

Everything runs in two compiled functions with static shapes: ``start`` (prefill + first turn)
and ``resume`` (append an observation block + next turn), compiled once per observation block
width (powers of two). Between turns the cache is compacted (each row's real tokens moved to the
front, in order), so it never needs more than P + 2T + 1 slots however the rows' turns interleave.
Positions count real tokens, and sliding windows are measured in positions (the cache keeps
each slot's), so a token's position, and what it attends to, are those of the same token in one
forward pass over the whole transcript, however many empty slots the shared write index leaves
in a shorter row: the sampled log-probabilities of the policy's tokens equal the training
forward's.

The completion region of the result ([N, T], T = ``max_total_tokens``) holds the transcript
contiguously: policy tokens (``mask`` 1) and observation tokens (``observation_mask`` 1, ``mask``
0: in the context, never trained on), then padding.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxrl_llm.errors import UserError
from jaxrl_llm.rollout.padding import bucket_width
from jaxrl_llm.rollout.sampler import (Rollout, _is_eos, _Options, _sample_step, _Sampling, check_sampling_arguments,
                                       prefill, row_uniforms)

# Stop-sequence table entries: -1 matches any token (a shorter sequence, right-aligned), -2 is a
# row of no sequence and matches nothing (recent tokens start at -3, real tokens are >= 0).
_ANY, _NONE, _NOTHING_YET = -1, -2, -3


class Episodes(NamedTuple):
    """A batch of multi-turn episodes, on the host (numpy).

    Attributes:
      rollout: the transcripts as a ``Rollout``: ``tokens`` [N, T] policy and observation tokens,
        ``mask`` 1 on the policy's, ``observation_mask`` 1 on the environment's, ``logprobs`` the
        sampling log-probabilities of the policy's tokens (0 elsewhere).
      turns: [N] policy turns taken.
      finished: [N] bool, the environment ended the episode (``step`` returned None) after a turn
        that ended with a stop token; False when the token budget, ``max_new_tokens`` or
        ``max_turns`` cut it.
      truncated_observations: [N] observations cut short (or dropped) for the token budget.
      segments: per row, the transcript's parts in order, ``(role, start, end)`` columns of the
        completion region, role ``"policy"`` or ``"environment"``.
    """

    rollout: Rollout
    turns: np.ndarray
    finished: np.ndarray
    truncated_observations: np.ndarray
    segments: list[list[tuple[str, int, int]]]


class _EpisodeOptions(NamedTuple):
    """Static options of the compiled episode functions."""

    sampling: _Options  # max_new_tokens: the most tokens of one policy turn
    total_tokens: int  # T, the completion region (policy + observation tokens)
    cache_length: int


# ----------------------------------------------------------------------------- compiled parts


def compact_cache(cache):
    """Each row's real (valid) slots moved to the front in order, the next write slot after the
    longest row's. Positions count real tokens and RoPE is already applied to the cached keys,
    so nothing a later token computes changes."""
    order = jnp.argsort(~cache.valid, axis=1, stable=True)
    gather = lambda x: jnp.take_along_axis(x, order[:, None, :, None], axis=2)  # noqa: E731  [B, K, L, Dh]
    valid = jnp.take_along_axis(cache.valid, order, axis=1)
    positions = jnp.take_along_axis(cache.positions, order, axis=1)
    index = jnp.max(jnp.sum(valid, axis=1, dtype=jnp.int32))
    return cache._replace(k=tuple(map(gather, cache.k)), v=tuple(map(gather, cache.v)), valid=valid, index=index,
                          positions=positions)


def _decode_turn(eo: _EpisodeOptions, model, cache, logits, tokens, mask, logprobs, length, in_turn, uniforms,
                 params: _Sampling, stop_sequences):
    """Sample one turn for the rows `in_turn`, from their next-token `logits`: each row writes its
    tokens at its own length and stops at a stop token or sequence, its turn limit or the budget."""
    opts, total = eo.sampling, eo.total_tokens
    n = tokens.shape[0]
    rows = jnp.arange(n)

    def sample_and_write(logits, state):
        tokens, mask, logprobs, length, turn_length, recent, done, last = state
        uniform = uniforms[jnp.minimum(length, total - 1), rows]  # each row's draw at its own position
        new, new_lp = _sample_step(logits, uniform, opts, params)
        write = ~done
        column = jnp.where(write, length, total)  # out of range: dropped
        tokens = tokens.at[rows, column].set(new, mode="drop")
        logprobs = logprobs.at[rows, column].set(new_lp, mode="drop")
        mask = mask.at[rows, column].set(1, mode="drop")
        length, turn_length = length + write, turn_length + write
        recent = jnp.where(write[:, None], jnp.concatenate([recent[:, 1:], new[:, None]], axis=1), recent)
        matches = (stop_sequences[None] == _ANY) | (stop_sequences[None] == recent[:, None])
        stop = _is_eos(new, params.eos_token_ids) | jnp.any(jnp.all(matches, axis=-1), axis=-1)
        done = done | (write & (stop | (length >= total) | (turn_length >= opts.max_new_tokens)))
        return tokens, mask, logprobs, length, turn_length, recent, done, jnp.where(write, new, last)

    zeros = jnp.zeros((n,), jnp.int32)
    recent = jnp.full((n, stop_sequences.shape[1]), _NOTHING_YET, jnp.int32)
    state = sample_and_write(logits, (tokens, mask, logprobs, length, zeros, recent, ~in_turn | (length >= total),
                                      zeros))

    def cond(carry):
        step, _, state = carry
        return (step < opts.max_new_tokens) & ~jnp.all(state[6])

    def body(carry):
        step, cache, state = carry
        done, last = state[6], state[7]
        # Rows whose turn is over feed a masked-out slot: nothing attends to it.
        hidden, cache = model.hidden_states(last[:, None], (~done)[:, None].astype(jnp.int32), None, cache)
        return step + 1, cache, sample_and_write(model.unembed(hidden[:, 0]), state)

    _, cache, state = jax.lax.while_loop(cond, body, (jnp.int32(1), cache, state))
    tokens, mask, logprobs, length = state[:4]
    return cache, tokens, mask, logprobs, length


def _start(eo: _EpisodeOptions, model, prompt_ids, prompt_mask, uniforms, params: _Sampling, stop_sequences):
    """Prefill the prompts (each once, copied to its K rows) and sample every row's first turn."""
    prompt_ids, prompt_mask = prompt_ids.astype(jnp.int32), prompt_mask.astype(jnp.int32)
    logits, cache = prefill(model, prompt_ids, prompt_mask, eo.cache_length, eo.sampling)
    n, total = logits.shape[0], eo.total_tokens
    tokens = jnp.full((n, total), params.pad_token_id, jnp.int32)
    mask, logprobs = jnp.zeros((n, total), jnp.int32), jnp.zeros((n, total), jnp.float32)
    return _decode_turn(eo, model, cache, logits, tokens, mask, logprobs, jnp.zeros((n,), jnp.int32),
                        jnp.ones((n,), bool), uniforms, params, stop_sequences)


def _resume(eo: _EpisodeOptions, model, cache, block_ids, block_mask, tokens, mask, logprobs, length, in_turn,
            keep_below, uniforms, params: _Sampling, stop_sequences):
    """Append each continuing row's observation block (its last sampled token, not yet in the
    cache, then the observation, left-padded) and sample the rows' next turn. A row's cached
    tokens at positions >= `keep_below` [N] leave the cache first (a turn cut at a stop string)."""
    cache = cache._replace(valid=cache.valid & (cache.positions < keep_below[:, None]))
    cache = compact_cache(cache)
    hidden, cache = model.hidden_states(block_ids, block_mask, None, cache, last_position_only=True)
    logits = model.unembed(hidden[:, -1])
    cache = compact_cache(cache)
    return _decode_turn(eo, model, cache, logits, tokens, mask, logprobs, length, in_turn, uniforms, params,
                        stop_sequences)


@functools.lru_cache(maxsize=32)
def _compiled(eo: _EpisodeOptions):
    start = jax.jit(functools.partial(_start, eo))
    resume = jax.jit(functools.partial(_resume, eo), donate_argnums=(1,))
    uniforms = jax.jit(row_uniforms, static_argnums=2)
    return start, resume, uniforms


# ----------------------------------------------------------------------------- the host loop


def sample_episodes(
    model,
    prompt_ids,
    prompt_mask,
    environments: Sequence[Any],
    *,
    decode: Callable[[list[int]], str],
    encode_observation: Callable[[Any], list[int]],
    max_turns: int,
    max_total_tokens: int,
    max_new_tokens: int,
    rng: jax.Array,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | Sequence[int] | None,
    stop_sequences: Sequence[Sequence[int]] = (),
    stop_strings: Sequence[str] = (),
    pad_token_id: int = 0,
    cache_dtype=None,
    row_offset: int = 0,
    mesh=None,
) -> Episodes:
    """Sample one multi-turn episode per row: ``num_samples`` per prompt, each with its environment.

    Each policy turn is sampled as ``generate`` samples a completion (same temperature, top-k /
    top-p and per-row randomness: the draw of completion position t of row r comes from
    ``fold_in(rng, row_offset + r)`` alone). After each turn, the row's environment gets the
    turn's text, ``environments[r].step(text)``, and answers with an observation (appended to the
    transcript and the cache) or None (the episode is over).

    Args:
      model: a ``jaxrl_llm.models.CausalLM``.
      prompt_ids, prompt_mask: [B, P] left-padded prompts, as for ``generate``.
      environments: N = B*K objects with ``step(text) -> observation | None``, prompt-major.
      decode: token ids of one turn -> its text (e.g. ``tokenizer.decode(ids, skip_special_tokens=True)``).
      encode_observation: an observation -> its token ids.
      max_turns: >= 1 policy turns per episode; after the last one an observation is not appended.
      max_total_tokens: T, the episode's tokens after the prompt (policy and observation); an
        observation that does not fit the rest (leaving one token for the policy) is truncated.
      max_new_tokens: the most tokens of one policy turn.
      rng, num_samples, temperature, top_k, top_p, eos_token_id, pad_token_id, cache_dtype,
        row_offset: as for ``generate``; an EOS id ends a turn.
      stop_sequences: token-id sequences that also end a turn once sampled, on the device.
      stop_strings: texts that end a turn once its decoded text contains one (e.g. ``</call>``),
        matched on the text as transformers' ``stop_strings`` and vLLM's ``stop`` are: in context
        a stop string may be tokenized otherwise than alone (a merge with the characters before
        it, a SentencePiece space), so no id sequence catches it surely. A turn whose text
        reaches one is cut after the token that completes it: the tokens sampled after it leave
        the transcript and the cache before anything reads them. Give the string's ids alone in
        ``stop_sequences`` too, so that the common case stops the loop at once.
      mesh: a ``jax.sharding.Mesh`` to split the rows over (its size must divide B; else one
        device): each device's rows are compiled for it, and no row reads another's.
    Returns:
      ``Episodes``.
    """
    total = _positive_int("max_total_tokens", max_total_tokens)
    max_turns = _positive_int("max_turns", max_turns)
    checked = check_sampling_arguments(dict(
        model=model, prompt_ids=prompt_ids, prompt_mask=prompt_mask, max_new_tokens=max_new_tokens, rng=rng,
        num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, cache_dtype=cache_dtype, mesh=None, row_offset=row_offset))
    n = checked.prompt_ids.shape[0] * checked.opts.num_samples
    if len(environments) != n:
        raise UserError(f"environments: got {len(environments)}, expected one per episode, {n} "
                        f"(prompts x num_samples)")
    stops = _stop_table(stop_sequences)
    opts = checked.opts._replace(max_new_tokens=min(checked.opts.max_new_tokens, total))
    eo = _EpisodeOptions(opts, total, checked.prompt_ids.shape[1] + 2 * total + 1)
    start, resume, draw = _compiled(eo)
    put_rows = put_columns = lambda x: x  # noqa: E731
    if mesh is not None and mesh.size > 1 and checked.prompt_ids.shape[0] % mesh.size == 0:
        put_rows = functools.partial(jax.device_put, device=NamedSharding(mesh, P(mesh.axis_names)))
        put_columns = functools.partial(jax.device_put, device=NamedSharding(mesh, P(None, mesh.axis_names)))
    uniforms = put_columns(draw(checked.rng, checked.params.row_offset + np.arange(n, dtype=np.int32), total))
    params = checked.params
    stop_ids = [tuple(s) for s in stop_sequences] + [(int(e),) for e in params.eos_token_ids if e >= 0]

    cache, *buffers = start(model, put_rows(checked.prompt_ids), put_rows(checked.prompt_mask), uniforms, params,
                            stops)
    # A completion token at column c sits at position (real prompt tokens) + c.
    prompt_tokens = np.repeat(np.asarray(checked.prompt_mask).sum(-1), checked.opts.num_samples).astype(np.int32)
    stop_strings = [_check_stop_string(text) for text in stop_strings]
    observation = np.zeros((n, total), np.int32)
    turns, finished = np.ones(n, np.int64), np.zeros(n, bool)
    truncated = np.zeros(n, np.int64)
    segments: list[list[tuple[str, int, int]]] = [[] for _ in range(n)]
    turn_start = np.zeros(n, np.int64)
    active = np.ones(n, bool)
    for turn in range(1, max_turns + 1):
        tokens, mask, logprobs, length = (np.array(x) for x in jax.device_get(buffers))
        blocks: dict[int, list[int]] = {}
        keep_below = np.full(n, np.iinfo(np.int32).max, np.int32)
        for r in np.flatnonzero(active):
            end = int(length[r])
            turn_ids = tokens[r, turn_start[r]:end].tolist()
            cut = _stop_string_end(turn_ids, decode, stop_strings)
            if cut is not None and cut < len(turn_ids):  # the text stopped before the tokens did
                end = int(turn_start[r]) + cut
                tokens[r, end:length[r]], mask[r, end:length[r]], logprobs[r, end:length[r]] = params.pad_token_id, 0, 0
                turn_ids, length[r] = turn_ids[:cut], end
                # The turn's new last token is cached: it leaves the cache with what follows it,
                # and is fed again at the head of the next block, as every turn's last token is.
                keep_below[r] = prompt_tokens[r] + end - 1
            segments[r].append(("policy", int(turn_start[r]), end))
            text = decode(turn_ids)
            try:
                answer = environments[r].step(text)
            except Exception as err:  # the environment's bug, named (a tool's error is its observation)
                raise UserError(f"environments[{r}]: {type(environments[r]).__name__}.step raised "
                                f"{type(err).__name__}: {err} on the turn {text!r}") from err
            if answer is None:  # the environment ended the episode
                active[r] = False
                finished[r] = cut == len(turn_ids) or any(turn_ids[-len(s):] == list(s) for s in stop_ids
                                                          if len(s) <= len(turn_ids))
                continue
            ids = [int(i) for i in encode_observation(answer)]
            room = total - end - 1  # one token at least is left for the policy's reply
            if turn == max_turns or room < 1:
                active[r] = False  # cut: no turn left, or no room
                truncated[r] += turn < max_turns
                continue
            if len(ids) > room:
                ids, truncated[r] = ids[:room], truncated[r] + 1
            tokens[r, end:end + len(ids)] = ids
            observation[r, end:end + len(ids)] = 1
            segments[r].append(("environment", end, end + len(ids)))
            blocks[r] = [int(tokens[r, end - 1])] + ids  # the turn's last token is not in the cache yet
            length[r] = turn_start[r] = end + len(ids)
        if not blocks:
            break
        width = min(bucket_width(max(map(len, blocks.values())), minimum=4), total + 1)
        block_ids = np.full((n, width), params.pad_token_id, np.int32)
        block_mask = np.zeros((n, width), np.int32)
        for r, ids in blocks.items():
            block_ids[r, width - len(ids):], block_mask[r, width - len(ids):] = ids, 1
        in_turn = np.zeros(n, bool)
        in_turn[list(blocks)] = True
        turns += in_turn
        cache, *buffers = resume(model, cache, *map(put_rows, (block_ids, block_mask, tokens, mask, logprobs, length,
                                                                in_turn, keep_below)), uniforms, params, stops)
    # The last turn always ends the loop above (no observation is appended after it).
    k = checked.opts.num_samples
    rollout = Rollout(tokens=tokens, mask=mask, logprobs=logprobs,
                      prompt_ids=np.repeat(np.asarray(checked.prompt_ids), k, axis=0).astype(np.int32),
                      prompt_mask=np.repeat(np.asarray(checked.prompt_mask), k, axis=0).astype(np.int32),
                      temperature=checked.temperature, num_samples=k, observation_mask=observation)
    if checked.temperature > 0:
        rollout = rollout.replace(top_k=int(top_k), top_p=float(top_p))
    return Episodes(rollout, turns, finished, truncated, segments)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserError(f"{name}: got {value!r}, expected an integer >= 1")
    return int(value)


def _check_stop_string(text) -> str:
    if not isinstance(text, str) or not text:
        raise UserError(f"stop_strings: got {text!r}, expected non-empty strings")
    return text


def _stop_string_end(turn_ids: list[int], decode, stop_strings) -> int | None:
    """The fewest leading tokens of a turn whose decoded text contains a stop string (None: the
    whole turn's text contains none). A prefix's text grows with the prefix, so a binary search
    finds it in log2(turn length) decodes."""
    contains = lambda ids: any(s in decode(ids) for s in stop_strings)  # noqa: E731
    if not stop_strings or not turn_ids or not contains(turn_ids):
        return None
    low, high = 1, len(turn_ids)
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if contains(turn_ids[:middle]) else (middle + 1, high)
    return low


def _stop_table(stop_sequences) -> np.ndarray:
    """[S, W] int32 stop sequences right-aligned (-1: any token), at least one row."""
    sequences = []
    for sequence in stop_sequences:
        ids = list(sequence) if not isinstance(sequence, (int, np.integer)) else None
        if not ids or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise UserError(f"stop_sequences: got {sequence!r}, expected a non-empty list of token ids >= 0")
        sequences.append([int(i) for i in ids])
    width = max([len(s) for s in sequences], default=1)
    table = np.full((max(len(sequences), 1), width), _NONE, np.int32)
    for i, s in enumerate(sequences):
        table[i] = [_ANY] * (width - len(s)) + s
    return table


__all__ = ["Episodes", "compact_cache", "sample_episodes"]
