"""What an environment is, and how one named in a config is loaded and checked at start-up.

An environment is a plain Python class, one instance per episode (each of the K samples of a
prompt gets its own):

    class Guess:
        def reset(self, example):            # the episode's prompt: text, chat messages, or
            self.answer = example.answer     # None for the example's own prompt
        def step(self, completion_text):     # the policy's turn -> the observation, or None:
            ...                              # the episode is over
        def reward(self) -> float:           # optional, read by `reward.terms: [{kind: environment}]`
            ...
        def metrics(self) -> dict:           # optional, averaged per episode and logged
            ...

`reset` must give the same prompt for every episode of an example (the K samples of a group share
one prompt). An observation is text (its tokens are appended as they are) or a list of chat
messages (rendered with the tokenizer's chat template). `stop_strings`, when the class has it,
lists strings that end a policy turn besides EOS (e.g. ``["</call>"]``).
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from jaxrl_llm.errors import UserError
from jaxrl_llm.loading import load_object

REQUIRED_METHODS = ("reset", "step")


class Environment(Protocol):
    """The methods an environment class has (see the module docstring)."""

    def reset(self, example) -> str | list[dict] | None: ...

    def step(self, completion_text: str) -> str | list[dict] | None: ...


def check_environment_class(cls, where: str = "`rollout.environment`") -> None:
    """UserError naming each required method the class lacks (or has as a non-method)."""
    missing = [name for name in REQUIRED_METHODS if not callable(getattr(cls, name, None))]
    if missing:
        raise UserError(f"{where}: {getattr(cls, '__qualname__', cls)!r} has no method(s) {missing}; an environment "
                        f"class needs reset(example) -> prompt and step(completion_text) -> observation | None "
                        "(and optionally reward() and metrics()).")


def load_environment(target: str, options: dict | None = None, where: str = "`rollout.environment`"):
    """`() -> environment`: a factory of fresh instances of the class `target` names
    (`package.module:Class` or `path/to/file.py:Class`), built with the keyword `options`.

    The class's methods and its options are checked here, at start-up, not in the first episode."""
    cls = load_object(target, where, what="class")
    check_environment_class(cls, where)
    options = dict(options or {})
    if inspect.isclass(cls):
        try:
            inspect.signature(cls).bind(**options)
        except TypeError as err:
            raise UserError(f"`rollout.environment_options`: {err} ({target} takes "
                            f"{list(inspect.signature(cls).parameters)}).") from None
    return lambda: cls(**options)


def has_method(environment: Any, name: str) -> bool:
    return callable(getattr(environment, name, None))


__all__ = ["REQUIRED_METHODS", "Environment", "check_environment_class", "has_method", "load_environment"]
