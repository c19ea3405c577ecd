"""The character tokenizer round-trips through transformers' AutoTokenizer."""

import transformers

from jaxrl_llm.tasks.tokenizer import ALPHABET, TOOL_VOCAB, VOCAB, char_tokenizer, save_char_tokenizer


def test_char_tokenizer_round_trip(tmp_path):
    save_char_tokenizer(tmp_path)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == len(VOCAB) == 16
    ids = tok("23+58=")["input_ids"]  # no special tokens are added on encode
    assert ids == [VOCAB[c] for c in "23+58="]
    assert tok.convert_ids_to_tokens(ids) == list("23+58=")
    assert tok.decode(ids) == "23+58="
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == "23+58="
    assert tok.decode([VOCAB[c] for c in ALPHABET]) == "".join(ALPHABET)
    batch = tok(["1+2=", "23+58="], padding=True)  # left padding, as rollouts expect
    assert batch["input_ids"][0][:2] == [0, 0] and batch["attention_mask"][0] == [0, 0, 1, 1, 1, 1]


def test_tool_tokenizer_round_trip(tmp_path):
    save_char_tokenizer(tmp_path, tools=True)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == len(TOOL_VOCAB) == 23 and tok.model_max_length == 64
    assert all(TOOL_VOCAB[t] == i for t, i in VOCAB.items())  # the 16 arithmetic ids are unchanged
    assert [TOOL_VOCAB[t] for t in ("(", ")", "calc", "<call>", "</call>", "<result>", "</result>")] == list(range(16, 23))
    text = "12+34=<call>calc(12+34)</call><result>46</result>46"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == [*"12+34=", "<call>", "calc", "(", *"12+34", ")", "</call>", "<result>",
                                              *"46", "</result>", *"46"]
    for tag in ("<call>", "</call>", "<result>", "</result>", "calc"):
        assert tok.encode(tag) == [TOOL_VOCAB[tag]]
    assert tok.decode(ids + [tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text  # ordinary tokens
    assert tok.encode("cal(") == [3, 3, 3, TOOL_VOCAB["("]]  # a partial tag is unknown characters, not a tag
    assert char_tokenizer().encode("(") == [3]  # the plain tokenizer has no tool tokens
