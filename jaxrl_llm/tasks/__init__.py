"""Built-in tasks: deterministic prompt streams with verifiable rewards.

``get_task("arithmetic", max_operand=99)`` builds a task by name; ``TASKS`` lists the names.
"""

from __future__ import annotations

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.arithmetic import ArithmeticTask, accuracy, default_policy_path
from jaxrl_llm.tasks.base import Example, Task

TASKS = {"arithmetic": ArithmeticTask}


def get_task(name: str, **options) -> Task:
    """The task registered under ``name``, built with keyword ``options``.

    Raises:
      ValueError: ``name`` is not a registered task (the message lists the valid names), or an
        option is invalid (raised by the task, naming the option).
    """
    if name not in TASKS:
        raise UserError(f"name: unknown task {name!r}, expected one of {sorted(TASKS)}")
    try:
        return TASKS[name](**options)
    except TypeError as err:  # unknown keyword: report it as a bad argument like every other check
        raise UserError(f"options: {err}") from None


__all__ = ["TASKS", "ArithmeticTask", "Example", "Task", "accuracy", "default_policy_path", "get_task"]
