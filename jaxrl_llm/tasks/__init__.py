"""Tasks: deterministic prompt streams, with verifiable rewards where there is an answer.

``get_task("arithmetic", max_operand=99)`` builds a task by name; ``TASKS`` lists the names.
``tool_arithmetic`` is four-digit addition with a calculator tool (``tasks/tool_arithmetic.py``).
``dataset`` reads your own prompts from a file (see ``tasks/dataset.py``).
"""

from __future__ import annotations

import inspect

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.arithmetic import ArithmeticTask, accuracy, default_policy_path
from jaxrl_llm.tasks.base import Example, Task, task_verifies
from jaxrl_llm.tasks.dataset import DatasetTask
from jaxrl_llm.tasks.tool_arithmetic import ToolArithmeticTask

TASKS = {"arithmetic": ArithmeticTask, "dataset": DatasetTask, "tool_arithmetic": ToolArithmeticTask}


def get_task(name: str, *, tokenizer=None, **options) -> Task:
    """The task registered under ``name``, built with keyword ``options`` (and the policy's
    ``tokenizer``, for the tasks that take one: chat templates).

    Raises:
      ValueError: ``name`` is not a registered task (the message lists the valid names), or an
        option is invalid (raised by the task, naming the option).
    """
    if name not in TASKS:
        raise UserError(f"name: unknown task {name!r}, expected one of {sorted(TASKS)}")
    parameters = inspect.signature(TASKS[name]).parameters
    if "tokenizer" in parameters:
        options = {**options, "tokenizer": tokenizer}
    valid = sorted(p for p in parameters if p != "tokenizer")
    unknown = sorted(set(options) - set(parameters))
    if unknown:
        raise UserError(f"`task.options`: unknown option(s) {unknown} for task {name!r}; it takes {valid}.")
    try:
        inspect.signature(TASKS[name]).bind(**options)
    except TypeError as err:  # a missing option, checked before the task runs
        raise UserError(f"`task.options`: {err} (task {name!r} takes {valid}).") from None
    return TASKS[name](**options)


__all__ = ["TASKS", "ArithmeticTask", "DatasetTask", "Example", "Task", "ToolArithmeticTask", "accuracy",
           "default_policy_path", "get_task", "task_verifies"]
