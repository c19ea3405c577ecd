"""Flax NNX causal LMs that load Hugging Face checkpoints and match transformers' logits.

Families: Llama (Llama 2/3, Mistral, Qwen2/2.5, Qwen3), GPT-NeoX (Pythia), Gemma 3 text.
Heads for RL: ``ValueHead`` / ``make_critic`` (PPO) and ``RewardModel`` (sequence classification).
"""

import jax
import jax.numpy as jnp

from jaxrl_llm.models.base import CausalLM
from jaxrl_llm.models.heads import (
    Critic,
    RewardModel,
    ValueHead,
    make_critic,
    reward_model_from_pretrained,
)
from jaxrl_llm.models.hf_io import from_config, from_pretrained, save_pretrained
from jaxrl_llm.models.layers import KVCache


def init_cache(model: CausalLM, batch_size: int, max_length: int, dtype=None) -> KVCache:
    """Empty KV cache: k/v per layer [B, max_length, kv_heads, head_dim], ``valid`` [B, max_length], ``index`` 0.

    ``dtype`` defaults to the model's parameter dtype.
    """
    return model.init_cache(batch_size, max_length, dtype)


def hidden_states(model: CausalLM, input_ids, attention_mask=None, positions=None, segment_ids=None):
    """Final normed hidden states [B, S, D] (what heads consume); ``model.unembed(h)`` gives the logits.
    ``segment_ids`` [B, S]: packed sequences (see ``layers.make_context``)."""
    hidden, _ = model.hidden_states(input_ids, attention_mask, positions, segment_ids=segment_ids)
    return hidden


def cast_floating(tree, dtype):
    """Every floating-point leaf of a parameter pytree in `dtype` (integers, keys and None as they are).

    Mixed precision: the optimizer keeps float32 master parameters and the forward pass runs on
    this cast (`dtype` bfloat16); the cast is differentiable, so gradients arrive in float32.
    `dtype=None` returns the tree unchanged.
    """
    if dtype is None:
        return tree
    dtype = jnp.dtype(dtype)

    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x

    return jax.tree.map(cast, tree)


def unembedding_matrix(model: CausalLM):
    """[D, V] matrix W with ``logits = softcap(hidden @ W)``; see ``CausalLM.unembed``."""
    return model.unembedding_matrix()


__all__ = [
    "CausalLM",
    "Critic",
    "cast_floating",
    "KVCache",
    "RewardModel",
    "ValueHead",
    "from_config",
    "from_pretrained",
    "hidden_states",
    "init_cache",
    "make_critic",
    "reward_model_from_pretrained",
    "save_pretrained",
    "unembedding_matrix",
]
