"""A character-level tokenizer for the arithmetic task, saved in Hugging Face format.

Vocabulary (16 ids): ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, ``0``-``9`` 4-13, ``+`` 14,
``=`` 15. Every character is one token; nothing is added on encode (no BOS), and decoding joins
tokens without spaces, so ``decode(encode(s)) == s`` for strings over the alphabet.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
ALPHABET = tuple("0123456789+=")
VOCAB = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}


def build_char_tokenizer():
    """A ``tokenizers.Tokenizer``: one token per character of ``ALPHABET``, unknown chars -> ``<unk>``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def char_tokenizer():
    """The tokenizer as a ``transformers.PreTrainedTokenizerFast`` with pad/bos/eos/unk set."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_char_tokenizer(),
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        model_max_length=32,
    )


def save_char_tokenizer(path: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` + ``tokenizer_config.json`` (+ special tokens) for ``AutoTokenizer``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    char_tokenizer().save_pretrained(str(path))
    # transformers 5 writes its own class name; the generic fast class also loads in transformers 4.
    config_file = path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
