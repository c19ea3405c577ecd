"""LoRA adapters on a causal LM's projections, built on Flax NNX's ``nnx.LoRA``.

LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") freezes each
adapted weight W [in, out] and trains a low-rank update beside it:

    y = x W + b + (alpha / r) * dropout(x) A B,      A [in, r], B [r, out], B initialised to 0

so the adapted model starts as the base model. ``add_lora`` puts an ``nnx.LoRA`` (its
``lora_a`` and ``lora_b`` are ``nnx.LoRAParam``s) on each targeted ``layers.Linear``; the base
weights stay ``nnx.Param``s, so ``nnx.split(model, nnx.LoRAParam, ...)`` separates what RL
trains from what it only reads. Without the adapters the same base weights are the reference
policy: ``nnx.graphdef`` of the model *before* ``add_lora``, merged with the base state, runs
it, and no copy of the weights is kept for it.

The layout is PEFT's: ``A`` initialised as ``nn.Linear``'s kaiming-uniform (bound 1/sqrt(in)),
dropout on the adapter's input only, and ``save_peft_adapter`` writes a directory that
``peft.PeftModel.from_pretrained`` loads on the transformers base model.

Targets are projection roles, ``q k v o gate up down``, or module names (``q_proj``,
``query_key_value``, ...). GPT-NeoX fuses q, k and v into ``query_key_value``: any of the three
adapts it.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models import layers

# The module names each role has in the families we load (Llama/Qwen/Mistral/Gemma 3; GPT-NeoX).
ROLES = {
    "q": ("q_proj", "query_key_value"),
    "k": ("k_proj", "query_key_value"),
    "v": ("v_proj", "query_key_value"),
    "o": ("o_proj", "dense"),
    "gate": ("gate_proj",),
    "up": ("up_proj", "dense_h_to_4h"),
    "down": ("down_proj", "dense_4h_to_h"),
}
MODULE_NAMES = tuple(sorted({name for names in ROLES.values() for name in names}))


class LoraDropoutKey(nnx.Variable):
    """The PRNG key of one adapter's dropout during a training forward (never a parameter)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """What ``add_lora`` adds: rank r, alpha (the update is scaled by alpha / r), dropout on the
    adapter input during training, and the targeted projections (None: every one the model has)."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None

    def __post_init__(self):
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1:
            raise UserError(f"`model.lora.rank`: got {self.rank!r}, expected a positive integer.")
        if not self.alpha > 0:
            raise UserError(f"`model.lora.alpha`: got {self.alpha!r}, expected a positive number.")
        if not 0 <= self.dropout < 1:
            raise UserError(f"`model.lora.dropout`: got {self.dropout!r}, expected a rate in [0, 1).")
        if self.targets is not None:
            unknown = [t for t in self.targets if t not in ROLES and t not in MODULE_NAMES]
            if unknown or not self.targets:
                raise UserError(f"`model.lora.targets`: got {list(self.targets)!r}, expected some of the roles "
                                f"{list(ROLES)} or module names {list(MODULE_NAMES)} (or null: all).")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def linear_modules(model: nnx.Module):
    """``(path, Linear)`` of every ``layers.Linear`` in the decoder (not the unembedding or a head)."""
    return [(path, m) for path, m in nnx.iter_modules(model)
            if isinstance(m, layers.Linear) and path and path[-1] in MODULE_NAMES]


def target_names(model: nnx.Module, targets) -> set[str]:
    """The module names ``targets`` select in ``model``; a role or name matching none is an error."""
    present = {path[-1] for path, _ in linear_modules(model)}
    if targets is None:
        return present
    names = set()
    for target in targets:
        matched = set(ROLES.get(target, (target,))) & present
        if not matched:
            raise UserError(f"`model.lora.targets`: {target!r} matches no projection of this "
                            f"{getattr(model, 'model_type', type(model).__name__)} model, whose projections are "
                            f"{sorted(present)}.")
        names |= matched
    return names


def add_lora(model: nnx.Module, spec: LoraSpec, *, param_dtype=jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
    """Put a rank-``spec.rank`` ``nnx.LoRA`` on each targeted projection of ``model`` (in place).

    ``A`` is drawn from ``rngs`` as PEFT draws it, ``B`` is zero: the adapted model computes
    exactly what the base model does until B is trained. Adapter parameters are ``param_dtype``.
    Returns the model.
    """
    if has_lora(model):
        raise UserError("model: already has LoRA adapters (add_lora once per model).")
    names = target_names(model, spec.targets)
    # nn.Linear's kaiming_uniform(a=sqrt(5)), PEFT's init of lora_A: U(-1/sqrt(in), 1/sqrt(in)).
    a_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    for path, linear in linear_modules(model):
        if path[-1] not in names:
            continue
        fan_in, fan_out = linear.kernel.shape
        linear.lora = nnx.LoRA(fan_in, spec.rank, fan_out, param_dtype=jnp.dtype(param_dtype),
                               a_initializer=a_init, rngs=rngs)
        linear.lora_scale = float(spec.scale)
        linear.lora_dropout = float(spec.dropout)
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(m.lora is not None for _, m in linear_modules(model))


def adapted_modules(model: nnx.Module):
    """``(dotted path, Linear)`` of the projections that carry an adapter."""
    return [(".".join(map(str, path)), m) for path, m in linear_modules(model) if m.lora is not None]


def spec_of(model: nnx.Module) -> LoraSpec:
    """The ``LoraSpec`` a model's adapters were added with (targets as module names)."""
    modules = adapted_modules(model)
    if not modules:
        raise UserError("model: has no LoRA adapters.")
    first = modules[0][1]
    rank = first.lora.lora_a.shape[1]
    return LoraSpec(rank=rank, alpha=first.lora_scale * rank, dropout=first.lora_dropout,
                    targets=tuple(sorted({path.rsplit(".", 1)[-1] for path, _ in modules})))


def set_dropout_key(model: nnx.Module, key: jax.Array) -> None:
    """Give each adapter its own dropout key (folded from ``key``) for one training forward.
    Without a key (the sampler, reference and old-policy passes) adapters apply no dropout."""
    for i, (_, linear) in enumerate(adapted_modules(model)):
        if linear.lora_dropout:
            linear.lora_dropout_key = LoraDropoutKey(jax.random.fold_in(key, i))


def merged_kernel(linear: layers.Linear) -> jax.Array:
    """``W + scale * A B``, accumulated in float32 and returned in W's dtype."""
    w = linear.kernel[...]
    delta = jnp.asarray(linear.lora.lora_a[...], jnp.float32) @ jnp.asarray(linear.lora.lora_b[...], jnp.float32)
    return (w.astype(jnp.float32) + linear.lora_scale * delta).astype(w.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of ``model`` with every adapter folded into its weight and removed: a plain model,
    graph and parameters as the base model's (what ``jaxrl-llm export --merge`` writes)."""
    merged = nnx.clone(model)
    for _, linear in adapted_modules(merged):
        linear.kernel[...] = merged_kernel(linear)
        for name in ("lora", "lora_scale", "lora_dropout", "lora_dropout_key"):
            if name in vars(linear):
                delattr(linear, name)  # back to the class defaults: no adapter
    return merged


def split(model: nnx.Module):
    """``(graphdef, lora_params, base_params)`` of an adapted model."""
    return nnx.split(model, nnx.LoRAParam, ...)


# ----------------------------------------------------------------------------- PEFT adapter directories


def peft_tensors(model: nnx.Module) -> dict[str, np.ndarray]:
    """The adapters under PEFT's names: ``base_model.model.<module>.lora_A.weight`` [r, in] and
    ``lora_B.weight`` [out, r] (torch ``nn.Linear`` layout, our [in, r] / [r, out] transposed)."""
    out = {}
    for path, linear in adapted_modules(model):
        prefix = f"base_model.model.{path}"
        out[f"{prefix}.lora_A.weight"] = np.asarray(linear.lora.lora_a[...]).T
        out[f"{prefix}.lora_B.weight"] = np.asarray(linear.lora.lora_b[...]).T
    return out


def peft_config(model: nnx.Module, *, base_model_name_or_path: str | None = None) -> dict:
    """``adapter_config.json`` of a LoRA adapter for a causal LM."""
    spec = spec_of(model)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": list(spec.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def save_peft_adapter(model: nnx.Module, path: str | os.PathLike, *, base_model_name_or_path: str | None = None) -> Path:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (float32) that
    ``peft.PeftModel.from_pretrained(transformers_base_model, path)`` loads. Returns the directory."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = peft_config(model, base_model_name_or_path=base_model_name_or_path)
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    tensors = {k: np.ascontiguousarray(v.astype(np.float32)) for k, v in peft_tensors(model).items()}
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


__all__ = ["LoraSpec", "ROLES", "add_lora", "adapted_modules", "has_lora", "merge_lora", "peft_config",
           "save_peft_adapter", "set_dropout_key", "spec_of", "split"]
