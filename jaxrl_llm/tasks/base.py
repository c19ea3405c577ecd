"""What every built-in task provides: prompts with reference answers, and a verifier reward."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Protocol

import numpy as np

from jaxrl_llm.errors import UserError


class Example(NamedTuple):
    """One prompt and the exact completion text that earns full reward (EOS not included)."""

    prompt: str
    answer: str


class Task(Protocol):
    """A deterministic prompt stream, a fixed held-out set and a verifier.

    ``train_example(index)`` is a pure function of the task's options and ``index``, so a trainer's
    data position is one integer and resuming from a checkpoint replays exactly the same prompts.
    """

    def train_example(self, index: int) -> Example: ...

    def train_batch(self, start_index: int, n: int) -> list[Example]: ...

    def eval_examples(self) -> list[Example]: ...

    def score(self, example: Example, completion_text: str, *, finished: bool) -> float: ...

    def score_batch(
        self, examples: Sequence[Example], texts: Sequence[str], finished: Sequence[bool] | np.ndarray
    ) -> np.ndarray: ...


def check_batch_lengths(examples: Sequence, texts: Sequence, finished: Sequence | np.ndarray) -> None:
    """ValueError unless examples, texts and finished have the same length."""
    n = len(examples)
    if len(texts) != n:
        raise UserError(f"texts: got {len(texts)} completions, expected {n} (one per example)")
    if len(finished) != n:
        raise UserError(f"finished: got {len(finished)} flags, expected {n} (one per example)")
