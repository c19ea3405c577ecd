"""Files shipped with the package: the tiny arithmetic policy (``tiny_arithmetic/``) and the tiny
tool-aware policy of the ``tool_arithmetic`` task (``tiny_tool_arithmetic/``)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def tiny_arithmetic_path() -> Path:
    """Directory of the shipped tiny arithmetic policy: config.json, model.safetensors, tokenizer files.

    Loadable with ``jaxrl_llm.models.from_pretrained`` and transformers' ``AutoModelForCausalLM`` /
    ``AutoTokenizer``; ``training_log.json`` there records how it was made.
    """
    return _HERE / "tiny_arithmetic"


def tiny_tool_arithmetic_path() -> Path:
    """Directory of the shipped tiny tool-aware policy (``tool_arithmetic`` task, 23-token tool vocabulary).

    Same files and loaders as ``tiny_arithmetic_path()``; it has seen the ``<call>calc(...)</call>``
    format in 30% of its training data but rarely chooses it greedily (see its README.md).
    """
    return _HERE / "tiny_tool_arithmetic"


__all__ = ["tiny_arithmetic_path", "tiny_tool_arithmetic_path"]
