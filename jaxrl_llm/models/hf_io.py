"""Hugging Face checkpoint import/export.

* ``from_config(hf_config)``: random initialisation from a transformers config.
* ``from_pretrained(path)``: a local directory with ``config.json`` and ``model.safetensors``
  (single file, or shards listed in ``model.safetensors.index.json``), or a GGUF file
  dequantised to float32 through transformers' GGUF reader.
* ``save_pretrained(model, path)``: ``config.json`` + ``model.safetensors`` with transformers'
  key names, loadable by ``transformers.AutoModelForCausalLM.from_pretrained``.

Key mapping: a parameter's flat NNX path (``model.layers.0.self_attn.q_proj.kernel``) is its
transformers key with ``kernel`` -> ``weight`` transposed ([in, out] here, [out, in] in torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxrl_llm.errors import UserError
from jaxrl_llm.models.base import CausalLM, check_dtype

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}
# Older GPT-NeoX checkpoints (Pythia) name the unembedding ``embed_out``.
_KEY_ALIASES = {"lm_head.weight": ("embed_out.weight",)}


def model_class(model_type: str, *, argument: str = "config.model_type") -> type[CausalLM]:
    """The causal-LM class for a transformers ``model_type``."""
    from jaxrl_llm.models import gemma3, gpt_neox, llama

    classes = {t: llama.LlamaForCausalLM for t in llama.MODEL_TYPES}
    classes["gpt_neox"] = gpt_neox.GPTNeoXForCausalLM
    classes["gemma3_text"] = gemma3.Gemma3ForCausalLM
    if model_type not in classes:
        raise UserError(f"{argument}: got {model_type!r}, expected one of {sorted(classes)}")
    return classes[model_type]


def from_config(hf_config, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None) -> CausalLM:
    """Randomly initialised causal LM for a transformers config (dispatch on ``model_type``)."""
    cls = model_class(getattr(hf_config, "model_type", None), argument="hf_config.model_type")
    return cls(hf_config, dtype=check_dtype(dtype), rngs=rngs if rngs is not None else nnx.Rngs(0))


# ----------------------------------------------------------------------------- state <-> torch keys


def torch_key(path: tuple) -> tuple[str, bool]:
    """(transformers key, needs transpose) for a flat NNX parameter path."""
    parts = [str(p) for p in path]
    if parts[-1] == "kernel":
        return ".".join(parts[:-1] + ["weight"]), True
    return ".".join(parts), False


def load_weights(abstract_model: nnx.Module, get: Callable[[str], object | None], *, dtype, source: str) -> nnx.Module:
    """Fill an abstract (``nnx.eval_shape``) module from ``get(torch_key) -> array | None``."""
    graphdef, state = nnx.split(abstract_model)
    leaves = []
    for path, var in nnx.to_flat_state(state):
        key, transpose = torch_key(path)
        tensor = get(key)
        for alias in _KEY_ALIASES.get(key, ()):
            if tensor is None:
                tensor = get(alias)
        if tensor is None:
            raise UserError(f"path: checkpoint {source} is missing weight {key!r} (shape {tuple(var.get_value().shape)[::-1] if transpose else tuple(var.get_value().shape)})")
        # Host-side numpy (bfloat16 via ml_dtypes): no per-shape XLA compilation for transposes/casts.
        array = np.asarray(tensor)
        if transpose:
            array = array.T
        if array.shape != var.get_value().shape:
            raise UserError(
                f"path: weight {key!r} in {source} has shape {array.shape}, expected {var.get_value().shape} from the config"
            )
        leaves.append((path, var.replace(jnp.asarray(np.ascontiguousarray(array.astype(jnp.dtype(dtype)))))))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def model_tensors(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters as a ``{transformers key: array}`` dict in torch layout."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        key, transpose = torch_key(path)
        value = var.get_value()
        out[key] = value.T if transpose else value
    return out


# ----------------------------------------------------------------------------- reading checkpoints


def _safetensors_getter(directory: Path) -> Callable[[str], object | None]:
    from safetensors import safe_open

    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {k: directory / f for k, f in weight_map.items()}
    elif single.exists():
        with safe_open(single, framework="flax") as f:
            files = {k: single for k in f.keys()}
    else:
        raise UserError(
            f"path: {directory} has neither model.safetensors nor model.safetensors.index.json "
            "(only safetensors checkpoints are supported)"
        )
    handles = {}

    def get(key: str):
        file = files.get(key)
        if file is None:
            return None
        if file not in handles:
            handles[file] = safe_open(file, framework="flax")
        return handles[file].get_tensor(key)

    return get


def _gguf_config_and_tensors(directory: Path, gguf_file: str):
    """Dequantise a GGUF checkpoint to float32 torch tensors through transformers."""
    import torch
    import transformers

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(directory), gguf_file=gguf_file, dtype=torch.float32
    )
    tensors = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    return hf_model.config, tensors


def from_pretrained(
    path: str | os.PathLike,
    *,
    dtype=jnp.float32,
    gguf_file: str | None = None,
    rngs: nnx.Rngs | None = None,
) -> CausalLM:
    """Load a causal LM from a local Hugging Face directory or a GGUF file.

    Args:
      path: a directory with ``config.json`` + safetensors, a directory holding ``gguf_file``,
        or the path of a ``.gguf`` file itself.
      dtype: parameter dtype (float32 or bfloat16); logits are float32 either way.
      gguf_file: file name of a GGUF checkpoint inside ``path``.
      rngs: unused for loading (every parameter comes from the checkpoint); accepted for symmetry.
    Returns:
      The NNX model (dispatched on ``config.model_type``).
    """
    del rngs
    dtype = check_dtype(dtype)
    path = Path(path)
    if gguf_file is None and path.suffix == ".gguf":
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise UserError(f"path: {str(path)!r} is not an existing directory (expected a local checkpoint directory)")
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise UserError(f"gguf_file: {str(path / gguf_file)!r} does not exist")
        hf_config, tensors = _gguf_config_and_tensors(path, gguf_file)
        get = tensors.get
        source = str(path / gguf_file)
    else:
        import transformers

        if not (path / "config.json").is_file():
            raise UserError(f"path: {str(path)!r} has no config.json (expected a Hugging Face model directory)")
        hf_config = transformers.AutoConfig.from_pretrained(str(path))
        model_class(getattr(hf_config, "model_type", None))  # fail on an unknown family before reading weights
        get = _safetensors_getter(path)
        source = str(path)
    cls = model_class(getattr(hf_config, "model_type", None))
    abstract = nnx.eval_shape(lambda: cls(hf_config, dtype=dtype, rngs=nnx.Rngs(0)))
    return load_weights(abstract, get, dtype=dtype, source=source)


# ----------------------------------------------------------------------------- writing checkpoints


def save_pretrained(model: CausalLM, path: str | os.PathLike) -> None:
    """Write ``config.json`` + ``model.safetensors`` that transformers loads with identical logits.

    Tied unembeddings are written once (``embed_tokens``); transformers re-ties them from
    ``tie_word_embeddings`` in the config.
    """
    from safetensors.flax import save_file

    if not isinstance(model, CausalLM):
        raise UserError(f"model: got {type(model).__name__}, expected a jaxrl_llm causal LM")
    from jaxrl_llm.models import lora

    if lora.has_lora(model):
        raise UserError("model: has LoRA adapters; merge them first (models.lora.merge_lora) or save them as a "
                        "PEFT adapter (models.lora.save_peft_adapter)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = json.loads(model.config_json)
    config["architectures"] = [_ARCHITECTURES.get(model.model_type, type(model).__name__)]
    config["dtype"] = jnp.dtype(model.dtype).name
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: jnp.asarray(v) for k, v in model_tensors(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
