"""Built-in verifiers: a completion against a reference answer, or against a format.

Each is usable from a config without code (`reward.terms: [{kind: numeric}]`, or a dataset
task's `verifier: numeric`) and from Python as a plain function of one completion.

- `exact_match`: the completion, stripped of surrounding whitespace, equals the answer.
- `numeric`: the number after the last `####` (GSM8K's convention) or else the last number in
  the completion equals the answer's number (`1,234` and `1234.0` read as 1234).
- `regex`: the completion contains a match of a pattern (a format reward).

The answer verifiers give 1.0 only to a completion that ended (EOS or a stop token): a
completion cut off at `rollout.max_new_tokens` may stop in the middle of a number
("... is 12" of "... is 125").

They live with the tasks, below the rewards, because a dataset task scores with them too;
`jaxrl_llm.rewards` re-exports them.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+")
_GSM8K_MARK = "####"


def parse_number(text: str) -> float | None:
    """The number after the last `####`, or else the last number in `text`; None if there is none."""
    if _GSM8K_MARK in text:
        found = _NUMBER.findall(text.rsplit(_GSM8K_MARK, 1)[1])
        if found:
            return float(found[0].replace(",", ""))
    found = _NUMBER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


def numeric(completion: str, answer: str, *, finished: bool = True) -> float:
    """1.0 if the completion ended and its number equals the answer's (relative tolerance 1e-6)."""
    got, want = parse_number(completion), parse_number(str(answer))
    if not finished or got is None or want is None:
        return 0.0
    return float(math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9))


def exact_match(completion: str, answer: str, *, finished: bool = True) -> float:
    """1.0 if the completion ended and equals the answer, surrounding whitespace ignored."""
    return float(bool(finished) and completion.strip() == str(answer).strip())


def regex(pattern: str):
    """A format reward: `score(completion) -> 1.0` when `re.search(pattern, completion)` matches."""
    compiled = re.compile(pattern)

    def score(completion: str, answer=None, *, finished: bool = True) -> float:
        return float(compiled.search(completion) is not None)

    return score


ANSWER_VERIFIERS = {"exact_match": exact_match, "numeric": numeric}

__all__ = ["ANSWER_VERIFIERS", "exact_match", "numeric", "parse_number", "regex"]
