"""Completions back to text: what the reward terms and verifiers read."""

from __future__ import annotations

import numpy as np


def decode_completions(tokenizer, tokens: np.ndarray, mask: np.ndarray, eos_ids: set[int]):
    """Texts (EOS excluded), finished flags and token-id tuples of each completion."""
    texts, finished, ids = [], [], []
    for row, row_mask in zip(tokens, mask):
        kept = [int(t) for t, m in zip(row, row_mask) if m]
        done = bool(kept) and kept[-1] in eos_ids
        texts.append(tokenizer.decode(kept[:-1] if done else kept, skip_special_tokens=True))
        finished.append(done)
        ids.append(tuple(kept))
    return texts, np.array(finished), ids


__all__ = ["decode_completions"]
