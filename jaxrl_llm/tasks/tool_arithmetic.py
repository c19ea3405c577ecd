"""Four-digit addition with a calculator tool: ``1234+5678=`` -> ``6912`` then EOS, directly or via ``calc``.

The multi-turn task: operands up to 9999 are too large for the tiny policy to add reliably in its
head, but it can call a calculator and copy the result. RL should teach it to prefer the tool.

Format (the tagged tool format of ``jaxrl_llm.environments.formats``; prompt without BOS)
  * prompt: ``{a}+{b}=``
  * direct path, the whole completion: ``{a+b}<eos>``
  * tool path, the whole completion region: ``<call>calc({a}+{b})</call><result>{a+b}</result>{a+b}<eos>``.
    The policy writes ``<call>calc({a}+{b})</call>`` (its turn ends at ``</call>``), the
    environment appends the observation ``<result>...</result>`` (the output of ``calc`` on the
    call's argument; not the policy's tokens: mask them out of losses), then the policy writes the
    final answer and EOS.

Tool
  ``calc(expression)`` evaluates an integer expression of ``+ - *``, unary ``-`` and parentheses
  by walking its ``ast``, never ``eval``: no names, calls, attributes, powers or floats; bounded
  length and magnitude. It computes what it is given: a miscopied operand gives a wrong result.

Data and held-out pairs: as ``ArithmeticTask`` (``tasks/arithmetic.py``), operands in
``[100, 9999]`` by default; with ~98M pairs the held-out evaluation set is drawn, not enumerated.

Reward (``score``): the final answer is the text after the LAST ``</result>`` of the completion
(the whole text when there is none, i.e. the direct path). 1.0 iff the completion ``finished``
(ended with EOS) and the final answer is exactly ``str(a + b)``; otherwise 0.0, or with
``partial_credit`` the parent's formula applied to the final answer. A call alone (no result, no
answer) scores 0. The verifier does not check that the result came from the tool: a policy that
writes ``</result>`` itself is judged by what follows it, like any other answer.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence

import numpy as np

from jaxrl_llm.environments.formats import CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN
from jaxrl_llm.tasks.arithmetic import ArithmeticTask
from jaxrl_llm.tasks.base import Example, check_batch_lengths

MAX_EXPRESSION_CHARS = 200
MAX_ABS_VALUE = 10**40  # larger intermediate values are refused: no huge products

_BINARY = {ast.Add: int.__add__, ast.Sub: int.__sub__, ast.Mult: int.__mul__}


def calc(expression: str) -> str:
    """Evaluate an integer arithmetic expression: + - * and parentheses. Returns the value as decimal digits.

    Only integer literals, binary ``+ - *``, unary ``-`` and parentheses are allowed (``"12*(3-5)"``
    -> ``"-24"``); the expression is parsed with ``ast`` and walked, never passed to ``eval``. A
    plain int is taken as its decimal text: the tagged format's parser hands ``calc(1234)`` over
    as the literal 1234.

    Args:
        expression: the expression to evaluate, e.g. "1234+5678".

    Raises:
      ValueError: anything else (names, calls, ``**``, ``/``, floats), a syntax error, more than
        ``MAX_EXPRESSION_CHARS`` characters, or a value beyond ``MAX_ABS_VALUE``. The message starts
        with ``calc:`` and is short, fit to show to a policy as the tool's answer.
    """
    if isinstance(expression, int) and not isinstance(expression, bool):
        expression = str(expression)
    if not isinstance(expression, str):
        raise ValueError(f"calc: expected a string expression, got {type(expression).__name__}")
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"calc: expression too long ({len(expression)} > {MAX_EXPRESSION_CHARS} characters)")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        raise ValueError("calc: invalid expression") from None
    return str(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int:
    """The integer value of an allowed expression node; ValueError for any other node."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        value = node.value
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        value = -_evaluate(node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        value = _BINARY[type(node.op)](_evaluate(node.left), _evaluate(node.right))
    else:
        raise ValueError("calc: unsupported syntax (only integers, + - * and parentheses)")
    if abs(value) > MAX_ABS_VALUE:
        raise ValueError("calc: number too large")
    return value


def final_answer(text: str) -> str:
    """The answer part of a completion: the text after the last ``</result>``, or all of it when there is none."""
    return text.rpartition(RESULT_CLOSE)[2]


def tool_call(expression: str) -> str:
    """The policy's call of ``calc`` on ``expression``: ``<call>calc(expression)</call>``."""
    return f"{CALL_OPEN}calc({expression}){CALL_CLOSE}"


def tool_observation(expression: str) -> str:
    """What the environment appends after that call: ``<result>{calc(expression)}</result>``."""
    return f"{RESULT_OPEN}{calc(expression)}{RESULT_CLOSE}"


class ToolArithmeticTask(ArithmeticTask):
    """``a+b=`` prompts (operands in ``[100, 9999]``) answered directly or through ``calc``; see the module docstring.

    Args: as ``ArithmeticTask`` (``min_operand``, ``max_operand``, ``partial_credit``, ``seed``,
    ``num_eval``, ``holdout_fraction``), with larger default operands. ``Example.answer`` is the
    final answer ``str(a + b)``; the completion may reach it through a tool call.
    """

    name = "tool_arithmetic"

    def __init__(
        self,
        min_operand: int = 100,
        max_operand: int = 9999,
        partial_credit: bool = False,
        seed: int = 0,
        num_eval: int | None = None,
        holdout_fraction: float = 0.1,
    ):
        super().__init__(
            min_operand=min_operand,
            max_operand=max_operand,
            partial_credit=partial_credit,
            seed=seed,
            num_eval=num_eval,
            holdout_fraction=holdout_fraction,
        )

    @staticmethod
    def tool_completion(a: int, b: int) -> str:
        """The reference tool-path completion text for ``a+b=`` (EOS excluded)."""
        expression = f"{a}+{b}"
        return tool_call(expression) + tool_observation(expression) + str(a + b)

    def score(self, example: Example, completion_text: str, *, finished: bool) -> float:
        """The parent's reward (exact, or ``partial_credit``) on ``final_answer(completion_text)``."""
        return super().score(example, final_answer(completion_text), finished=finished)

    def accuracy(self, examples: Sequence[Example], texts: Sequence[str], finished) -> float:
        """Fraction of EOS-terminated completions whose final answer is exact (ignores ``partial_credit``)."""
        check_batch_lengths(examples, texts, finished)
        if not examples:
            return 0.0
        hits = [bool(f) and final_answer(t) == e.answer for e, t, f in zip(examples, texts, finished)]
        return float(np.mean(hits))


def default_policy_path():
    """Directory of the shipped tiny tool-aware policy (HF format: config, weights, tokenizer)."""
    from jaxrl_llm.assets import tiny_tool_arithmetic_path

    return tiny_tool_arithmetic_path()


__all__ = ["MAX_ABS_VALUE", "MAX_EXPRESSION_CHARS", "ToolArithmeticTask", "calc", "default_policy_path",
           "final_answer", "tool_call", "tool_observation"]
