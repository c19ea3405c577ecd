"""Left padding to a few fixed widths: what the sampler, evaluation and reward models are fed.

Prompts end where generation (or scoring) starts, so rows are padded on the left; widths are
rounded up to a power of two so a run compiles for a handful of shapes, not one per batch.
"""

from __future__ import annotations

import numpy as np


def bucket_width(length: int, *, limit: int | None = None, minimum: int = 16) -> int:
    """The padded width for `length` tokens: the next power of two (at least `minimum`), capped
    at `limit`."""
    width = max(minimum, 1 << (max(length, 1) - 1).bit_length())
    return width if limit is None else min(width, limit)


def left_pad(rows, width: int, pad_id: int, *, num_rows: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Token rows as left-padded `(ids, mask)`, int32 [num_rows or len(rows), width]."""
    ids = np.full((num_rows or len(rows), width), pad_id, np.int32)
    mask = np.zeros((num_rows or len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return ids, mask


__all__ = ["bucket_width", "left_pad"]
