"""Two-number addition with a verifiable reward: ``23+58=`` -> ``81`` then EOS.

The toy task of the quick-start: small enough that a 0.6M-parameter model learns it on a laptop
CPU, hard enough that RL visibly moves held-out accuracy.

Data
  * Pairs ``(a, b)`` with ``min_operand <= a, b <= max_operand``. A fixed ``holdout_fraction`` of
    all pairs (chosen by a hash of ``(a, b)``, independent of ``seed`` and of the operand range)
    is held out: the training stream never produces them, and the evaluation set is drawn only
    from them. Held-out accuracy therefore measures generalisation to unseen pairs.
  * ``train_example(index)`` is a pure function of ``(seed, index)``: a data position is one
    integer, so resuming at ``index`` replays exactly the same prompts.
  * ``eval_examples()`` is ``num_eval`` distinct held-out pairs, fixed by the operand range,
    ``holdout_fraction`` and ``num_eval`` only (not by ``seed``), so accuracies are comparable
    across training seeds.

Reward (``score``)
  * 1.0 when the completion is exactly the decimal digits of ``a + b`` and ended with EOS
    (``finished=True``; the text excludes the EOS token). Nothing else earns 1.0: no leading
    zeros, no spaces, no missing EOS.
  * otherwise 0.0, or with ``partial_credit=True``:
    ``0.5 * p / L + 0.25 * [finished and len(text) == L]`` where ``L = len(answer)`` and ``p`` is
    the number of leading characters the text shares with the answer. A wrong completion thus
    scores at most 0.5 for the right digits without EOS (and below 0.75 in every case), so exact
    answers stay strictly best.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.base import Example, check_batch_lengths

# Salts keep the hold-out hash and the eval draw independent of every training seed.
_HOLDOUT_SALT = 0x5EED_A7_1CE
_EVAL_SALT = 20240917
_HASH_BUCKETS = 1_000_000
_ENUMERATE_LIMIT = 1 << 22  # up to this many pairs the held-out set is listed exactly
_MAX_DRAWS = 10_000
DEFAULT_NUM_EVAL = 200


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-spread hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def held_out_mask(a, b, holdout_fraction: float = 0.1) -> np.ndarray:
    """Bool array: which pairs ``(a, b)`` (broadcast integer arrays) belong to the held-out set."""
    a = np.asarray(a, np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    b = np.asarray(b, np.int64).astype(np.uint64) & np.uint64(0xFFFFFFFF)
    with np.errstate(over="ignore"):
        h = _mix64((a << np.uint64(32)) ^ b ^ np.uint64(_HOLDOUT_SALT))
    return (h % np.uint64(_HASH_BUCKETS)) < np.uint64(round(holdout_fraction * _HASH_BUCKETS))


def _check_int(name: str, value, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{name}: got {value!r} ({type(value).__name__}), expected an int")
    if minimum is not None and value < minimum:
        raise UserError(f"{name}: got {value}, expected an int >= {minimum}")
    return int(value)


class ArithmeticTask:
    """``a+b=`` prompts, answers ``str(a + b)`` then EOS; see the module docstring for the data and reward.

    Args:
      min_operand, max_operand: inclusive operand range, ``0 <= min_operand <= max_operand``.
      partial_credit: reward wrong completions fractionally (see ``score``); accuracy is always exact.
      seed: order of the training stream (``>= 0``); does not change the held-out pairs or eval set.
      num_eval: size of the fixed evaluation set (distinct held-out pairs); default 200, or every
        held-out pair when a small operand range has fewer. An explicit value must fit.
      holdout_fraction: fraction of pairs never trained on, in ``(0, 1)``.
    """

    name = "arithmetic"

    def __init__(
        self,
        min_operand: int = 0,
        max_operand: int = 99,
        partial_credit: bool = False,
        seed: int = 0,
        num_eval: int | None = None,
        holdout_fraction: float = 0.1,
    ):
        self.min_operand = _check_int("min_operand", min_operand, minimum=0)
        self.max_operand = _check_int("max_operand", max_operand)
        if self.max_operand < self.min_operand:
            raise UserError(f"max_operand: got {max_operand}, expected >= min_operand ({min_operand})")
        if not isinstance(partial_credit, bool):
            raise UserError(f"partial_credit: got {partial_credit!r}, expected True or False")
        self.partial_credit = partial_credit
        self.seed = _check_int("seed", seed, minimum=0)
        self._num_eval_given = num_eval is not None
        self.num_eval = DEFAULT_NUM_EVAL if num_eval is None else _check_int("num_eval", num_eval, minimum=1)
        if isinstance(holdout_fraction, bool) or not isinstance(holdout_fraction, numbers.Real):
            raise UserError(f"holdout_fraction: got {holdout_fraction!r}, expected a float in (0, 1)")
        if not 0.0 < float(holdout_fraction) < 1.0:
            raise UserError(f"holdout_fraction: got {holdout_fraction}, expected a float in (0, 1)")
        self.holdout_fraction = float(holdout_fraction)

        span = self.max_operand - self.min_operand + 1
        self.num_pairs = span * span
        self._eval = self._build_eval_set()  # also checks that train and held-out pairs both exist

    # ------------------------------------------------------------------------------------ data
    def is_held_out(self, a: int, b: int) -> bool:
        """Whether the pair ``(a, b)`` belongs to the held-out set (never in the training stream)."""
        return bool(held_out_mask(a, b, self.holdout_fraction))

    @staticmethod
    def make_example(a: int, b: int) -> Example:
        """The example for operands ``a`` and ``b``."""
        return Example(prompt=f"{a}+{b}=", answer=str(a + b))

    def train_example(self, index: int) -> Example:
        """The training example at stream position ``index`` (pure function of ``seed`` and ``index``)."""
        index = _check_int("index", index, minimum=0)
        rng = np.random.default_rng([self.seed, index])
        for _ in range(_MAX_DRAWS):
            a, b = rng.integers(self.min_operand, self.max_operand + 1, size=2)
            if not self.is_held_out(a, b):
                return self.make_example(int(a), int(b))
        raise UserError(f"`holdout_fraction`: no training pair found in {_MAX_DRAWS} draws; lower holdout_fraction")

    def train_batch(self, start_index: int, n: int) -> list[Example]:
        """Examples at stream positions ``start_index, ..., start_index + n - 1``."""
        start_index = _check_int("start_index", start_index, minimum=0)
        n = _check_int("n", n, minimum=0)
        return [self.train_example(start_index + i) for i in range(n)]

    def eval_examples(self) -> list[Example]:
        """The fixed held-out evaluation set (``num_eval`` distinct held-out pairs, fixed order)."""
        return list(self._eval)

    def _build_eval_set(self) -> list[Example]:
        rng = np.random.default_rng(_EVAL_SALT)
        lo, hi = self.min_operand, self.max_operand
        if self.num_pairs <= _ENUMERATE_LIMIT:
            a, b = np.meshgrid(np.arange(lo, hi + 1), np.arange(lo, hi + 1), indexing="ij")
            a, b = a.ravel(), b.ravel()
            held = held_out_mask(a, b, self.holdout_fraction)
            n_held = int(held.sum())
            if n_held == len(held):
                raise UserError(
                    f"holdout_fraction: every one of the {self.num_pairs} pairs in "
                    f"[{lo}, {hi}] is held out, leaving nothing to train on; widen the operand range"
                )
            if n_held < self.num_eval and not self._num_eval_given:
                self.num_eval = n_held
            if n_held < self.num_eval:
                raise UserError(
                    f"num_eval: got {self.num_eval}, but operands in [{lo}, {hi}] with "
                    f"holdout_fraction={self.holdout_fraction} give only {n_held} held-out pairs"
                )
            chosen = rng.choice(np.flatnonzero(held), size=self.num_eval, replace=False)
            return [self.make_example(int(a[i]), int(b[i])) for i in chosen]
        seen: dict[tuple[int, int], None] = {}
        for _ in range(_MAX_DRAWS * self.num_eval):
            a, b = (int(x) for x in rng.integers(lo, hi + 1, size=2))
            if self.is_held_out(a, b):
                seen.setdefault((a, b))
                if len(seen) == self.num_eval:
                    return [self.make_example(a, b) for a, b in seen]
        raise UserError("`holdout_fraction`: could not draw the evaluation set; raise holdout_fraction")

    # ---------------------------------------------------------------------------------- reward
    def score(self, example: Example, completion_text: str, *, finished: bool) -> float:
        """Verifier reward of one completion (EOS excluded from the text; ``finished``: it ended with EOS).

        1.0 iff ``finished`` and ``completion_text == example.answer``. Otherwise 0.0, or with
        ``partial_credit``: ``0.5 * p / L + 0.25 * [finished and len(completion_text) == L]``,
        ``L = len(answer)``, ``p`` = leading characters shared with the answer (always < 0.75).
        """
        answer = example.answer
        if finished and completion_text == answer:
            return 1.0
        if not self.partial_credit:
            return 0.0
        prefix = 0
        for got, want in zip(completion_text, answer):
            if got != want:
                break
            prefix += 1
        right_length = bool(finished) and len(completion_text) == len(answer)
        return 0.5 * prefix / len(answer) + 0.25 * right_length

    def score_batch(
        self, examples: Sequence[Example], texts: Sequence[str], finished: Sequence[bool] | np.ndarray
    ) -> np.ndarray:
        """``score`` for each (example, text, finished) triple -> float32 [N]."""
        check_batch_lengths(examples, texts, finished)
        return np.asarray(
            [self.score(e, t, finished=bool(f)) for e, t, f in zip(examples, texts, finished)], np.float32
        )

    def accuracy(self, examples: Sequence[Example], texts: Sequence[str], finished) -> float:
        """Fraction of exactly correct, EOS-terminated completions (ignores ``partial_credit``)."""
        return accuracy(examples, texts, finished)


def accuracy(examples: Sequence[Example], texts: Sequence[str], finished: Sequence[bool] | np.ndarray) -> float:
    """Fraction of completions equal to their example's answer and ended with EOS; 0.0 for none."""
    check_batch_lengths(examples, texts, finished)
    if not examples:
        return 0.0
    hits = sum(bool(f) and t == e.answer for e, t, f in zip(examples, texts, finished))
    return hits / len(examples)


def default_policy_path():
    """Directory of the shipped tiny policy for this task (HF format: config, weights, tokenizer)."""
    from jaxrl_llm.assets import tiny_arithmetic_path

    return tiny_arithmetic_path()
