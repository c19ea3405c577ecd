"""Rewards: the task's verifier, built-in verifiers, Python functions in TRL's convention, and
reward models, combined with weights.

A reward term maps a batch of `Sample`s to one float each. `RewardFunction`
sums the weighted terms, applies the missing-EOS penalty, optional clipping and
normalisation, and turns a term that raises or returns NaN into either a clear
error naming the term and the sample, or (with `on_error="mask"`) a sample that
is dropped from the baseline and the loss.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from jaxrl_llm.errors import UserError
from jaxrl_llm.loading import load_object
from jaxrl_llm.tasks import verifiers
from jaxrl_llm.tasks.verifiers import ANSWER_VERIFIERS, exact_match, numeric, parse_number, regex


class Sample(NamedTuple):
    """One completion as the reward terms see it."""

    example: object  # the task's Example (prompt and reference answer)
    text: str  # decoded completion, EOS excluded
    finished: bool  # the completion ended with EOS
    token_ids: tuple[int, ...]  # completion token ids, EOS included when finished
    # Multi-turn episodes: the episode's environment (its `reward()` is the `environment` term)
    # and the transcript as `(role, text)` parts, role "policy" or "environment"; `text` is then
    # the whole transcript and `finished` says the environment ended the episode.
    environment: object = None
    transcript: tuple[tuple[str, str], ...] | None = None
    # Multi-turn episodes: the tokens of each policy turn (the `reward.overlong` penalty is measured
    # on them, never on the environment's observation tokens); None for one turn.
    policy_turn_lengths: tuple[int, ...] | None = None


Term = Callable[[Sequence[Sample]], Sequence[float]]


class RewardError(UserError):
    """A reward term failed, returned the wrong number of scores, or a non-finite one."""


def task_term(task) -> Term:
    """The task's own verifier."""

    def verifier(samples):
        return task.score_batch([s.example for s in samples], [s.text for s in samples], [s.finished for s in samples])

    verifier.__name__ = f"{type(task).__name__}.score_batch"
    return verifier


def load_function(target: str, where: str = "`reward.terms[].target`") -> Callable:
    """The function `target` names: `package.module:function`, or `path/to/file.py:function`."""
    return load_object(target, where)


def trl_arguments(samples: Sequence[Sample]) -> dict:
    """TRL's reward-function arguments for a batch: `prompts` (as the dataset holds them: text, or
    chat messages), `completions` (text, or `[{"role": "assistant", "content": text}]` after a
    chat prompt), `completion_ids` (EOS included when the completion ended), `finished`, and
    every other column of the examples as a list (`answer` for the built-in tasks)."""
    prompts, completions = [], []
    for s in samples:
        raw = s.example.prompt if getattr(s.example, "raw_prompt", None) is None else s.example.raw_prompt
        prompts.append(raw)
        completions.append([{"role": "assistant", "content": s.text}] if isinstance(raw, list) else s.text)
    columns = [dict(getattr(s.example, "columns", None) or {}) for s in samples]
    for row, s in zip(columns, samples):
        if not row and getattr(s.example, "answer", None) is not None:
            row["answer"] = s.example.answer
    names = list(dict.fromkeys(name for row in columns for name in row))
    arguments = {name: [row.get(name) for row in columns] for name in names}
    arguments.update(prompts=prompts, completions=completions, completion_ids=[list(s.token_ids) for s in samples],
                     finished=[bool(s.finished) for s in samples])
    return arguments


def python_term(target: str) -> Term:
    """A Python reward function in TRL's convention, called with keyword arguments:
    `fn(prompts=..., completions=..., completion_ids=..., finished=..., **columns) -> floats`
    (see `trl_arguments`). A function without `**kwargs` gets only the arguments it names, so
    `fn(prompts, completions)` works too. A None score is NaN: an error, or a masked sample
    with `reward.on_error=mask`."""
    fn = load_function(target)
    parameters = inspect.signature(fn).parameters.values()
    takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.default is inspect.Parameter.empty}

    def call(samples):
        arguments = trl_arguments(samples)
        missing = sorted(required - set(arguments))
        if missing:
            raise RewardError(f"reward function {target} needs the argument(s) {missing}, which the examples do "
                              f"not have; it can be given {sorted(arguments)} (a dataset's columns are passed "
                              "by name).")
        return fn(**(arguments if takes_all else {k: v for k, v in arguments.items() if k in named}))

    call.__name__ = target
    return call


def verifier_term(kind: str, pattern: str | None = None) -> Term:
    """A built-in verifier (`tasks/verifiers.py`): `exact_match` or `numeric` against each
    example's answer, or `regex` (a format reward: 1 when the completion matches `pattern`)."""
    if kind == "regex":
        score = verifiers.regex(pattern)
    else:
        score = verifiers.ANSWER_VERIFIERS[kind]

    def verify(samples):
        if kind != "regex":
            missing = [i for i, s in enumerate(samples) if getattr(s.example, "answer", None) is None]
            if missing:
                raise RewardError(f"reward kind {kind!r} compares completions with reference answers, and the "
                                  "examples have none; set task.options.answer_field.")
        return [score(s.text, getattr(s.example, "answer", None), finished=s.finished) for s in samples]

    verify.__name__ = kind if pattern is None else f"regex({pattern!r})"
    return verify


def environment_term() -> Term:
    """Each episode's environment's `reward()` (multi-turn rollouts with `rollout.environment`)."""

    def environment_reward(samples):
        missing = [i for i, s in enumerate(samples) if not callable(getattr(s.environment, "reward", None))]
        if missing:
            raise RewardError("reward kind 'environment' reads each episode's environment's reward(), and "
                              f"{'these samples have no environment' if samples[missing[0]].environment is None else 'the environment class has no reward() method'} "
                              f"(samples {missing[:5]}); set rollout.environment to a class with reward(), or use "
                              "another reward kind.")
        return [s.environment.reward() for s in samples]

    return environment_reward


def reward_model_term(path: str, *, batch_size: int = 32, append_eos: bool = True) -> Term:
    """Score prompt + completion with a sequence-classification reward model, jitted.

    The text is tokenised with the reward model's own tokenizer; with `append_eos` its EOS token
    ends every sequence (reward models are trained to score at it; it is not added twice).
    Batches are padded (left) to `batch_size` rows and a power-of-two length, so the compiled
    forward pass is reused from batch to batch.
    """
    import jax
    import transformers
    from flax import nnx

    from jaxrl_llm.models import reward_model_from_pretrained
    from jaxrl_llm.rollout.padding import bucket_width, left_pad

    model = reward_model_from_pretrained(path)
    graphdef, weights = nnx.split(model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    eos = tokenizer.eos_token_id
    if append_eos and eos is None:
        raise UserError(f"`reward.terms[].append_eos`: the tokenizer of {path!r} has no EOS token; set append_eos: false.")
    eos = eos if isinstance(eos, int) or eos is None else eos[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos if eos is not None else 0)

    @jax.jit
    def forward(weights, ids, mask):
        return nnx.merge(graphdef, weights)(ids, mask)

    def score(samples):
        out = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            rows = [list(tokenizer(s.example.prompt + s.text)["input_ids"]) for s in chunk]
            if append_eos:
                rows = [r if r and r[-1] == eos else r + [eos] for r in rows]
            ids, mask = left_pad(rows, bucket_width(max(len(r) for r in rows)), pad, num_rows=batch_size)
            mask[:, -1] = 1  # filler rows hold one token, so no row is all padding
            out.extend(np.asarray(forward(weights, ids, mask))[: len(chunk)].tolist())
        return out

    score.__name__ = f"reward_model({path})"
    score.forward = forward  # the jitted model call (its cache size counts the compiled lengths)
    return score


class RewardFunction:
    """Weighted sum of reward terms, with the penalties and checks of `RewardConfig`."""

    def __init__(self, terms: Sequence[tuple[float, Term]], *, missing_eos_penalty=0.0, clip=None,
                 normalize=False, on_error="raise", overlong: tuple[int, int, float] | None = None):
        """`overlong`: `(max_new_tokens, buffer, penalty)` of `overlong_penalty`, or None."""
        if on_error not in ("raise", "mask"):
            raise UserError(f"`reward.on_error`: got {on_error!r}, expected 'raise' or 'mask'.")
        self.terms = list(terms)
        self.missing_eos_penalty = missing_eos_penalty
        self.overlong = overlong
        self.clip = clip
        self.normalize = normalize
        self.on_error = on_error

    def _evaluate(self, term: Term, samples: Sequence[Sample]) -> np.ndarray:
        name = getattr(term, "__name__", repr(term))
        try:
            values = np.asarray(term(samples), dtype=np.float64)
        except Exception as batch_error:  # find the sample that breaks it, to name it
            values = np.empty(len(samples))
            for i, sample in enumerate(samples):
                try:
                    values[i] = float(np.asarray(term([sample]), dtype=np.float64).reshape(-1)[0])
                except Exception as e:
                    if self.on_error == "raise":
                        raise RewardError(
                            f"reward term {name} raised {type(e).__name__}: {e} on sample {i} "
                            f"(prompt {sample.example.prompt!r}, completion {sample.text!r}). "
                            f"Set reward.on_error=mask to drop such samples."
                        ) from e
                    values[i] = np.nan
            if not np.isnan(values).any():
                raise RewardError(f"reward term {name} failed on the batch but on no single sample: {batch_error}") from batch_error
        if values.shape != (len(samples),):
            raise RewardError(f"reward term {name} returned shape {values.shape}, expected ({len(samples)},): "
                              "one score per completion, in the order given.")
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size and self.on_error == "raise":
            i = int(bad[0])
            raise RewardError(
                f"reward term {name} returned {values[i]} for sample {i} (prompt {samples[i].example.prompt!r}, "
                f"completion {samples[i].text!r}); {bad.size} non-finite in the batch. "
                f"Set reward.on_error=mask to drop such samples."
            )
        return values

    def __call__(self, samples: Sequence[Sample], *, normalize: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Returns `(scores [N] float32, valid [N] bool)`; invalid samples have score 0.
        `normalize=False` skips the batch whitening (an evaluation reports raw rewards)."""
        total = np.zeros(len(samples))
        for weight, term in self.terms:
            total = total + weight * self._evaluate(term, samples)
        finished = np.array([s.finished for s in samples], dtype=bool)
        total = total - self.missing_eos_penalty * (~finished)
        if self.overlong is not None:
            total = total - np.array([sample_overlong_penalty(s, *self.overlong) for s in samples])
        valid = np.isfinite(total)
        if self.clip is not None:
            total = np.clip(total, -self.clip, self.clip)
        if self.normalize if normalize is None else normalize:
            total = standardize(total, valid)
        return np.where(valid, total, 0.0).astype(np.float32), valid


def standardize(total: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """`reward.normalize`: the batch's valid rewards shifted to mean 0 and scaled to std 1."""
    total = np.asarray(total, np.float64)
    if valid.sum() <= 1:
        return total
    mean, std = total[valid].mean(), total[valid].std()
    return (total - mean) / (std + 1e-8)


def overlong_penalty(lengths, max_new_tokens: int, buffer: int, penalty: float) -> np.ndarray:
    """DAPO's soft overlong punishment (Yu et al. 2025, https://arxiv.org/abs/2503.14476, eq. 13),
    as a non-negative amount to subtract: for a completion of |y| tokens (EOS included),

        penalty * clip((|y| - (max_new_tokens - buffer)) / buffer, 0, 1)

    nothing up to `max_new_tokens - buffer` tokens, growing linearly to `penalty` at
    `max_new_tokens` (where the sampler cuts a completion that has not ended)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return penalty * np.clip((lengths - (max_new_tokens - buffer)) / buffer, 0.0, 1.0)


def sample_overlong_penalty(sample: Sample, max_new_tokens: int, buffer: int, penalty: float) -> float:
    """`overlong_penalty` of one sample: of its completion, or in a multi-turn episode the largest
    of its policy turns' (each turn is sampled under the `max_new_tokens` limit; the environment's
    observation tokens are not the policy's and count for nothing). An episode thus loses at most
    `penalty`, as one completion does, and loses it when one of its turns ran into the limit."""
    lengths = [len(sample.token_ids)] if sample.policy_turn_lengths is None else sample.policy_turn_lengths
    return float(np.max(overlong_penalty(lengths, max_new_tokens, buffer, penalty), initial=0.0))


def build_reward(reward_config, task, *, max_new_tokens: int | None = None) -> RewardFunction:
    """A `RewardFunction` from `RewardConfig` (see `training/config.py`); `max_new_tokens`, the
    sampler's limit, is what `reward.overlong` measures lengths against."""
    from jaxrl_llm.tasks.base import task_verifies
    terms = []
    for i, spec in enumerate(reward_config.terms):
        if spec.kind == "task":
            if task is None or not task_verifies(task):
                raise UserError(f"`reward.terms[{i}]`: kind 'task' needs a task with a verifier, and task "
                                f"{getattr(task, 'name', task)!r} has none (a dataset task needs answer_field); "
                                "use kind python, exact_match, numeric, regex or reward_model.")
            terms.append((spec.weight, task_term(task)))
        elif spec.kind == "python":
            terms.append((spec.weight, python_term(spec.target)))
        elif spec.kind == "environment":
            terms.append((spec.weight, environment_term()))
        elif spec.kind in ("exact_match", "numeric", "regex"):
            terms.append((spec.weight, verifier_term(spec.kind, spec.pattern)))
        else:
            terms.append((spec.weight, reward_model_term(spec.target, append_eos=spec.append_eos)))
    overlong = None
    if reward_config.overlong is not None:
        if max_new_tokens is None:
            raise UserError("`reward.overlong`: measures lengths against rollout.max_new_tokens, which was not "
                            "given (build_reward(..., max_new_tokens=...)).")
        overlong = (max_new_tokens, reward_config.overlong.buffer, reward_config.overlong.penalty)
    return RewardFunction(
        terms,
        missing_eos_penalty=reward_config.missing_eos_penalty,
        clip=reward_config.clip,
        normalize=reward_config.normalize,
        on_error=reward_config.on_error,
        overlong=overlong,
    )


__all__ = ["ANSWER_VERIFIERS", "RewardError", "RewardFunction", "Sample", "build_reward", "environment_term", "exact_match",
           "load_function",
           "numeric", "overlong_penalty", "parse_number", "python_term", "regex", "sample_overlong_penalty", "standardize", "reward_model_term", "task_term",
           "trl_arguments", "verifier_term", "verifiers"]
