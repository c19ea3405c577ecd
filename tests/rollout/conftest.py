"""Shared fixtures: a tiny random Llama built in PyTorch, saved, and loaded by our ``from_pretrained``."""

import numpy as np
import pytest
import torch
import transformers

from jaxrl_llm import models

VOCAB = 96
TINY_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(transformers model, our model) with the same random float32 weights.

    The lm_head is scaled up so the next-token distributions are far from uniform (a random init
    with std 0.02 gives near-uniform logits, where sampling tests would have little power).
    """
    config = transformers.LlamaConfig(**TINY_LLAMA)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        hf.lm_head.weight.mul_(15.0)
    path = tmp_path_factory.mktemp("tiny_llama")
    hf.save_pretrained(path)
    return hf, models.from_pretrained(path)


@pytest.fixture(scope="session")
def prompts():
    """Left-padded prompts [3, 7] (0, 2 and 5 pad tokens, pad id 0) and their mask."""
    rng = np.random.RandomState(0)
    ids = rng.randint(1, VOCAB, (3, 7))
    mask = np.ones((3, 7), np.int32)
    for row, pad in enumerate((0, 2, 5)):
        mask[row, :pad] = 0
    return np.where(mask == 1, ids, 0).astype(np.int32), mask
