"""Gemma 3 text (``Gemma3ForCausalLM``, model_type ``gemma3_text``).

Differences from Llama, after transformers' ``modeling_gemma3.py``:
  * RMSNorm scales by ``(1 + w)`` in float32; sandwich norms around attention and MLP
    (``post_attention_layernorm``, ``pre_/post_feedforward_layernorm``).
  * Embeddings are multiplied by ``sqrt(hidden_size)`` rounded to the parameter dtype.
  * Per-head q/k RMSNorm; attention scale ``query_pre_attn_scalar ** -0.5``.
  * ``layer_types`` alternate sliding-window and global layers, each with its own RoPE
    (``rope_parameters['sliding_attention']`` uses the local base frequency).
  * GeGLU MLP (``gelu_pytorch_tanh``); optional final logit soft-capping. ``attn_logit_softcapping``
    is ignored, as transformers' Gemma 3 ignores it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers
from jaxrl_llm.models.base import CausalLM, check_dtype, config_to_json


def _rope_for(cfg, layer_type: str) -> layers.RopeSpec:
    params = cfg.rope_parameters
    if layer_type in params:  # nested per layer type (the v5 layout)
        params = params[layer_type]
    return layers.rope_spec(params, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings)


class Gemma3DecoderLayer(nnx.Module):
    def __init__(self, cfg, layer_idx: int, *, dtype, rngs: nnx.Rngs):
        layer_type = cfg.layer_types[layer_idx]
        if layer_type not in ("sliding_attention", "full_attention"):
            raise UserError(
                f"config.layer_types[{layer_idx}]: got {layer_type!r}, expected 'sliding_attention' or 'full_attention'"
            )
        if getattr(cfg, "use_bidirectional_attention", False):
            raise UserError("config.use_bidirectional_attention: got True, expected False (causal LMs only)")
        eps = cfg.rms_norm_eps
        self.self_attn = layers.Attention(
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            qkv_bias=bool(cfg.attention_bias),
            o_bias=bool(cfg.attention_bias),
            qk_norm=True,
            norm_eps=eps,
            norm_plus_one=True,
            scale=cfg.query_pre_attn_scalar**-0.5,
            rope=_rope_for(cfg, layer_type),
            sliding_window=cfg.sliding_window if layer_type == "sliding_attention" else None,
            # transformers' Gemma3Attention never passes attn_logit_softcapping to its attention
            # function (Gemma 2 did), so the released behaviour is no attention soft-capping.
            softcap=None,
            dtype=dtype,
            rngs=rngs,
        )
        self.mlp = layers.GatedMLP(
            cfg.hidden_size, cfg.intermediate_size, act=cfg.hidden_activation, use_bias=False, dtype=dtype, rngs=rngs
        )
        norm = lambda: layers.RMSNorm(cfg.hidden_size, eps=eps, plus_one=True, dtype=dtype)  # noqa: E731
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, ctx, kv, *, last_only=False):
        attn, kv = self.self_attn(self.input_layernorm(x), ctx, kv, last_only=last_only)
        x = x[:, -attn.shape[1]:] + self.post_attention_layernorm(attn)
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x, kv


class Gemma3TextModel(nnx.Module):
    """Backbone: scaled embed_tokens -> layers -> norm. ``execution`` (static) says how the layers run."""

    def __init__(self, cfg, *, dtype, rngs: nnx.Rngs):
        self.embed_scale = float(cfg.hidden_size**0.5)
        self.embed_tokens = layers.Embedding(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([Gemma3DecoderLayer(cfg, i, dtype=dtype, rngs=rngs) for i in range(cfg.num_hidden_layers)])
        self.norm = layers.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, plus_one=True, dtype=dtype)
        self.execution = layers.Execution()

    def __call__(self, input_ids, ctx, kv, *, last_only=False):
        x = self.embed_tokens(input_ids)
        # The scale is rounded to the embedding dtype first (sqrt(640) becomes 25.25 in bfloat16), as in transformers.
        x = x * jnp.asarray(self.embed_scale, jnp.float32).astype(x.dtype)
        x, kv = layers.run_layers(self.layers, x, ctx, kv, last_only=last_only, execution=self.execution)
        return self.norm(x), kv


class Gemma3ForCausalLM(CausalLM):
    """Gemma 3 text causal LM; ``lm_head`` is None when tied (always, for released checkpoints)."""

    base_prefix = "model"

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.model_type != "gemma3_text":
            raise UserError(f"config.model_type: got {cfg.model_type!r}, expected 'gemma3_text'")
        dtype = check_dtype(dtype)
        self.config_json = config_to_json(cfg)
        self.model_type = cfg.model_type
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.dtype = dtype
        self.final_logit_softcapping = cfg.final_logit_softcapping
        self.model = Gemma3TextModel(cfg, dtype=dtype, rngs=rngs)
        tied = bool(getattr(cfg, "tie_word_embeddings", True))
        self.lm_head = None if tied else layers.Linear(cfg.hidden_size, cfg.vocab_size, use_bias=False, dtype=dtype, rngs=rngs)

    def input_embedding_matrix(self) -> jax.Array:
        return self.model.embed_tokens.weight[...]
