"""The built-in environment: a list of tools, called from the policy's text.

A tool is a plain Python function with a docstring (and, for chat templates, type hints: the
template describes it to the model from them). Each policy turn is searched for tool calls in
the configured format (`formats.py`); each call runs and its result (or its error) is the
observation. A turn without a call is the policy's final answer: the episode is over.

A tool that raises does not end the episode: the observation is ``error: <Type>: <message>``
and the call is counted in ``tools/errors``, as is a malformed call or an unknown tool (the
observation says which).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

from jaxrl_llm.environments import formats
from jaxrl_llm.errors import UserError
from jaxrl_llm.loading import load_object

FORMATS = ("tagged", "chat")


def load_tools(targets: Sequence[str], where: str = "`rollout.tools`") -> list[Callable]:
    """The functions `targets` name (`package.module:function` or `path/to/file.py:function`)."""
    return [load_object(t, f"{where}[{i}]") for i, t in enumerate(targets)]


def check_tools(tools: Sequence[Callable], where: str = "`rollout.tools`") -> dict[str, Callable]:
    """Tools by name; UserError for a non-function, a missing docstring or a repeated name."""
    by_name: dict[str, Callable] = {}
    for i, tool in enumerate(tools):
        name = getattr(tool, "__name__", None)
        if not callable(tool) or not name:
            raise UserError(f"{where}[{i}]: got {tool!r}, expected a function")
        if not (inspect.getdoc(tool) or "").strip():
            raise UserError(f"{where}[{i}]: the tool {name!r} has no docstring; a tool needs one (it tells the "
                            "model, through the chat template, what the tool does)")
        if name in by_name:
            raise UserError(f"{where}[{i}]: a second tool named {name!r}; tool names must be unique")
        by_name[name] = tool
    if not by_name:
        raise UserError(f"{where}: got no tools, expected at least one function")
    return by_name


class ToolEnvironment:
    """One episode of tool use: `step` runs the calls in a turn and shows the results.

    Args:
      tools: the functions the policy may call (see `check_tools`).
      format: "tagged" (``<call>name(args)</call>`` -> ``<result>...</result>``) or "chat"
        (``<tool_call>{json}</tool_call>`` -> tool messages for the chat template).
    """

    def __init__(self, tools: Sequence[Callable], format: str = "tagged"):
        if format not in FORMATS:
            raise UserError(f"`rollout.tool_format`: got {format!r}, expected one of {list(FORMATS)}")
        self.tools = check_tools(tools)
        self.format = format
        self.stop_strings = [formats.CALL_CLOSE] if format == "tagged" else []
        self._parameters = {name: len(inspect.signature(tool).parameters) for name, tool in self.tools.items()}
        self.calls = self.errors = 0

    def reset(self, example):
        """The example's prompt as it is (tagged), or as a user message for the chat template (chat)."""
        self.calls = self.errors = 0
        if self.format == "tagged":
            return None
        # The prompt as the dataset holds it (not one a task already rendered with the template).
        raw = getattr(example, "raw_prompt", None)
        return raw if isinstance(raw, list) else [{"role": "user", "content": raw if isinstance(raw, str)
                                                   else example.prompt}]

    def step(self, completion_text: str):
        """The results of the turn's calls, or None when it has none (the policy's final answer)."""
        if self.format == "tagged":
            calls = formats.parse_tagged(completion_text, self._parameters)
        else:
            calls = formats.parse_chat(completion_text)
        if not calls:
            return None
        results = [(call.name, self._run(call)) for call in calls]
        if self.format == "tagged":
            return "".join(formats.render_tagged(result) for _, result in results)
        return [formats.chat_tool_message(name, result) for name, result in results]

    def _run(self, call: formats.Call) -> str:
        self.calls += 1
        if call.error is None and call.name not in self.tools:
            call = call._replace(error=f"unknown tool {call.name!r}; tools: {', '.join(sorted(self.tools))}")
        if call.error is not None:
            self.errors += 1
            return f"error: {call.error}"
        try:
            return str(self.tools[call.name](*call.args, **(call.kwargs or {})))
        except Exception as err:  # the tool's failure is the observation; the episode goes on
            self.errors += 1
            return f"error: {type(err).__name__}: {err}"

    def metrics(self) -> dict[str, float]:
        return {"tools/calls": float(self.calls), "tools/errors": float(self.errors)}


__all__ = ["FORMATS", "ToolEnvironment", "check_tools", "load_tools"]
