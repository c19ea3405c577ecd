"""What every built-in task provides: prompts with reference answers, and a verifier reward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from jaxrl_llm.errors import UserError


class Example(NamedTuple):
    """One prompt and its reference answer.

    `prompt` is the text the policy is given (a chat template already applied). A dataset row
    also keeps the prompt as the dataset holds it (`raw_prompt`: a string or a list of chat
    messages) and its other fields (`columns`), which reward functions receive.
    """

    prompt: str
    answer: str | None  # the built-in tasks: the exact completion that earns full reward (no EOS)
    raw_prompt: Any = None  # None: the same as `prompt`
    columns: Mapping[str, Any] | None = None  # None: no fields besides prompt and answer


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


def task_verifies(task) -> bool:
    """Whether `task` has a verifier (`score_batch`): a dataset without answers has none."""
    return bool(getattr(task, "verifies", hasattr(task, "score_batch")))


def exact_accuracy(task, examples, texts, finished) -> float:
    """Share of completions the task's verifier gives full marks (partial credit does not count)."""
    return float(np.mean(np.asarray(task.score_batch(examples, texts, finished)) >= 1.0))


def check_batch_lengths(examples: Sequence, texts: Sequence, finished: Sequence | np.ndarray) -> None:
    """ValueError unless examples, texts and finished have the same length."""
    n = len(examples)
    if len(texts) != n:
        raise UserError(f"texts: got {len(texts)} completions, expected {n} (one per example)")
    if len(finished) != n:
        raise UserError(f"finished: got {len(finished)} flags, expected {n} (one per example)")
