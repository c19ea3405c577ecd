"""`jaxrl-llm train-rm`: a Bradley–Terry reward model from preference pairs, end to end.

    pairs (prompt, chosen, rejected) ─► tokenize prompt+response (+EOS) ─► RewardModel
    (the policy's backbone + a scalar head) ─► bradley_terry_loss ─► AdamW ─► held-out pair
    accuracy ─► a *ForSequenceClassification directory

The saved directory is what transformers' `AutoModelForSequenceClassification` loads (scores
equal to ours) and what the RL trainer's `reward.terms[].kind: reward_model` term reads. Texts
are tokenized exactly as that term tokenizes them (`prompt + response`, then EOS), so the
model scores RL completions the way it was trained to.

Mixed precision as in the policy trainer: `model.dtype: bfloat16` runs the forward and backward
passes on a bfloat16 cast of float32 master weights (`model.param_dtype`), which AdamW updates
and which are saved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.objectives import bradley_terry_loss
from jaxrl_llm.rollout.padding import bucket_width, left_pad
from jaxrl_llm.training.config import ModelConfig, apply_overrides, from_dict, read_yaml


@dataclass
class RMModelConfig:
    """The backbone: a causal LM (a new scalar head is put on it) or a reward model to go on training."""

    path: str = "builtin:tiny_arithmetic"
    gguf_file: str | None = None
    # The dtype of the forward and backward passes; bfloat16 is mixed precision over `param_dtype`
    # master weights, as the policy trainer's model.dtype.
    dtype: str = "float32"
    # The dtype of the trained weights, the AdamW state and the saved model. bfloat16 storage
    # rounds away AdamW steps below its ulp (most of them at lr 1e-5).
    param_dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class RMDataConfig:
    """Preference pairs: a .jsonl/.json/.parquet/.csv file or a save_to_disk directory."""

    path: str = ""
    eval_path: str | None = None  # held-out pairs; without it, `eval_fraction` of `path` is held out
    eval_fraction: float = 0.1
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    margin_field: str | None = None  # per-pair margin of the loss (None: no margin)


@dataclass
class RMTrainConfig:
    epochs: int = 1
    batch_size: int = 32  # pairs per update
    learning_rate: float = 1e-5
    # The learning-rate schedule over the run's updates, as the policy trainer's optim.schedule:
    # `warmup_steps` updates of linear warmup, then constant, or a linear / cosine decay that ends
    # at the last update.
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    center_rewards_coefficient: float = 0.0  # TRL's: weight of mean((r_c + r_r)^2)
    # Longest prompt+response in tokens; a longer one keeps its end (and a leading BOS). None: no limit.
    max_length: int | None = None
    append_eos: bool = True  # as the trainer's reward_model term scores: with EOS last
    eval_every: int = 50  # updates between held-out evaluations (and one at the end)
    seed: int = 0
    output_dir: str = "runs/reward_model"


@dataclass
class RMConfig:
    model: RMModelConfig = field(default_factory=RMModelConfig)
    data: RMDataConfig = field(default_factory=RMDataConfig)
    train: RMTrainConfig = field(default_factory=RMTrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_rm_config(path: str | Path | None = None, overrides=()) -> RMConfig:
    """A `train-rm` config from YAML and `section.key=value` overrides; data paths in the file are
    relative to it."""
    data = {}
    if path is not None:
        data = read_yaml(path)
        section = data.get("data") if isinstance(data.get("data"), dict) else {}
        for key in ("path", "eval_path"):
            value = section.get(key)
            if isinstance(value, str) and not Path(value).is_absolute():
                section[key] = str((Path(path).parent / value).resolve())
    config = from_dict(RMConfig, apply_overrides(data, list(overrides)))
    t, d = config.train, config.data
    checks = [
        (bool(d.path), "data.path", d.path, "the path of a preference-pair file"),
        (0 < d.eval_fraction < 1 or d.eval_path is not None, "data.eval_fraction", d.eval_fraction, "in (0, 1)"),
        (t.epochs >= 1, "train.epochs", t.epochs, ">= 1"),
        (t.batch_size >= 1, "train.batch_size", t.batch_size, ">= 1"),
        (t.learning_rate > 0, "train.learning_rate", t.learning_rate, "> 0"),
        (t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, ">= 0 updates"),
        (t.center_rewards_coefficient >= 0, "train.center_rewards_coefficient", t.center_rewards_coefficient, ">= 0"),
        (t.max_length is None or t.max_length >= 2, "train.max_length", t.max_length, "None or >= 2"),
        (t.eval_every >= 1, "train.eval_every", t.eval_every, ">= 1"),
    ]
    for ok, name, value, expected in checks:
        if not ok:
            raise UserError(f"`{name}`: got {value!r}, expected {expected}.")
    models.base.check_dtype(config.model.dtype)
    return config


# -- the model -------------------------------------------------------------------------------------


def reward_model_from_policy(policy: models.CausalLM, *, pad_token_id: int | None, seed: int = 0) -> models.RewardModel:
    """A one-label `RewardModel` whose backbone is `policy`'s own (shared, not copied) and whose
    `score` head is new: N(0, 1/(D+1)), the scale TRL's reward trainer starts from."""
    cfg = policy.hf_config
    cfg.num_labels = 1
    cfg.pad_token_id = pad_token_id
    dtype = policy.dtype
    reward = nnx.eval_shape(lambda: models.RewardModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))
    setattr(reward, reward.base_prefix, policy.backbone)
    width = policy.input_embedding_matrix().shape[1]
    head = jax.random.normal(jax.random.PRNGKey(seed), (width, 1)) / np.sqrt(width + 1)
    reward.score.kernel = nnx.Param(head.astype(dtype))
    return reward


def save_reward_model(model: models.RewardModel, path: str | Path, tokenizer=None) -> Path:
    """`config.json` (a `*ForSequenceClassification` architecture) + `model.safetensors` (+ the
    tokenizer): what transformers and the trainer's reward_model term load, with equal scores.

    transformers scores a sequence at its last token that is not `pad_token_id`, we at its last
    attended token; both are the EOS ending it only if the pad id is not EOS's. So the config and
    the tokenizer written declare a pad id other than EOS (`export_pad_token`)."""
    from safetensors.numpy import save_file

    from jaxrl_llm.models.hf_io import _ARCHITECTURES, model_tensors

    path = Path(path)
    config = json.loads(model.config_json)
    eos_ids = {config.get("eos_token_id")} if isinstance(config.get("eos_token_id"), int) else set(
        config.get("eos_token_id") or ())
    if tokenizer is not None:
        tokenizer, pad = export_pad_token(tokenizer, num_embeddings=config["vocab_size"], eos_ids=eos_ids)
    else:
        pad = model.pad_token_id
        if pad is None or pad in eos_ids:
            pad = config.get("bos_token_id")
        if pad is None or pad in eos_ids:
            raise UserError(f"save_reward_model: the model's pad id {model.pad_token_id} is its EOS and it names no "
                            "other special token; pass the tokenizer, so that a pad token other than EOS is saved.")
    path.mkdir(parents=True, exist_ok=True)
    causal = _ARCHITECTURES.get(model.model_type, "ForCausalLM")
    config["architectures"] = [causal.replace("ForCausalLM", "ForSequenceClassification")]
    config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, pad_token_id=pad,
                  dtype=jnp.dtype(model.dtype).name)
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    tensors = {k: np.ascontiguousarray(np.asarray(v)) for k, v in model_tensors(model).items()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path


EXPORT_PAD_TOKEN = "<|pad|>"


def export_pad_token(tokenizer, *, num_embeddings: int, eos_ids=()):
    """`(tokenizer, pad id)`: a copy of `tokenizer` whose pad token is not EOS (nor any of `eos_ids`).

    A tokenizer without a pad token pads with EOS, and with pad == EOS transformers'
    `*ForSequenceClassification` would score a sequence ending in EOS at the token before it.
    The pad is, in order: the tokenizer's own, if it is not EOS; a new `<|pad|>` token with the
    first id past the tokenizer's vocabulary, when the embedding table (`num_embeddings` rows) has
    such a row (tokenizing text never produces it); an existing special token other than EOS (BOS
    first), which never ends a sequence that the reward model scores at its EOS. Raises a
    UserError when there is none: such an export would score differently in transformers."""
    import copy

    eos_ids = set(eos_ids) | {tokenizer.eos_token_id}
    tokenizer = copy.deepcopy(tokenizer)
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in eos_ids:
        return tokenizer, tokenizer.pad_token_id
    size = len(tokenizer)
    if size < num_embeddings and EXPORT_PAD_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"pad_token": EXPORT_PAD_TOKEN})  # a new token: id `size`
        return tokenizer, tokenizer.pad_token_id
    special = dict(zip(tokenizer.all_special_tokens, tokenizer.all_special_ids))
    candidates = [tokenizer.bos_token, *special]
    for token in candidates:
        if token is not None and special.get(token) is not None and special[token] not in eos_ids \
                and special[token] < num_embeddings:
            tokenizer.pad_token = token
            return tokenizer, special[token]
    raise UserError(f"save_reward_model: the tokenizer pads with EOS (id {tokenizer.eos_token_id}), its vocabulary fills "
                    f"the {num_embeddings}-row embedding table and it has no special token other than EOS to pad "
                    "with; transformers would score the exported model at the token before EOS. Give the "
                    "tokenizer a pad token (tokenizer.pad_token = ...) of a token no scored text ends with.")


def load_backbone(config: RMConfig):
    """`(RewardModel, tokenizer)`: a reward-model directory as it is, or a causal LM with a new head."""
    from jaxrl_llm.training.config import Config
    from jaxrl_llm.training.setup import load_tokenizer, resolve_model_path

    m = config.model
    directory, gguf_file = resolve_model_path(Config(model=ModelConfig(path=m.path, gguf_file=m.gguf_file)))
    tokenizer = load_tokenizer(directory, gguf_file)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    architectures = []
    if gguf_file is None:
        architectures = transformers.AutoConfig.from_pretrained(directory).architectures or []
    # The weights are trained in param_dtype; forward passes cast them to model.dtype.
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        return models.reward_model_from_pretrained(directory, dtype=jnp.dtype(m.param_dtype)), tokenizer
    policy = models.from_pretrained(directory, dtype=jnp.dtype(m.param_dtype), gguf_file=gguf_file)
    return reward_model_from_policy(policy, pad_token_id=tokenizer.pad_token_id, seed=config.train.seed), tokenizer


# -- the data --------------------------------------------------------------------------------------


class Pairs:
    """Tokenized pairs: `chosen` and `rejected` token rows (prompt + response + EOS) and margins."""

    def __init__(self, rows, config: RMConfig, tokenizer, *, source: str):
        from jaxrl_llm.training.prompts import truncate_left

        d, t = config.data, config.train
        check_columns(rows, config, source)
        eos = tokenizer.eos_token_id if t.append_eos else None
        if t.append_eos and eos is None:
            raise UserError("`train.append_eos`: the tokenizer has no EOS token; set train.append_eos: false.")

        def tokens(texts):
            out = []
            for ids in tokenizer(texts)["input_ids"]:
                ids = list(ids)
                if eos is not None and (not ids or ids[-1] != eos):
                    ids.append(eos)
                # As the policy's prompts: the end is kept, and a leading BOS (which the
                # reward_model term's tokenizer adds too).
                out.append(truncate_left(ids, t.max_length, tokenizer.bos_token_id) if t.max_length else ids)
            return out

        prompts = rows[d.prompt_field]
        self.chosen = tokens([p + c for p, c in zip(prompts, rows[d.chosen_field])])
        self.rejected = tokens([p + r for p, r in zip(prompts, rows[d.rejected_field])])
        self.margin = np.asarray(rows[d.margin_field], np.float32) if d.margin_field else None
        self.pad = tokenizer.pad_token_id

    def __len__(self):
        return len(self.chosen)

    def batch(self, indices, num_rows: int):
        """`(ids [2R, L], mask [2R, L], margin [R], real [R])`: chosen rows then rejected rows, R =
        `num_rows` (indices beyond the data are filler rows with `real` 0)."""
        filler = [[self.pad]] * (num_rows - len(indices))
        rows = [self.chosen[i] for i in indices] + filler + [self.rejected[i] for i in indices] + filler
        ids, mask = left_pad(rows, bucket_width(max(map(len, rows))), self.pad)
        mask[:, -1] = 1  # a filler row holds one token: no row is all padding
        margin = np.zeros(num_rows, np.float32)
        if self.margin is not None:
            margin[: len(indices)] = self.margin[indices]
        real = np.zeros(num_rows, np.float32)
        real[: len(indices)] = 1
        return ids, mask, margin, real


def check_columns(rows, config: RMConfig, source: str) -> None:
    """Every configured field is a column, and there is at least one pair."""
    d = config.data
    fields = [d.prompt_field, d.chosen_field, d.rejected_field] + ([d.margin_field] if d.margin_field else [])
    for name, column in zip(["prompt_field", "chosen_field", "rejected_field", "margin_field"], fields):
        if column not in rows.column_names:
            raise UserError(f"`data.{name}`: {source} has no column {column!r}; its columns are {rows.column_names}.")
    if len(rows) == 0:
        raise UserError(f"`data.path`: {source} holds no pairs.")


def split_pairs(config: RMConfig, tokenizer) -> tuple[Pairs, Pairs]:
    """`(train, held-out)` pairs: `data.eval_path`, or a fixed `data.eval_fraction` of `data.path`."""
    from jaxrl_llm.tasks.dataset import load_rows

    d = config.data
    rows = load_rows(d.path, option="path")
    check_columns(rows, config, d.path)
    if d.eval_path is not None:
        return (Pairs(rows, config, tokenizer, source=d.path),
                Pairs(load_rows(d.eval_path, option="eval_path"), config, tokenizer, source=d.eval_path))
    order = np.random.default_rng(1234).permutation(len(rows))  # a fixed split, whatever the seed
    held_out = max(1, int(round(len(rows) * d.eval_fraction)))
    if held_out >= len(rows):
        raise UserError(f"`data.eval_fraction`: {d.eval_fraction} of {len(rows)} pairs leaves none to train on.")
    return (Pairs(rows.select(np.sort(order[held_out:])), config, tokenizer, source=d.path),
            Pairs(rows.select(np.sort(order[:held_out])), config, tokenizer, source=d.path))


# -- training --------------------------------------------------------------------------------------


def pair_loss(graphdef, params, ids, mask, margin, real, *, center_coef: float, compute_dtype=None):
    """The Bradley–Terry loss of one batch (chosen rows first, then rejected); filler pairs weigh 0.
    The forward pass runs on `params` cast to `compute_dtype` (None: as they are); the cast is
    differentiable, so the gradient arrives in the parameters' own dtype."""
    scores = nnx.merge(graphdef, models.cast_floating(params, compute_dtype))(ids, mask)
    half = scores.shape[0] // 2
    return bradley_terry_loss(scores[:half], scores[half:], margin=margin, center_coef=center_coef, weights=real)


def train_reward_model(config: RMConfig) -> dict:
    """Train, evaluate and save; returns the summary (also written to `output_dir/summary.json`)."""
    from jaxrl_llm.training.setup import learning_rate_schedule

    t = config.train
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_backbone(config)
    train_pairs, eval_pairs = split_pairs(config, tokenizer)
    graphdef, params = nnx.split(model)
    steps = t.epochs * -(-len(train_pairs) // t.batch_size)
    schedule = learning_rate_schedule(t.learning_rate, t.schedule, warmup_steps=t.warmup_steps, total_steps=steps)
    optimizer = optax.chain(*([optax.clip_by_global_norm(t.max_grad_norm)] if t.max_grad_norm else []),
                            optax.adamw(schedule, weight_decay=t.weight_decay))
    opt_state = optimizer.init(params)
    m = config.model
    loss_fn = functools.partial(pair_loss, graphdef, center_coef=t.center_rewards_coefficient,
                                compute_dtype=None if m.dtype == m.param_dtype else jnp.dtype(m.dtype))

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def update(params, opt_state, ids, mask, margin, real):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ids, mask, margin, real)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    @jax.jit
    def evaluate_batch(params, ids, mask, margin, real):
        return loss_fn(params, ids, mask, margin, real)

    def evaluate(params) -> dict:
        stats = []
        for start in range(0, len(eval_pairs), t.batch_size):
            indices = np.arange(start, min(start + t.batch_size, len(eval_pairs)))
            stats.append(evaluate_batch(params, *eval_pairs.batch(indices, t.batch_size))[1])
        total = jax.tree.map(lambda *xs: np.sum(xs, axis=0), *jax.device_get(stats))
        return {f"eval/{key}": float(stat.total / stat.count) for key, stat in total.items()}

    log = (out / "metrics.jsonl").open("w")
    history = [{"step": 0, **evaluate(params)}]
    log.write(json.dumps(history[-1]) + "\n")
    print(f"held-out pair accuracy {history[0]['eval/accuracy']:.1%} before ({len(eval_pairs)} pairs)", flush=True)
    rng = np.random.default_rng(t.seed)
    step, start = 0, time.perf_counter()
    for _ in range(t.epochs):
        order = rng.permutation(len(train_pairs))
        for first in range(0, len(order), t.batch_size):
            indices = order[first:first + t.batch_size]
            params, opt_state, loss, aux = update(params, opt_state, *train_pairs.batch(indices, t.batch_size))
            step += 1
            row = {"step": step, "loss": float(loss),
                   **{f"train/{k}": float(s.total / max(s.count, 1)) for k, s in jax.device_get(aux).items()}}
            if step % t.eval_every == 0 or step == steps:
                row.update(evaluate(params))
            history.append(row)
            log.write(json.dumps(row) + "\n")
    log.close()
    model = nnx.merge(graphdef, params)
    save_reward_model(model, out / "model", tokenizer)
    summary = {"steps": step, "train_pairs": len(train_pairs), "eval_pairs": len(eval_pairs),
               "seconds": time.perf_counter() - start, "eval/accuracy_before": history[0]["eval/accuracy"],
               **{k: v for k, v in history[-1].items() if k.startswith("eval/")}, "model_dir": str(out / "model")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out pair accuracy {summary['eval/accuracy']:.1%} after {step} updates; reward model: "
          f"{out / 'model'}", flush=True)
    return summary


__all__ = ["RMConfig", "export_pad_token", "load_rm_config", "reward_model_from_policy", "save_reward_model",
           "train_reward_model"]
