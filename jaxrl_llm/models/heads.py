"""Heads for RL: the PPO value head / critic and sequence-classification reward models.

* ``ValueHead``: hidden [B, S, D] -> one float32 value per token [B, S].
* ``make_critic(policy_or_path, layout=...)``: the PPO critic, built only when asked, in two layouts:
  ``"shared"`` (a ``ValueHead`` on the policy's own hidden states, no extra backbone) or
  ``"separate"`` (a full backbone copy + head; initialised from the policy, or from a reward
  model as in the four-model PPO set-up: policy, reference, reward, critic).
* ``RewardModel`` / ``reward_model_from_pretrained``: ``*ForSequenceClassification`` checkpoints
  (Llama family, GPT-NeoX, Gemma 3 text) scoring each sequence at its last real token.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers
from jaxrl_llm.models.base import CausalLM, check_dtype, config_to_json

LAYOUTS = ("shared", "separate")


def _backbone_class(model_type: str):
    """(backbone class, attribute name transformers uses for it) for a model_type."""
    from jaxrl_llm.models import gemma3, gpt_neox, llama

    if model_type in llama.MODEL_TYPES:
        return llama.LlamaModel, "model"
    if model_type == "gpt_neox":
        return gpt_neox.GPTNeoXModel, "gpt_neox"
    if model_type == "gemma3_text":
        return gemma3.Gemma3TextModel, "model"
    raise UserError(
        f"config.model_type: got {model_type!r}, expected one of "
        f"{sorted((*llama.MODEL_TYPES, 'gpt_neox', 'gemma3_text'))}"
    )


def run_backbone(backbone: nnx.Module, input_ids, attention_mask=None, positions=None, segment_ids=None) -> jax.Array:
    """Final normed hidden states [B, S, D] of a bare backbone (no cache), under its ``execution`` options;
    ``segment_ids``: packed sequences (see ``layers.make_context``)."""
    input_ids = jnp.asarray(input_ids)
    attention_mask, positions, segment_ids = (None if x is None else jnp.asarray(x)
                                              for x in (attention_mask, positions, segment_ids))
    ctx, _ = layers.make_context(input_ids, attention_mask, positions, None, segment_ids=segment_ids)
    hidden, _ = backbone(input_ids, ctx, None)
    return hidden


def _copy(module: nnx.Module) -> nnx.Module:
    """An independent copy (fresh arrays), so training the copy never aliases the source."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jnp.copy, state))


class ValueHead(nnx.Module):
    """``v = hidden @ kernel + bias`` per token, computed in float32.

    kernel [D, 1] ~ N(0, 0.02^2) (or copied from a reward model's ``score``), bias [1] = 0.
    """

    def __init__(self, hidden_size: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = nnx.Param((0.02 * jax.random.normal(rngs.params(), (hidden_size, 1))).astype(dtype))
        self.bias = nnx.Param(jnp.zeros((1,), dtype))

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """hidden [B, S, D] -> values [B, S] float32."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.kernel.shape[0]:
            raise UserError(f"hidden: got shape {hidden.shape}, expected [B, S, {self.kernel.shape[0]}]")
        v = hidden.astype(jnp.float32) @ self.kernel[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return v[..., 0]


class Critic(nnx.Module):
    """PPO critic: values [B, S] float32 for every token.

    ``layout="shared"``: only ``head``; call with the policy's hidden states,
    ``critic(hidden=models.hidden_states(policy, ids, mask))``.
    ``layout="separate"``: ``backbone`` (its own copy) + ``head``; call ``critic(ids, mask)``.
    """

    def __init__(self, head: ValueHead, backbone: nnx.Module | None, *, layout: str):
        if layout not in LAYOUTS:
            raise UserError(f"layout: got {layout!r}, expected one of {LAYOUTS}")
        self.layout = layout
        self.head = head
        self.backbone = backbone

    def set_execution(self, **options) -> Critic:
        """The separate critic's backbone options, as ``CausalLM.set_execution``; returns the critic."""
        if self.layout == "shared":
            raise UserError("set_execution: the shared critic has no backbone; set the options on the policy")
        self.backbone.execution = self.backbone.execution.with_options(**options)
        return self

    def __call__(self, input_ids=None, attention_mask=None, positions=None, *, hidden=None,
                 segment_ids=None) -> jax.Array:
        if self.layout == "shared":
            if hidden is None:
                raise UserError("hidden: the shared critic needs the policy's hidden states [B, S, D], got None")
            return self.head(hidden)
        if input_ids is None:
            raise UserError("input_ids: the separate critic runs its own backbone and needs token ids, got None")
        return self.head(run_backbone(self.backbone, input_ids, attention_mask, positions, segment_ids))


def make_critic(
    policy_or_path: CausalLM | str | os.PathLike,
    layout: str = "shared",
    *,
    init_from: RewardModel | str | os.PathLike | None = None,
    dtype=None,
    rngs: nnx.Rngs | None = None,
) -> Critic:
    """Build the PPO critic (only PPO calls this; policies never carry a value head).

    Args:
      policy_or_path: the policy model, or a checkpoint directory to load it from.
      layout: ``"shared"`` (head on the policy's hidden states) or ``"separate"`` (backbone copy + head).
      init_from: separate layout only: a ``RewardModel`` or a reward-model checkpoint directory whose
        backbone and ``score`` row initialise the critic; None copies the policy's backbone.
      dtype: parameter dtype; defaults to the policy's.
      rngs: for the value head's initialisation (default ``nnx.Rngs(0)``).
    """
    from jaxrl_llm.models.hf_io import from_pretrained

    if layout not in LAYOUTS:
        raise UserError(f"layout: got {layout!r}, expected one of {LAYOUTS}")
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if isinstance(policy_or_path, (str, os.PathLike)):
        policy = from_pretrained(policy_or_path, dtype=dtype or jnp.float32)
    elif isinstance(policy_or_path, CausalLM):
        policy = policy_or_path
    else:
        raise UserError(
            f"policy_or_path: got {type(policy_or_path).__name__}, expected a jaxrl_llm causal LM or a directory"
        )
    dtype = check_dtype(dtype or policy.dtype)
    hidden_size = policy.input_embedding_matrix().shape[1]
    if layout == "shared":
        if init_from is not None:
            raise UserError("init_from: only the 'separate' layout can be initialised from a reward model; got one with layout='shared'")
        return Critic(ValueHead(hidden_size, dtype=dtype, rngs=rngs), None, layout="shared")
    if init_from is None:
        return Critic(ValueHead(hidden_size, dtype=dtype, rngs=rngs), _copy(policy.backbone), layout="separate")
    reward = init_from if isinstance(init_from, RewardModel) else reward_model_from_pretrained(init_from, dtype=dtype)
    head = ValueHead(reward.score.kernel.shape[0], dtype=dtype, rngs=rngs)
    # The critic starts as the reward model: value = its (first) score.
    head.kernel[...] = reward.score.kernel[...][:, :1].astype(dtype)
    return Critic(head, _copy(reward.backbone), layout="separate")


class RewardModel(nnx.Module):
    """A ``*ForSequenceClassification`` model: backbone + ``score`` (no bias), pooled at the last real token.

    Pooling as transformers: the last position whose ``attention_mask`` is 1 (with LEFT padding that
    is the final position); without a mask, the last token that is not ``pad_token_id``.
    """

    def __init__(self, cfg, *, dtype=jnp.float32, rngs: nnx.Rngs):
        dtype = check_dtype(dtype)
        backbone_cls, prefix = _backbone_class(getattr(cfg, "model_type", None))
        self.base_prefix = prefix
        self.config_json = config_to_json(cfg)
        self.model_type = cfg.model_type
        self.pad_token_id = cfg.pad_token_id
        self.num_labels = cfg.num_labels
        self.dtype = dtype
        setattr(self, prefix, backbone_cls(cfg, dtype=dtype, rngs=rngs))
        self.score = layers.Linear(cfg.hidden_size, cfg.num_labels, use_bias=False, dtype=dtype, rngs=rngs)

    @property
    def backbone(self) -> nnx.Module:
        return getattr(self, self.base_prefix)

    def set_execution(self, **options) -> RewardModel:
        """The backbone's options, as ``CausalLM.set_execution``; returns the reward model."""
        self.backbone.execution = self.backbone.execution.with_options(**options)
        return self

    def __call__(self, input_ids, attention_mask=None, positions=None) -> jax.Array:
        """Scores: [B] float32 for ``num_labels == 1``, else [B, num_labels]."""
        input_ids = jnp.asarray(input_ids)
        hidden = run_backbone(self.backbone, input_ids, attention_mask, positions)
        logits = jnp.einsum(
            "bsd,dl->bsl", hidden, self.score.kernel[...].astype(hidden.dtype), preferred_element_type=jnp.float32
        )
        seq = input_ids.shape[1]
        if attention_mask is not None:
            real = jnp.asarray(attention_mask).astype(bool)
        elif self.pad_token_id is not None:
            real = input_ids != self.pad_token_id
        else:
            real = jnp.ones_like(input_ids, bool)
        last = jnp.argmax(jnp.where(real, jnp.arange(seq), -1), axis=1)
        pooled = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]
        return pooled[:, 0] if self.num_labels == 1 else pooled


def reward_model_from_pretrained(path: str | os.PathLike, *, dtype=jnp.float32) -> RewardModel:
    """Load a local ``*ForSequenceClassification`` safetensors checkpoint as a ``RewardModel``."""
    import transformers

    from jaxrl_llm.models.hf_io import _safetensors_getter, load_weights

    dtype = check_dtype(dtype)
    path = Path(path)
    if not (path / "config.json").is_file():
        raise UserError(f"path: {str(path)!r} is not a Hugging Face model directory (no config.json)")
    cfg = transformers.AutoConfig.from_pretrained(str(path))
    abstract = nnx.eval_shape(lambda: RewardModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    return load_weights(abstract, _safetensors_getter(path), dtype=dtype, source=str(path))
