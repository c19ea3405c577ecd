"""Files shipped with the package: the tiny arithmetic policy (``tiny_arithmetic/``)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).resolve().parent


def tiny_arithmetic_path() -> Path:
    """Directory of the shipped tiny arithmetic policy: config.json, model.safetensors, tokenizer files.

    Loadable with ``jaxrl_llm.models.from_pretrained`` and transformers' ``AutoModelForCausalLM`` /
    ``AutoTokenizer``; ``training_log.json`` there records how it was made.
    """
    return _HERE / "tiny_arithmetic"


__all__ = ["tiny_arithmetic_path"]
