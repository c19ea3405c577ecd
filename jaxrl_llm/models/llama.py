"""Llama family: Llama 2/3, Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head q/k RMSNorm).

Pre-norm decoder: ``x += attn(rmsnorm(x)); x += swiglu(rmsnorm(x))``, RoPE (default, linear,
llama3, yarn), grouped-query attention, optional sliding-window layers, tied or untied unembedding.
Semantics follow transformers' ``modeling_{llama,mistral,qwen2,qwen3}.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers
from jaxrl_llm.models.base import CausalLM, check_dtype, config_to_json

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def layer_windows(cfg) -> tuple[int | None, ...]:
    """Sliding window per layer: ``layer_types`` when the config has them, Mistral's global window otherwise."""
    n = cfg.num_hidden_layers
    layer_types = getattr(cfg, "layer_types", None)
    window = getattr(cfg, "sliding_window", None)
    if layer_types is not None:
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if cfg.model_type == "mistral":
        return (window,) * n
    return (None,) * n


def _attention_biases(cfg) -> tuple[bool, bool]:
    """(q/k/v bias, output bias): Qwen2 hard-codes q/k/v bias and no output bias."""
    if cfg.model_type == "qwen2":
        return True, False
    bias = bool(getattr(cfg, "attention_bias", False))
    return bias, bias


class LlamaDecoderLayer(nnx.Module):
    def __init__(self, cfg, layer_idx: int, *, rope: layers.RopeSpec, dtype, rngs: nnx.Rngs):
        qkv_bias, o_bias = _attention_biases(cfg)
        head_dim = head_dim_of(cfg)
        self.self_attn = layers.Attention(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=cfg.model_type == "qwen3",
            norm_eps=cfg.rms_norm_eps,
            norm_plus_one=False,
            scale=head_dim**-0.5,
            rope=rope,
            sliding_window=layer_windows(cfg)[layer_idx],
            softcap=None,
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp = layers.GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_act,
            use_bias=bool(getattr(cfg, "mlp_bias", False)), dtype=dtype, rngs=rngs,
        )
        self.input_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.post_attention_layernorm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)

    def __call__(self, x, ctx, kv, *, last_only=False):
        attn, kv = self.self_attn(self.input_layernorm(x), ctx, kv, last_only=last_only)
        x = x[:, -attn.shape[1]:] + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv


class LlamaModel(nnx.Module):
    """Backbone: embed_tokens -> layers -> norm. ``execution`` (static) says how the layers run."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        rope = layers.rope_spec(
            cfg.rope_parameters, head_dim=head_dim_of(cfg), max_position_embeddings=cfg.max_position_embeddings
        )
        self.embed_tokens = layers.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [LlamaDecoderLayer(cfg, i, rope=rope, dtype=dtype, rngs=rngs) for i in range(cfg.num_hidden_layers)]
        )
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype)
        self.execution = layers.Execution()

    def __call__(self, input_ids, ctx, kv, *, last_only=False):
        x, kv = layers.run_layers(
            self.layers, self.embed_tokens(input_ids), ctx, kv, last_only=last_only, execution=self.execution
        )
        return self.norm(x), kv


class LlamaForCausalLM(CausalLM):
    """Llama-family causal LM; ``lm_head`` is None when ``tie_word_embeddings``."""

    base_prefix = "model"

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.model_type not in MODEL_TYPES:
            raise UserError(f"config.model_type: got {cfg.model_type!r}, expected one of {MODEL_TYPES}")
        dtype = check_dtype(dtype)
        self.config_json = config_to_json(cfg)
        self.model_type = cfg.model_type
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.dtype = dtype
        self.final_logit_softcapping = None
        self.model = LlamaModel(cfg, dtype=dtype, rngs=rngs)
        tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.lm_head = None if tied else layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    def input_embedding_matrix(self) -> jax.Array:
        return self.model.embed_tokens.weight[...]
