"""Greedy evaluation of a causal LM on a task's examples (held-out accuracy).

A deliberately small decoder: one full forward pass per new token over a fixed [B, P + T] buffer
(causal attention makes the not-yet-written tail irrelevant), so it compiles once per shape and
needs no KV cache. Right for the few-token answers of the toy tasks; use ``jaxrl_llm.rollout``
for sampling long completions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.base import Example


def encode_prompts(tokenizer, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded ``(input_ids, attention_mask)``, both int32 [B, P], without special tokens added."""
    from jaxrl_llm.rollout.padding import left_pad

    rows = [tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    return left_pad(rows, max(len(r) for r in rows), tokenizer.pad_token_id)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "pad_id"))
def _greedy(graphdef, state, input_ids, attention_mask, *, max_new_tokens, eos_id, pad_id):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = input_ids.shape
    tokens = jnp.concatenate([input_ids, jnp.full((batch, max_new_tokens), pad_id, input_ids.dtype)], axis=1)
    mask = jnp.concatenate([attention_mask, jnp.ones((batch, max_new_tokens), attention_mask.dtype)], axis=1)

    def step(t, carry):
        tokens, done = carry
        logits = model(tokens, attention_mask=mask)
        next_token = jnp.argmax(logits[:, prompt_len + t - 1], axis=-1).astype(tokens.dtype)
        next_token = jnp.where(done, pad_id, next_token)
        tokens = tokens.at[:, prompt_len + t].set(next_token)
        return tokens, done | (next_token == eos_id)

    tokens, _ = jax.lax.fori_loop(0, max_new_tokens, step, (tokens, jnp.zeros((batch,), bool)))
    return tokens[:, prompt_len:]


def greedy_generate(model, input_ids, attention_mask, *, max_new_tokens: int, eos_id: int, pad_id: int) -> np.ndarray:
    """Greedy completions [B, max_new_tokens] (int32): EOS once, then ``pad_id``."""
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens: got {max_new_tokens}, expected >= 1")
    graphdef, state = nnx.split(model)
    out = _greedy(
        graphdef,
        state,
        jnp.asarray(input_ids, jnp.int32),
        jnp.asarray(attention_mask, jnp.int32),
        max_new_tokens=int(max_new_tokens),
        eos_id=int(eos_id),
        pad_id=int(pad_id),
    )
    return np.asarray(out)


def decode_completions(tokenizer, completions: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Completion ids [B, T] -> (texts up to but excluding the first EOS, finished [B] bool)."""
    eos = tokenizer.eos_token_id
    texts, finished = [], []
    for row in np.asarray(completions).tolist():
        ended = eos in row
        row = row[: row.index(eos)] if ended else row
        texts.append(tokenizer.decode(row, skip_special_tokens=True))
        finished.append(ended)
    return texts, np.asarray(finished, bool)


def greedy_accuracy(
    model, tokenizer, task, examples: Sequence[Example] | None = None, *, max_new_tokens: int | None = None
) -> tuple[float, list[str], np.ndarray]:
    """Exact-match accuracy of greedy completions on ``examples`` (default: ``task.eval_examples()``).

    ``max_new_tokens`` defaults to the longest answer plus one (room for EOS).
    Returns ``(accuracy, texts, finished)``.
    """
    examples = task.eval_examples() if examples is None else list(examples)
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in examples) + 1
    ids, mask = encode_prompts(tokenizer, [e.prompt for e in examples])
    completions = greedy_generate(
        model, ids, mask, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id
    )
    texts, finished = decode_completions(tokenizer, completions)
    return task.accuracy(examples, texts, finished), texts, finished


def pass_at_k(num_correct, num_samples: int, k: int) -> np.ndarray:
    """Unbiased pass@k per prompt from `num_samples` (n) samples of which `num_correct` (c) are
    right: 1 - C(n - c, k) / C(n, k), the chance that k of the n drawn without replacement
    include a right one (Chen et al. 2021, "Evaluating Large Language Models Trained on Code",
    eq. 1). With n = k it is 1 when any sample is right. Computed as a product, not with
    factorials, so large n stays exact in float64."""
    c = np.asarray(num_correct, np.int64)
    if not 1 <= k <= num_samples:
        raise UserError(f"`k`: got {k}, expected 1 <= k <= num_samples={num_samples}.")
    if c.min(initial=0) < 0 or c.max(initial=0) > num_samples:
        raise UserError(f"`num_correct`: got values in [{c.min()}, {c.max()}], expected 0..num_samples={num_samples}.")
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i); 0 when fewer than k are wrong.
    i = np.arange(1, num_samples + 1)
    terms = np.where(i[None, :] > num_samples - c.reshape(-1, 1), 1.0 - k / i[None, :], 1.0)
    all_wrong = np.prod(terms, axis=1).reshape(c.shape)
    return np.where(num_samples - c < k, 1.0, 1.0 - all_wrong)
