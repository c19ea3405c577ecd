"""The causal-LM wrapper every family shares: inputs -> backbone -> float32 logits, KV cache plumbing.

A family provides a backbone module (``embed -> decoder layers -> final norm``) stored under the
attribute name transformers uses (``model`` for Llama/Gemma, ``gpt_neox`` for Pythia), so that the
flat NNX parameter paths equal the transformers state-dict keys.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers


class CausalLM(nnx.Module):
    """Base class: subclasses set ``base_prefix``, the backbone attribute, and ``lm_head`` (None when tied).

    Static attributes every subclass sets:
      config_json: the transformers config as a JSON string (hashable; used by ``save_pretrained``).
      model_type, num_layers, num_kv_heads, head_dim, dtype, final_logit_softcapping.
    """

    base_prefix = "model"
    lm_head: layers.Linear | None

    # -- pieces a family provides -------------------------------------------------------------
    @property
    def backbone(self) -> nnx.Module:
        return getattr(self, self.base_prefix)

    def input_embedding_matrix(self) -> jax.Array:
        """[V, D] token embedding table."""
        raise NotImplementedError

    @property
    def hf_config(self):
        """A fresh transformers config object built from ``config_json``."""
        import transformers

        cfg = json.loads(self.config_json)
        return transformers.AutoConfig.for_model(**cfg)

    # -- shared API -----------------------------------------------------------------------------
    @property
    def execution(self) -> layers.Execution:
        """How the backbone runs (see ``set_execution``)."""
        return self.backbone.execution

    def set_execution(self, **options) -> CausalLM:
        """Set the backbone's ``layers.Execution`` options: remat, scan_layers, attention, attention_block.

        Real model sizes trade compute for activation memory (remat, blockwise or cuDNN attention)
        and compile time (scan_layers); none changes the function computed. The options are static
        (they live in the graphdef), so a jitted call compiles anew after a change. Unknown options
        and invalid values raise ValueError. Returns the model, for chaining.
        """
        self.backbone.execution = self.backbone.execution.with_options(**options)
        return self

    def hidden_states(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: layers.KVCache | None = None,
        *,
        fresh_cache: bool = False,
        last_position_only: bool = False,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, layers.KVCache | None]:
        """Final normed hidden states [B, S, D] (parameter dtype) and the updated cache (or None).

        ``fresh_cache=True`` promises ``cache`` is empty (from ``init_cache``, nothing written yet):
        the tokens then attend only to each other instead of to every slot of the cache.
        ``last_position_only=True`` returns [B, 1, D], the last column's hidden state, and skips the
        last layer's attention output and MLP at the other positions (the cache still receives
        every position's keys and values): all a prompt prefill needs.
        ``segment_ids`` [B, S]: packed sequences (no cache), see ``layers.make_context``.
        """
        input_ids = jnp.asarray(input_ids)
        if attention_mask is not None:
            attention_mask = jnp.asarray(attention_mask)
        if positions is not None:
            positions = jnp.asarray(positions)
        if segment_ids is not None:
            segment_ids = jnp.asarray(segment_ids)
        ctx, cache = layers.make_context(input_ids, attention_mask, positions, cache, fresh_cache=fresh_cache,
                                         segment_ids=segment_ids)
        if cache is not None and len(cache.k) != self.num_layers:
            raise UserError(f"cache: has {len(cache.k)} layers, expected {self.num_layers} for this model")
        kv = None if cache is None else list(zip(cache.k, cache.v))
        hidden, kv = self.backbone(input_ids, ctx, kv, last_only=last_position_only)
        if cache is not None:
            cache = cache._replace(k=tuple(k for k, _ in kv), v=tuple(v for _, v in kv))
        return hidden, cache

    def unembedding_matrix(self) -> jax.Array:
        """[D, V] matrix with ``logits = softcap(hidden @ W)`` (the tied embedding transposed when tied)."""
        if self.lm_head is not None:
            return self.lm_head.kernel[...]
        return self.input_embedding_matrix().T

    def unembed(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., V]; the matmul accumulates in float32 for any dtype."""
        w = self.unembedding_matrix()
        logits = jnp.einsum("...d,dv->...v", hidden.astype(w.dtype), w, preferred_element_type=jnp.float32)
        return layers.softcap(logits, self.final_logit_softcapping)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        cache: layers.KVCache | None = None,
    ):
        """Causal-LM forward.

        Args:
          input_ids: [B, S] int token ids (prompts LEFT-padded).
          attention_mask: [B, S], 1 for real tokens, 0 for padding; default all ones.
          positions: [B, S] RoPE positions; default ``cumsum(mask) - 1`` clipped at 0 (counting
            the tokens already in ``cache``).
          cache: a ``KVCache`` from ``init_cache``; the S tokens are written at ``cache.index``.
        Returns:
          float32 logits [B, S, V] without a cache, ``(logits, new_cache)`` with one.
        """
        hidden, new_cache = self.hidden_states(input_ids, attention_mask, positions, cache)
        logits = self.unembed(hidden)
        return logits if cache is None else (logits, new_cache)

    def init_cache(self, batch_size: int, max_length: int, dtype=None) -> layers.KVCache:
        """Empty ``KVCache`` for ``batch_size`` rows and ``max_length`` slots (prompt + completion)."""
        return layers.empty_cache(
            num_layers=self.num_layers,
            batch_size=batch_size,
            max_length=max_length,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            dtype=self.dtype if dtype is None else dtype,
        )


def config_to_json(hf_config) -> str:
    """Serialise a transformers config to the JSON string models keep as static metadata."""
    return json.dumps(hf_config.to_dict(), sort_keys=True, default=str)


def check_dtype(dtype) -> jnp.dtype:
    """Accept float32 / bfloat16 (and float16); reject anything else with a ValueError."""
    dt = jnp.dtype(dtype)
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        raise UserError(f"dtype: got {dt}, expected float32 or bfloat16 (float16 also accepted)")
    return dt
