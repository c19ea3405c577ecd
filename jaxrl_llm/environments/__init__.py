"""Environments and tools for multi-turn rollouts.

An environment (`base.py`) is a class with `reset(example)` and `step(completion_text)`, one
instance per episode; `rollout.episodes.sample_episodes` runs the policy's turns against them
over one continued KV cache. `ToolEnvironment` (`tools.py`) is the built-in one: tools are plain
functions, called from the policy's text in the `tagged` or `chat` format (`formats.py`).
`Renderer` (`render.py`) turns prompts and observations into tokens, through the chat template
for chat messages.
"""

from __future__ import annotations

from jaxrl_llm.environments.base import Environment, check_environment_class, has_method, load_environment
from jaxrl_llm.environments.formats import parse_chat, parse_tagged
from jaxrl_llm.environments.render import Renderer
from jaxrl_llm.environments.tools import FORMATS, ToolEnvironment, check_tools, load_tools


def environment_factory(environment: str | None = None, options: dict | None = None, tools=(),
                        tool_format: str = "tagged"):
    """`(factory, tools)`: a factory of one fresh environment per episode, from a class target
    (`environment`, built with `options`) or from tool targets (the built-in `ToolEnvironment`
    in `tool_format`), and the tool functions (for the chat template; [] for a custom class)."""
    if environment is not None:
        return load_environment(environment, options), []
    functions = load_tools(tools)
    ToolEnvironment(functions, tool_format)  # checks the tools and the format now, at start-up
    return (lambda: ToolEnvironment(functions, tool_format)), functions


__all__ = ["FORMATS", "Environment", "Renderer", "ToolEnvironment", "check_environment_class", "check_tools",
           "environment_factory", "has_method", "load_environment", "load_tools", "parse_chat", "parse_tagged"]
