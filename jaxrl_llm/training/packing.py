"""Packed sequences (`train.packing`): the forward and backward passes pay for the tokens that exist.

Unpacked, every training row is `prompt_width + max_new_tokens` long whatever the completion's
length. Packed, each sequence (its prompt's real tokens, then its completion up to and including
the stop token) is placed whole in a row of `pack_length` tokens beside others, told apart by
segment ids: attention stays inside a segment and positions restart at 0 with each one
(`models.layers.make_context`), so every sequence computes exactly what it computes alone.
Only the positions that predict a real completion token go through the unembedding
(`token_index`), and their log-probabilities, entropies and values are put back in the
`[n, T]` layout every objective reads (`token_source`); positions after the stop token are 0
there, which no objective reads (their mask is 0). Padding of prompts and completions never
reaches the model. The sampler is untouched.

The plan is made on the host from the lengths, once per step for `prepare` and once per
minibatch, micro-batch by micro-batch in the order `split_micro_batches` gives. Its shapes are
static for `jit`: the rows per micro-batch and the completion tokens per micro-batch are rounded
up to a few values per octave (`bucket`), and `pack_length` is the longest sequence rounded up to
a power of two, so a run compiles a handful of programs, not one per step (verl's
`use_remove_padding`, OpenRLHF's `--packing_samples` and Tunix's packing do the same job).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrl_llm.errors import UserError
from jaxrl_llm.parallel import distributed
from jaxrl_llm.parallel.mesh import BATCH_AXES, replicated


class PackedLayout(NamedTuple):
    """Where the sequences of each micro-batch sit in packed rows; every array has a leading
    micro-batch axis M (1 without micro-batches). n sequences of T completion slots per
    micro-batch, R rows of L tokens, C completion tokens (padded entries included).

    ids: [M, R, L] int32 tokens; segment_ids: [M, R, L] int32, sequence j of the row is j + 1, 0 padding.
    token_index: [M, C] int32, flat index into R * L of the position that predicts each completion token.
    token_source: [M, C] int32, flat index into n * T of that token; n * T for a padded entry.
    """

    ids: np.ndarray
    segment_ids: np.ndarray
    token_index: np.ndarray
    token_source: np.ndarray

    def micro_batch(self, m: int) -> PackedLayout:
        return PackedLayout(*(x[m] for x in self))


def bucket(count: int) -> int:
    """`count` rounded up to a value with at most 3 significant bits (4 per octave: 8, 10, 12, 14,
    16, 20, ...): at most 25% padding, and few distinct shapes for `jit`."""
    if count <= 4:
        return max(count, 1)
    step = 1 << (count.bit_length() - 3)
    return -(-count // step) * step


def sequence_lengths(prompt_mask: np.ndarray, completion_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(prompt_lengths [N], completion_lengths [N])`: real prompt tokens, and completion slots up to
    the last one with mask 1 (the stop token when there is one; 0 for a row with none)."""
    prompt_lengths = np.asarray(prompt_mask).sum(-1).astype(np.int64)
    completion_mask = np.asarray(completion_mask) > 0
    slots = completion_mask.shape[1]
    last = slots - np.argmax(completion_mask[:, ::-1], axis=1)
    return prompt_lengths, np.where(completion_mask.any(1), last, 0)


def row_length(longest: int, pack_length: int | None, *, longest_is: str) -> int:
    """`pack_length` if given (at least `longest`, which is `longest_is`), else `longest` rounded up
    to a power of two."""
    if pack_length is None:
        return 1 << max(longest - 1, 0).bit_length()
    if pack_length < longest:
        raise UserError(f"`train.pack_length`: got {pack_length}, expected at least {longest}, {longest_is} "
                        "(or null: that, rounded up to a power of two).")
    return pack_length


def default_pack_length(prompt_mask: np.ndarray, completion_mask: np.ndarray, pack_length: int | None) -> int:
    """`row_length` for this batch's longest prompt + completion."""
    prompt_lengths, completion_lengths = sequence_lengths(prompt_mask, completion_mask)
    return row_length(int((prompt_lengths + completion_lengths).max()), pack_length,
                      longest_is="the longest prompt + completion of this batch")


def micro_batch_rows(num_sequences: int, num_micro: int, num_samples: int) -> np.ndarray:
    """[M, n] the batch rows of each micro-batch, in `split_micro_batches`' order."""
    from jaxrl_llm.training.algorithms.core import split_micro_batches  # the one definition of the order

    rows = np.arange(num_sequences)
    return np.asarray(split_micro_batches(rows, num_micro, num_samples)) if num_micro > 1 else rows[None]


def _first_fit_decreasing(lengths: np.ndarray, capacity: int) -> list[list[int]]:
    """Sequence indices per row: longest first, each into the first row with room."""
    rows, free = [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] == 0:
            continue
        for r, room in enumerate(free):
            if room >= lengths[i]:
                rows[r].append(i)
                free[r] -= lengths[i]
                break
        else:
            rows.append([i])
            free.append(capacity - lengths[i])
    return rows


def plan(prompt_ids, prompt_mask, tokens, completion_mask, *, rows: np.ndarray, pack_length: int,
         row_multiple: int = 1) -> PackedLayout:
    """The `PackedLayout` of a batch split into micro-batches `rows` [M, n] (see `micro_batch_rows`).

    Args:
      prompt_ids, prompt_mask: [N, P] left-padded prompts; tokens, completion_mask: [N, T].
      rows: [M, n] the batch rows of each micro-batch, in the order the training step splits them.
      pack_length: L, tokens per packed row (at least the longest prompt + completion).
      row_multiple: the rows per micro-batch are a multiple of this (the devices they are split over).
    """
    prompt_ids, prompt_mask, tokens = (np.asarray(x) for x in (prompt_ids, prompt_mask, tokens))
    prompt_lengths, completion_lengths = sequence_lengths(prompt_mask, completion_mask)
    if (prompt_lengths[completion_lengths > 0] < 1).any():
        raise UserError("rollout.prompt_mask: a prompt with no real token; packing (train.packing) needs at least "
                        "one prompt token before each completion (the position that predicts its first token).")
    lengths = prompt_lengths + completion_lengths
    row_length(int(lengths.max()), pack_length, longest_is="the longest prompt + completion of this batch")
    width, slots = prompt_ids.shape[1], tokens.shape[1]
    placements = [_first_fit_decreasing(lengths[micro], pack_length) for micro in rows]
    num_rows = -(-bucket(max(len(p) for p in placements)) // row_multiple) * row_multiple
    num_tokens = bucket(max(int(completion_lengths[micro].sum()) for micro in rows))
    m, n = rows.shape
    ids = np.zeros((m, num_rows, pack_length), np.int32)
    segment_ids = np.zeros((m, num_rows, pack_length), np.int32)
    token_index = np.zeros((m, num_tokens), np.int32)
    token_source = np.full((m, num_tokens), n * slots, np.int32)
    for mi, (micro, placement) in enumerate(zip(rows, placements)):
        written = 0
        for r, members in enumerate(placement):
            start = 0
            for j, local in enumerate(members):
                row = micro[local]
                p, c = prompt_lengths[row], completion_lengths[row]
                ids[mi, r, start : start + p] = prompt_ids[row, width - p :]
                ids[mi, r, start + p : start + p + c] = tokens[row, :c]
                segment_ids[mi, r, start : start + p + c] = j + 1
                # Completion token t is predicted at the segment's position p - 1 + t.
                token_index[mi, written : written + c] = r * pack_length + start + p - 1 + np.arange(c)
                token_source[mi, written : written + c] = local * slots + np.arange(c)
                written += c
                start += p + c
    return PackedLayout(ids, segment_ids, token_index, token_source)


def gather_tokens(x: jax.Array, layout: PackedLayout) -> jax.Array:
    """[R, L, ...] per packed position -> [C, ...] at the positions that predict completion tokens."""
    return x.reshape(-1, *x.shape[2:])[layout.token_index]


def scatter_tokens(x: jax.Array, layout: PackedLayout, shape: tuple[int, int]) -> jax.Array:
    """[C] per completion token -> [n, T], 0 where no completion token is (padded entries dropped)."""
    n, t = shape
    return jnp.zeros((n * t,), x.dtype).at[layout.token_source].set(x, mode="drop").reshape(n, t)


def completion_targets(tokens: jax.Array, layout: PackedLayout) -> jax.Array:
    """[C] the completion token at each entry of the layout (padded entries: any valid token)."""
    return jnp.take(tokens.reshape(-1), layout.token_source, mode="clip")


class Packer:
    """The packed layouts of one step's batch, planned on the host: `packer(None)` for `prepare`
    (the whole batch), `packer(indices)` for the minibatch `take(batch, indices)`; each split into
    the micro-batches the algorithm runs (`num_micro_batches`, `micro_batch_rows`).

    `pack_length` (None: the batch's longest sequence, to a power of two) is one for the step.
    `mesh`: the packed rows are split over all its devices, as the batch's sequences are (each
    device runs the forward and backward of its rows); None: a layout of host arrays."""

    def __init__(self, rollout, *, algorithm, num_samples: int, pack_length: int | None, mesh=None):
        self.host = [distributed.to_host(x) for x in (rollout.prompt_ids, rollout.prompt_mask, rollout.tokens,
                                                      rollout.mask)]
        self.pack_length = default_pack_length(self.host[1], self.host[3], pack_length)
        self.algorithm, self.num_samples, self.mesh = algorithm, num_samples, mesh

    def __call__(self, indices=None) -> PackedLayout:
        indices = np.arange(len(self.host[0])) if indices is None else np.asarray(indices)
        num_micro = self.algorithm.num_micro_batches(len(indices))
        rows = indices[micro_batch_rows(len(indices), num_micro, self.num_samples)]
        if self.mesh is None:
            return plan(*self.host, rows=rows, pack_length=self.pack_length)
        layout = plan(*self.host, rows=rows, pack_length=self.pack_length, row_multiple=self.mesh.size)
        split_rows = NamedSharding(self.mesh, P(None, BATCH_AXES))  # [M, R, L]: R over the devices
        return PackedLayout(*(jax.device_put(x, split_rows if x.ndim == 3 else replicated(self.mesh)) for x in layout))

    def fill(self, layout: PackedLayout) -> float:
        """The share of the whole batch's layout (`packer()`) token slots that hold a real token:
        from the host's lengths and the layout's shape, so it reads nothing back from the devices."""
        prompt_lengths, completion_lengths = sequence_lengths(self.host[1], self.host[3])
        return float((prompt_lengths + completion_lengths).sum() / np.prod(layout.ids.shape))
