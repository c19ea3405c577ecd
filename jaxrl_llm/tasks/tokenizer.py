"""Character-level tokenizers for the arithmetic tasks, saved in Hugging Face format.

Plain vocabulary (16 ids, ``VOCAB``): ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``0``-``9``
4-13, ``+`` 14, ``=`` 15. Every character is one token; nothing is added on encode (no BOS), and
decoding joins tokens without spaces, so ``decode(encode(s)) == s`` for strings over the alphabet.

Tool vocabulary (23 ids, ``TOOL_VOCAB``, ``tools=True``): the same 16 ids, then ``(`` 16, ``)`` 17,
``calc`` 18, ``<call>`` 19, ``</call>`` 20, ``<result>`` 21, ``</result>`` 22, for the tagged tool
format of ``jaxrl_llm.environments.formats`` (``tasks/tool_arithmetic.py``). The multi-character
tokens are ordinary tokens (``skip_special_tokens`` keeps them), each one id; every other
character is still one token.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from jaxrl_llm.environments.formats import CALL_CLOSE, CALL_OPEN, RESULT_CLOSE, RESULT_OPEN

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ALPHABET = tuple("0123456789+=")
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}

TOOL_NAME = "calc"
TOOL_TOKENS = ("(", ")", TOOL_NAME, CALL_OPEN, CALL_CLOSE, RESULT_OPEN, RESULT_CLOSE)
TOOL_VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET + TOOL_TOKENS)}

# Longest first, so a multi-character token wins over its first character; "." is any other char.
_TOOL_SPLIT = "|".join(re.escape(t) for t in sorted(TOOL_TOKENS, key=len, reverse=True) if len(t) > 1) + "|."
_MAX_LENGTH = {False: 32, True: 64}


def build_char_tokenizer(tools: bool = False):
    """A ``tokenizers.Tokenizer`` over ``VOCAB`` (or ``TOOL_VOCAB`` with ``tools``): one token per
    character, or per tool tag / tool name; anything outside the vocabulary -> ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = TOOL_VOCAB if tools else VOCAB
    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_TOOL_SPLIT if tools else "."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def char_tokenizer(tools: bool = False):
    """The tokenizer as a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set
    (``model_max_length`` 32, or 64 for the longer tool transcripts)."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_char_tokenizer(tools),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=_MAX_LENGTH[bool(tools)],
    )


def save_char_tokenizer(path: str | os.PathLike, tools: bool = False) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ special tokens) for ``AutoTokenizer``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    char_tokenizer(tools).save_pretrained(str(path))
    # transformers 5 writes its own class name; the generic fast class also loads in transformers 4.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
