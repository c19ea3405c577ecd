"""GPT-NeoX (Pythia), after transformers' ``modeling_gpt_neox.py``.

LayerNorm with bias, fused ``query_key_value`` projection laid out per head as [q | k | v],
partial rotary embeddings (``rotary_pct`` -> ``partial_rotary_factor``), a plain GELU MLP with
biases, and either the parallel residual ``x + attn(ln1(x)) + mlp(ln2(x))`` or the sequential one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers
from jaxrl_llm.models.base import CausalLM, check_dtype, config_to_json


class GPTNeoXAttention(nnx.Module):
    def __init__(self, cfg, *, rope: layers.RopeSpec, dtype, rngs: nnx.Rngs):
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.rope = rope
        bias = bool(getattr(cfg, "attention_bias", True))
        self.query_key_value = layers.Linear(cfg.hidden_size, 3 * cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)
        self.dense = layers.Linear(cfg.hidden_size, cfg.hidden_size, use_bias=bias, dtype=dtype, rngs=rngs)

    def __call__(self, x, ctx, kv, *, last_only=False):
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).reshape(batch, seq, self.num_heads, 3 * self.head_dim)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out, kv = layers.rotary_attention(q, k, v, ctx, kv, rope=self.rope, last_only=last_only,
                                          scale=self.head_dim**-0.5)
        return self.dense(out.reshape(batch, out.shape[1], -1)), kv


class GPTNeoXMLP(nnx.Module):
    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.act = cfg.hidden_act
        layers.activation(self.act)
        self.dense_h_to_4h = layers.Linear(cfg.hidden_size, cfg.intermediate_size, use_bias=True, dtype=dtype, rngs=rngs)
        self.dense_4h_to_h = layers.Linear(cfg.intermediate_size, cfg.hidden_size, use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.dense_4h_to_h(layers.activation(self.act)(self.dense_h_to_4h(x)))


class GPTNeoXLayer(nnx.Module):
    def __init__(self, cfg, *, rope: layers.RopeSpec, dtype, rngs: nnx.Rngs):
        self.use_parallel_residual = bool(cfg.use_parallel_residual)
        self.input_layernorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.post_attention_layernorm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.attention = GPTNeoXAttention(cfg, rope=rope, dtype=dtype, rngs=rngs)
        self.mlp = GPTNeoXMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, ctx, kv, *, last_only=False):
        attn, kv = self.attention(self.input_layernorm(x), ctx, kv, last_only=last_only)
        x = x[:, -attn.shape[1]:]
        if self.use_parallel_residual:
            return self.mlp(self.post_attention_layernorm(x)) + attn + x, kv
        x = attn + x
        return self.mlp(self.post_attention_layernorm(x)) + x, kv


class GPTNeoXModel(nnx.Module):
    """Backbone: embed_in -> layers -> final_layer_norm. ``execution`` (static) says how the layers run."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        rope = layers.rope_spec(cfg.rope_parameters, head_dim=head_dim, max_position_embeddings=cfg.max_position_embeddings)
        self.embed_in = layers.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([GPTNeoXLayer(cfg, rope=rope, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_layer_norm = layers.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype)
        self.execution = layers.Execution()

    def __call__(self, input_ids, ctx, kv, *, last_only=False):
        x, kv = layers.run_layers(
            self.layers, self.embed_in(input_ids), ctx, kv, last_only=last_only, execution=self.execution
        )
        return self.final_layer_norm(x), kv


class GPTNeoXForCausalLM(CausalLM):
    """GPT-NeoX causal LM; the unembedding is ``lm_head`` (``embed_out`` in older checkpoints)."""

    base_prefix = "gpt_neox"

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.model_type != "gpt_neox":
            raise UserError(f"config.model_type: got {cfg.model_type!r}, expected 'gpt_neox'")
        dtype = check_dtype(dtype)
        self.config_json = config_to_json(cfg)
        self.model_type = cfg.model_type
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.dtype = dtype
        self.final_logit_softcapping = None
        self.gpt_neox = GPTNeoXModel(cfg, dtype=dtype, rngs=rngs)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if tied else layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    def input_embedding_matrix(self) -> jax.Array:
        return self.gpt_neox.embed_in.weight[...]
