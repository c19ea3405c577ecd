"""RL on LoRA adapters: one copy of the weights, adapter-only optimizer state, the base with the
adapters off as the reference, checkpoints without the base, PEFT and merged exports.

The trainer's policy and reference log-probabilities are checked against transformers + peft in
PyTorch (an independent implementation of the forward pass), and its adapter gradient against
the full-weight gradient of the merged model (dL/dB = s A^T dL/dW, dL/dA = s dL/dW B^T).
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxrl_llm import models
from jaxrl_llm.errors import UserError
from jaxrl_llm.models import lora
from jaxrl_llm.training import Algorithm, Trainer
from jaxrl_llm.training.algorithms import sequence_inputs
from jaxrl_llm.training.state import step_keys
from jaxrl_llm.training.checkpoint import export
from tests.models.conftest import hf_positions

LORA = "model.lora={rank: 4, alpha: 8.0}"


def nbytes(tree) -> int:
    return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def numpy_tree(tree):
    return jax.tree.map(np.asarray, tree)


def test_the_state_holds_the_base_once_and_optimizer_state_for_the_adapters_only(toy_config):
    full = Trainer(toy_config())
    adapted = Trainer(toy_config(LORA))
    s = adapted.state
    assert s.ref_params is None and s.base_params is not None
    # What the optimizer sees is the adapters: every trained leaf is a LoRA factor.
    trained = nnx.to_flat_state(s.params["policy"])
    assert trained and all(path[-1] in ("lora_a", "lora_b") for path, _ in trained)
    base_bytes, adapter_bytes = nbytes(s.base_params), nbytes(s.params["policy"])
    weights = nbytes(full.state.params["policy"])
    assert base_bytes == weights  # the base, once (float32 here, like the full policy)
    # 2 layers x (q, k, v, o, gate, up, down), rank 4, on a width-32 model (MLP 64, kv width 16).
    assert adapter_bytes == 4 * 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    # AdamW's two moments of the adapters (and scalar counts), nothing of the base's size.
    assert 2 * adapter_bytes <= nbytes(s.opt_state) < 2 * adapter_bytes + 64
    # Full fine-tuning holds weights, a reference copy and two moments (4x); LoRA the base and ~3x adapters.
    assert nbytes(full.state) >= 4 * weights
    assert nbytes(s) < weights + 3 * adapter_bytes + 64


def _torch_completion_logprobs(hf_model, batch):
    """log pi(token) of each completion token by transformers (temperature 1), [N, T]."""
    ids, attention = (np.asarray(x) for x in sequence_inputs(batch))
    with torch.no_grad():
        logits = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attention),
                          position_ids=torch.tensor(hf_positions(attention))).logits.double()
    p, t = batch.prompt_ids.shape[1], batch.tokens.shape[1]
    logp = torch.log_softmax(logits[:, p - 1: p - 1 + t], -1)
    return logp.gather(-1, torch.tensor(np.asarray(batch.tokens)).long()[..., None])[..., 0].numpy()


def test_policy_and_reference_logprobs_are_transformers_and_peft(toy_config, tiny_policy_dir, tmp_path):
    """After a few updates the adapters have moved: the trainer's policy log-probabilities equal
    PEFT's adapted transformers model (loaded from our export), its reference log-probabilities
    equal the transformers base, the sampler's equal the training forward's, and the base
    weights are exactly the loaded checkpoint's."""
    import peft
    config = toy_config(LORA, "train.steps=3", "train.checkpoint_every=3")
    trainer = Trainer(config)
    loaded = numpy_tree(trainer.state.base_params)
    trainer.run()
    for x, y in zip(jax.tree.leaves(loaded), jax.tree.leaves(numpy_tree(trainer.state.base_params))):
        np.testing.assert_array_equal(x, y)  # never updated
    assert max(float(np.abs(np.asarray(x)).max()) for path, x in
               jax.tree_util.tree_leaves_with_path(trainer.state.params["policy"]) if "lora_b" in str(path)) > 0

    batch, *_ = trainer.collect()
    _, train_batch, _ = jax.jit(trainer.algorithm.prepare)(trainer.state, batch)
    mask = np.asarray(batch.mask) > 0
    policy = trainer.algorithm._forward(trainer.state.params["policy"], batch, trainer.state.base_params).logprobs

    export(config, tmp_path / "adapter")
    base_hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_policy_dir, dtype=torch.float32).eval()
    np.testing.assert_allclose(np.asarray(train_batch.ref_logprobs)[mask],
                               _torch_completion_logprobs(base_hf, batch)[mask], atol=1e-4)
    peft_model = peft.PeftModel.from_pretrained(base_hf, str(tmp_path / "adapter")).eval()
    np.testing.assert_allclose(np.asarray(policy)[mask], _torch_completion_logprobs(peft_model, batch)[mask],
                               atol=1e-4)
    # The sampler runs the adapted policy: its log-probabilities are the training forward's.
    examples = trainer.task.train_batch(0, 8)
    rollout = trainer._sample(examples, trainer._tokenize(examples), step_keys(trainer.state, 0)[0], num_samples=4, temperature=1.0)
    sampled = batch._replace(prompt_ids=rollout.prompt_ids, prompt_mask=rollout.prompt_mask,
                             tokens=rollout.tokens, mask=rollout.mask)
    recomputed = trainer.algorithm._forward(trainer.state.params["policy"], sampled, trainer.state.base_params)
    np.testing.assert_allclose(np.where(np.asarray(rollout.mask) > 0, recomputed.logprobs, 0.0), rollout.logprobs,
                               atol=2e-5)


def test_the_adapter_gradient_is_the_merged_models_gradient_pulled_through_the_other_factor(toy_config):
    """The trainer's update differentiates the adapters only, and their gradient is the chain rule
    applied to the full-fine-tuning gradient of the merged weights on the same batch."""
    trainer = Trainer(toy_config(LORA, "train.steps=2"))
    for _ in range(2):
        trainer.step()  # move B off zero
    batch, *_ = trainer.collect()
    state, train_batch, _ = jax.jit(trainer.algorithm.prepare)(trainer.state, batch)
    _, grads = jax.jit(trainer.algorithm.value_and_grad)(state.params, train_batch, state.base_params)
    assert set(grads) == {"policy"}
    merged = lora.merge_lora(trainer.policy_model())
    graphdef, merged_params = nnx.split(merged)
    full = Algorithm(trainer.config.algo, graphdef=graphdef, temperature=trainer.config.rollout.temperature,
                     chunk_size=None)
    _, full_grads = jax.jit(full.value_and_grad)({"policy": merged_params}, train_batch)
    adapted = trainer.policy_model()
    s = 8.0 / 4
    checked = 0
    for path, linear in lora.adapted_modules(adapted):
        node_full, node_lora = full_grads["policy"], grads["policy"]
        for part in path.split("."):
            key = int(part) if part.isdigit() else part
            node_full, node_lora = node_full[key], node_lora[key]
        dw = np.asarray(node_full["kernel"][...], np.float64)
        a, b = np.asarray(linear.lora.lora_a[...], np.float64), np.asarray(linear.lora.lora_b[...], np.float64)
        scale = max(np.abs(dw).max(), 1e-8)
        np.testing.assert_allclose(np.asarray(node_lora["lora"]["lora_b"][...]), s * a.T @ dw, atol=2e-4 * scale)
        np.testing.assert_allclose(np.asarray(node_lora["lora"]["lora_a"][...]), s * dw @ b.T, atol=2e-4 * scale)
        checked += 1
    assert checked == 2 * 7


def test_dropout_changes_the_update_and_is_reproducible(toy_config):
    """The update with the trainer's dropout key differs from the one without (dropout acts in
    the training forward) and is the same for the same key; micro-batches draw their own masks."""
    import functools

    from jaxrl_llm.training.state import update_step

    trainer = Trainer(toy_config("model.lora={rank: 4, alpha: 8.0, dropout: 0.3}", "train.micro_batch_size=16"))
    trainer.step()  # B off zero, so that dropout on the adapters' input matters
    _, shuffle_key = step_keys(trainer.state, 1)
    key = trainer._dropout_key(shuffle_key, 0)
    assert key is not None
    batch, *_ = trainer.collect()
    state, train_batch, _ = jax.jit(trainer.algorithm.prepare)(trainer.state, batch)
    update = jax.jit(functools.partial(update_step, trainer.algorithm, trainer.optimizer))

    def adapters(dropout_key):
        new_state, _ = update(state, train_batch, dropout_key)
        return jax.tree.leaves(numpy_tree(new_state.params["policy"]))

    plain, dropped, again = adapters(None), adapters(key), adapters(key)
    assert max(float(np.abs(x - y).max()) for x, y in zip(plain, dropped)) > 1e-6
    for x, y in zip(dropped, again):
        np.testing.assert_array_equal(x, y)
    assert Trainer(toy_config(LORA))._dropout_key(shuffle_key, 0) is None  # no dropout: no key, no masks


def test_dropout_acts_in_the_gradient_only_never_in_the_reward_or_the_kl(toy_config, tmp_path):
    """The sampler applies no dropout, so the KL in the reward, the advantages and the logged KL
    come from a dropout-free forward: with lora.dropout 0.1 the reward and KL metrics are those
    without dropout (what dropout 0 computes) for any dropout key and micro-batching, while the
    gradient still has dropout in it."""
    adapters = "model.lora={rank: 4, alpha: 8.0, dropout: 0.1}"
    trainer = Trainer(toy_config(adapters))
    micro = Trainer(toy_config(adapters, "train.micro_batch_size=8", f"train.run_dir={tmp_path / 'micro'}")).algorithm
    # Adapters off zero (B starts at 0: dropout on their input would change nothing, and the
    # policy would be its reference, with a KL of 0).
    noise = lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape, p.dtype)  # noqa: E731
    trainer.state = trainer.state.replace(params=jax.tree.map(noise, trainer.state.params))
    batch, *_ = trainer.collect()

    def update(algorithm, dropout_key):
        """The step's metrics as `Trainer.step` reports them (prepare's first, then the update's
        `Stat`s) and the update's gradient."""
        state, train_batch, metrics = jax.jit(algorithm.prepare)(jax.tree.map(jnp.copy, trainer.state), batch)
        (_, (aux, _)), grads = jax.jit(algorithm.value_and_grad)(state.params, train_batch, state.base_params,
                                                                  dropout_key)
        metrics = {key: float(value) for key, value in metrics.items()}
        for key, stat in aux.items():
            metrics.setdefault(key, float(stat.mean))
        return metrics, jax.tree.leaves(numpy_tree(grads))

    no_dropout, no_dropout_grads = update(trainer.algorithm, None)
    assert no_dropout["kl"] > 1e-3
    keys = [jax.random.key(1), jax.random.key(2), jax.random.key(1)]
    for name, algorithm, key in zip(["key 1", "key 2", "micro-batches"], [trainer.algorithm, trainer.algorithm, micro],
                                    keys):
        metrics, grads = update(algorithm, key)
        for metric in ("kl", "kl/objective", "kl/sequence", "reward/total", "advantage"):
            np.testing.assert_allclose(metrics[metric], no_dropout[metric], rtol=1e-5, atol=1e-6,
                                       err_msg=f"{name}: {metric}")
        assert max(float(np.abs(x - y).max()) for x, y in zip(grads, no_dropout_grads)) > 1e-4, name


def test_checkpoints_hold_adapters_only_and_resume_exactly(toy_config, tiny_policy_dir, tmp_path):
    straight = Trainer(toy_config(LORA, "train.steps=4", f"train.run_dir={tmp_path / 'straight'}"))
    straight.run()
    first = Trainer(toy_config(LORA, "train.steps=2", "train.checkpoint_every=2",
                               f"train.run_dir={tmp_path / 'resumed'}"))
    first.run()
    keys = first.checkpointer.stored_keys()
    assert not any(k.startswith(("base_params", "ref_params")) for k in keys)
    trained = [k for k in keys if k.startswith(("params/policy/", "opt_state/")) and not k.endswith("count")]
    assert trained and all(k.endswith(("lora_a/value", "lora_b/value")) for k in trained)
    meta = json.loads((tmp_path / "resumed" / "checkpoints" / "2" / "meta" / "metadata").read_text())
    assert meta["base"]["path"] == str(tiny_policy_dir) and len(meta["base"]["sha256"]) == 64
    resumed = Trainer(toy_config(LORA, "train.steps=4", f"train.run_dir={tmp_path / 'resumed'}"), resume=True)
    assert int(resumed.state.step) == 2
    resumed.run()
    for a, b in zip(jax.tree.leaves(numpy_tree((straight.state.params, straight.state.opt_state))),
                    jax.tree.leaves(numpy_tree((resumed.state.params, resumed.state.opt_state)))):
        np.testing.assert_array_equal(a, b)

    # Adapters on another base are refused, naming both.
    other = tmp_path / "other_base"
    shutil.copytree(tiny_policy_dir, other)
    model = models.from_pretrained(other)
    model.model.norm.weight[...] = model.model.norm.weight[...] * 1.5
    models.save_pretrained(model, other)
    with pytest.raises(UserError, match=r"`model.path`: the checkpoint of step 4 holds LoRA adapters trained on"):
        Trainer(toy_config(LORA, f"model.path={other}", f"train.run_dir={tmp_path / 'resumed'}"), resume=True)
    # A full fine-tuning checkpoint is not a LoRA run's.
    Trainer(toy_config("train.steps=1", f"train.run_dir={tmp_path / 'plain'}")).run()
    with pytest.raises(UserError, match=r"checkpoint step 1 lacks .*this run trains LoRA adapters \(model.lora\) and "
                                        r"the checkpoint is of full fine-tuning"):
        Trainer(toy_config(LORA, f"train.run_dir={tmp_path / 'plain'}"), resume=True)


def test_merged_export_is_a_transformers_model_with_the_adapted_logits(toy_config, tmp_path):
    from jaxrl_llm.cli import main

    config = toy_config(LORA, "train.steps=2")
    trainer = Trainer(config)
    trainer.run()
    adapted = trainer.policy_model()
    assert main(["export", "--config", str(_write(config, tmp_path)), "--output", str(tmp_path / "merged"),
                 "--merge"]) == 0
    assert (tmp_path / "merged" / "model.safetensors").is_file() and (tmp_path / "merged" / "tokenizer.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = np.array([[1, 5, 6, 7, 8, 9], [1, 9, 8, 7, 6, 5]])
    mask = np.ones_like(ids)
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    np.testing.assert_allclose(np.asarray(adapted(jnp.asarray(ids), jnp.asarray(mask))), theirs, atol=1e-4)
    assert main(["export", "--config", str(_write(config, tmp_path)), "--output", str(tmp_path / "adapter")]) == 0
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["r"] == 4 and adapter_config["lora_alpha"] == 8.0 and adapter_config["peft_type"] == "LORA"


def _write(config, tmp_path):
    import yaml

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    return path


@pytest.mark.parametrize("overrides", [
    ["algo.name=ppo", "algo.critic=separate", "mesh.fsdp=2", "model.dtype=bfloat16"],
    pytest.param(["algo.name=raft", "model.dtype=bfloat16"], marks=pytest.mark.slow),
    pytest.param(["algo.name=grpo", "algo.update_epochs=2", "train.micro_batch_size=8", "mesh.data=2"],
                 marks=pytest.mark.slow),
], ids=["ppo-separate-critic-fsdp-bf16", "raft-bf16", "grpo-2-epochs-micro-batches"])
def test_every_algorithm_trains_adapters_on_a_frozen_base(toy_config, overrides):
    if jax.device_count() < 2:
        pytest.skip("needs 2 devices")
    trainer = Trainer(toy_config("model.lora={rank: 4, alpha: 8.0, targets: [q, v, down]}", *overrides))
    s = trainer.state
    base = numpy_tree(s.base_params)
    adapters = numpy_tree(s.params["policy"])
    metrics = trainer.step()
    assert np.isfinite(metrics["loss/total"]) and metrics["train/skipped_updates"] == 0
    assert s.ref_params is None
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(numpy_tree(trainer.state.base_params))):
        np.testing.assert_array_equal(x, y)
    assert any(np.abs(x - y).max() > 0 for x, y in zip(jax.tree.leaves(adapters),
                                                        jax.tree.leaves(numpy_tree(trainer.state.params["policy"]))))
    if "model.dtype=bfloat16" in overrides:  # the frozen base in the compute dtype, adapters float32
        assert {x.dtype for x in jax.tree.leaves(trainer.state.base_params)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(trainer.state.params["policy"])} == {jnp.dtype(jnp.float32)}
    if "algo.name=ppo" in overrides:  # the critic is trained in full beside the adapters
        assert "critic" in trainer.state.params and jax.tree.leaves(trainer.state.params["critic"])


def test_the_plan_counts_the_base_once(tiny_policy_dir):
    from jaxrl_llm.training import load_config
    from jaxrl_llm.training.plan import plan

    def state_bytes(*overrides):
        config = load_config(None, [f"model.path={tiny_policy_dir}", "rollout.prompts_per_step=4",
                                    "algo.num_samples=4", "rollout.prompt_length=8", "rollout.max_new_tokens=8",
                                    *overrides])
        result = plan(config, devices=1, programs=("generate", "update"))
        assert {m.name for m in result["programs"]} == {"generate", "update"}
        return result["state_bytes"]

    weights = nbytes(nnx.state(models.from_pretrained(tiny_policy_dir)))
    adapters = 4 * 2 * 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + 2 * (32 + 64) + (64 + 32))
    # Full: float32 weights, a reference copy and two AdamW moments. LoRA: the base once, the
    # adapters and their two moments. (Plus a few scalars: step, key, AdamW's count.)
    assert 4 * weights <= state_bytes() < 4 * weights + 64
    assert weights + 3 * adapters <= state_bytes("model.lora={rank: 4}") < weights + 3 * adapters + 64
