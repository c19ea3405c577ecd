"""The shipped tiny arithmetic policy: loads with ours and transformers alike, sits in its accuracy band."""

import json

import numpy as np
import pytest
import torch
import transformers

from jaxrl_llm.models import from_pretrained
from jaxrl_llm.tasks import ArithmeticTask, default_policy_path
from jaxrl_llm.tasks.evaluate import decode_completions, encode_prompts, greedy_accuracy, greedy_generate

POLICY = default_policy_path()


@pytest.fixture(scope="module")
def policy():
    return from_pretrained(POLICY)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(POLICY))


@pytest.fixture(scope="module")
def log():
    return json.loads((POLICY / "training_log.json").read_text())


def test_shipped_files():
    names = {p.name for p in POLICY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md", "training_log.json"} <= names
    assert sum(p.stat().st_size for p in POLICY.iterdir()) < 4 * 2**20


def test_logits_match_transformers(policy, tokenizer):
    prompts = [e.prompt + e.answer for e in ArithmeticTask().eval_examples()[:16]]
    ids, mask = encode_prompts(tokenizer, prompts)  # left-padded, as rollouts feed it
    ours = np.asarray(policy(ids, attention_mask=mask))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(POLICY), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()).logits.numpy()
    np.testing.assert_allclose(ours[mask.astype(bool)], theirs[mask.astype(bool)], atol=1e-4, rtol=0)


def test_heldout_accuracy_is_in_the_documented_band(policy, tokenizer, log):
    low, high = log["band"]
    acc, texts, finished = greedy_accuracy(policy, tokenizer, ArithmeticTask())
    assert low <= acc <= high
    assert acc == pytest.approx(log["heldout_accuracy"], abs=0.011)  # <= 2 of 200 argmax flips across platforms
    assert finished.mean() > 0.9 and all(t.isdigit() for t, f in zip(texts, finished) if f and t)


def test_greedy_decoder_stops_at_eos_and_pads(policy, tokenizer):
    ids, mask = encode_prompts(tokenizer, ["1+2=", "50+50="])
    out = greedy_generate(policy, ids, mask, max_new_tokens=6, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id)
    assert out.shape == (2, 6)
    for row in out.tolist():
        assert tokenizer.eos_token_id in row
        end = row.index(tokenizer.eos_token_id)
        assert set(row[end + 1 :]) <= {tokenizer.pad_token_id}
    texts, finished = decode_completions(tokenizer, out)
    assert finished.all() and all(t.isdigit() for t in texts)
