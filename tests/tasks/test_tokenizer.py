"""The character tokenizer round-trips through transformers' AutoTokenizer."""

import transformers

from jaxrl_llm.tasks.tokenizer import ALPHABET, VOCAB, save_char_tokenizer


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
