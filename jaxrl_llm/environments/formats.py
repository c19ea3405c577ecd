"""How tool calls look in the text a policy writes, and how tool results are shown to it.

``tagged`` (base models, and the shipped tiny tool policy)::

    policy:      <call>calc(1234+5678)</call>
    environment: <result>6912</result>

A policy turn ends at ``</call>``. The call is ``name(arguments)``: Python literals, positional
or by keyword (``lookup("Paris", year=2020)``); for a tool of one parameter, text that is not a
literal is passed as the string it is (``calc(1234+5678)`` calls ``calc("1234+5678")``).

``chat`` (chat models): the Hermes / Qwen convention that chat templates with tool support use::

    policy:      <tool_call>{"name": "calc", "arguments": {"expression": "1234+5678"}}</tool_call>
    environment: a message {"role": "tool", "name": "calc", "content": "6912"}, rendered by the
                 tokenizer's chat template

The turn ends at the template's end-of-turn token (EOS); a turn may hold several calls.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, NamedTuple

CALL_OPEN, CALL_CLOSE = "<call>", "</call>"
RESULT_OPEN, RESULT_CLOSE = "<result>", "</result>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class Call(NamedTuple):
    """A tool call parsed from a turn; `error` says why it cannot run (then name/args may be None)."""

    name: str | None
    args: tuple = ()
    kwargs: dict | None = None
    error: str | None = None


def parse_tagged(text: str, parameters: dict[str, int]) -> list[Call]:
    """The call of a tagged-format turn (at most one: the turn ends at its ``</call>``); [] when the
    turn holds none. `parameters`: each tool's name -> its number of parameters."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return []
    body = text[start + len(CALL_OPEN):]
    end = body.find(CALL_CLOSE)
    if end < 0:
        return [Call(None, error=f"malformed call: no {CALL_CLOSE} after {CALL_OPEN}")]
    body = body[:end].strip()
    match = re.fullmatch(r"([A-Za-z_]\w*)\s*\((.*)\)", body, flags=re.DOTALL)
    if match is None:
        return [Call(None, error=f"malformed call {body!r}: expected name(arguments)")]
    name, arguments = match.group(1), match.group(2)
    if name not in parameters:
        return [Call(name, error=f"unknown tool {name!r}; tools: {', '.join(sorted(parameters))}")]
    try:
        call = ast.parse(f"f({arguments})", mode="eval").body
        args = tuple(ast.literal_eval(a) for a in call.args)
        kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None}
        if len(kwargs) != len(call.keywords):
            raise ValueError("**kwargs")
        return [Call(name, args, kwargs)]
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        if parameters[name] == 1 and arguments.strip():
            return [Call(name, (arguments.strip(),), {})]
        return [Call(name, error=f"malformed arguments {arguments!r}: expected Python literals")]


def render_tagged(result: str) -> str:
    return f"{RESULT_OPEN}{result}{RESULT_CLOSE}"


def parse_chat(text: str) -> list[Call]:
    """Every ``<tool_call>{json}</tool_call>`` of a chat-format turn, in order; [] when none."""
    calls = []
    for match in re.finditer(re.escape(TOOL_CALL_OPEN) + r"(.*?)(" + re.escape(TOOL_CALL_CLOSE) + r"|$)", text,
                             flags=re.DOTALL):
        body, closed = match.group(1).strip(), bool(match.group(2))
        if not closed:
            calls.append(Call(None, error=f"malformed call: no {TOOL_CALL_CLOSE} after {TOOL_CALL_OPEN}"))
            continue
        try:
            data = json.loads(body)
            name, arguments = data["name"], data.get("arguments", {})
            if isinstance(arguments, str):
                arguments = json.loads(arguments)
            if not isinstance(name, str) or not isinstance(arguments, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            calls.append(Call(None, error=f'malformed call {body!r}: expected {{"name": ..., "arguments": {{...}}}}'))
            continue
        calls.append(Call(name, (), arguments))
    return calls


def chat_tool_message(name: str | None, content: str) -> dict[str, Any]:
    message = {"role": "tool", "content": content}
    if name is not None:
        message["name"] = name
    return message


__all__ = ["CALL_CLOSE", "CALL_OPEN", "Call", "RESULT_CLOSE", "RESULT_OPEN", "TOOL_CALL_CLOSE", "TOOL_CALL_OPEN",
           "chat_tool_message", "parse_chat", "parse_tagged", "render_tagged"]
