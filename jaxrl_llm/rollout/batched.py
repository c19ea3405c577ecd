"""The sampler over a whole batch of prompt rows: padded to a few fixed widths, generated
`micro_batch_size` sequences at a time on a device mesh, and returned on the host as numpy
(with several processes, every process gets every row). `sample_episode_rows` does the same
for multi-turn episodes (`rollout.episodes`), one environment per row."""

from __future__ import annotations

import jax
import numpy as np

from jaxrl_llm import parallel
from jaxrl_llm.parallel import distributed
from jaxrl_llm.rollout.episodes import Episodes, sample_episodes
from jaxrl_llm.rollout.padding import bucket_width, left_pad
from jaxrl_llm.rollout.sampler import generate


def prompt_parts(rows, *, num_samples: int, micro_batch_size: int | None, prompt_limit: int | None,
                 pad_token_id: int):
    """`(first prompt, ids, mask)` of each call: the prompts left-padded to one of a few fixed
    widths (powers of two from 16, capped at the prompt limit: steps compile a few times), in
    parts of `micro_batch_size` sequences (None: one part)."""
    width = bucket_width(max(map(len, rows)), limit=prompt_limit)
    ids, mask = left_pad(rows, width, pad_token_id)
    prompts_per_call = len(rows) if micro_batch_size is None else max(micro_batch_size // num_samples, 1)
    for start in range(0, len(rows), prompts_per_call):
        yield start, ids[start:start + prompts_per_call], mask[start:start + prompts_per_call]


def sample_rows(policy, rows, key, *, mesh, num_samples: int, temperature: float, max_new_tokens: int,
                micro_batch_size: int | None, top_k: int, top_p: float, prompt_limit: int | None, pad_token_id: int,
                eos_ids, cache_dtype=None, slots: int | None = None):
    """K completions of each prompt (token rows), `micro_batch_size` sequences at a time (None:
    all at once). Each completion's randomness is keyed by its row in the whole batch
    (`row_offset`), so the micro-batch size changes memory, never the completions. `top_k` and
    `top_p` apply only when sampling (`temperature` > 0); `slots`: the rollout engine's rows decoding
    at once on one device (None: every row of a call)."""
    parts = []
    for start, *part in prompt_parts(rows, num_samples=num_samples, micro_batch_size=micro_batch_size,
                                     prompt_limit=prompt_limit, pad_token_id=pad_token_id):
        count = len(part[0])
        if count % mesh.size and jax.process_count() > 1:
            # Several processes sample on the global mesh only: repeat the last prompt up to a
            # multiple of its devices (dropped below). One process keeps the rows as they are.
            extra = mesh.size - count % mesh.size
            part = tuple(np.concatenate([x, np.repeat(x[-1:], extra, axis=0)]) for x in part)
        if len(part[0]) % mesh.size == 0:
            part = jax.device_put(tuple(part), parallel.batch_sharding(mesh))
        out = generate(
            policy, *part, max_new_tokens=max_new_tokens, rng=key, row_offset=start * num_samples,
            num_samples=num_samples, temperature=temperature, top_k=top_k if temperature else 0,
            top_p=top_p if temperature else 1.0, eos_token_id=sorted(eos_ids),
            pad_token_id=pad_token_id, cache_dtype=cache_dtype,
            slots=slots)
        # On the host, as numpy: with several processes, each one's rows gathered to all.
        parts.append(jax.tree.map(lambda x: distributed.to_host(x)[:count * num_samples], out))
    if len(parts) == 1:
        return parts[0]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def sample_episode_rows(policy, rows, environments, key, *, mesh, num_samples: int, temperature: float,
                        max_new_tokens: int, max_turns: int, max_total_tokens: int, micro_batch_size: int | None,
                        top_k: int, top_p: float, prompt_limit: int | None, pad_token_id: int, eos_ids,
                        stop_sequences, decode, encode_observation, cache_dtype=None, stop_strings=()) -> Episodes:
    """`sample_rows` for multi-turn episodes: `environments` holds one environment per sequence
    (prompt-major); one process (environments are Python objects of this process)."""
    parts = []
    for start, ids, mask in prompt_parts(rows, num_samples=num_samples, micro_batch_size=micro_batch_size,
                                         prompt_limit=prompt_limit, pad_token_id=pad_token_id):
        first, count = start * num_samples, len(ids) * num_samples
        parts.append(sample_episodes(
            policy, ids, mask, environments[first:first + count], decode=decode,
            encode_observation=encode_observation, max_turns=max_turns, max_total_tokens=max_total_tokens,
            max_new_tokens=max_new_tokens, rng=key, num_samples=num_samples, temperature=temperature,
            top_k=top_k if temperature else 0, top_p=top_p if temperature else 1.0, eos_token_id=sorted(eos_ids),
            stop_sequences=stop_sequences, stop_strings=stop_strings, pad_token_id=pad_token_id,
            cache_dtype=cache_dtype, row_offset=first, mesh=mesh))
    if len(parts) == 1:
        return parts[0]
    return Episodes(jax.tree.map(lambda *xs: np.concatenate(xs), *[p.rollout for p in parts]),
                    *(np.concatenate([getattr(p, f) for p in parts]) for f in ("turns", "finished",
                                                                                 "truncated_observations")),
                    [segments for p in parts for segments in p.segments])


__all__ = ["prompt_parts", "sample_episode_rows", "sample_rows"]
