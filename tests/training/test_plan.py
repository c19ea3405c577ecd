"""`jaxrl-llm plan`: the run's programs compiled for abstract inputs, XLA's memory read per device."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.training import load_config
from jaxrl_llm.training.plan import REMAT_BY_COST, format_plan, plan

ROOT = Path(__file__).resolve().parents[2]
LLAMA_1B = ROOT / "benchmarks" / "model_configs" / "llama-3.2-1b"


@pytest.mark.slow  # a fresh process compiling a 1B model's programs; the tiny-model plan tests run by default
def test_plan_of_the_published_1b_config_on_8_fake_devices():
    """The CLI end to end, in a fresh process (fake devices must be set before JAX starts): a
    directory holding only config.json is enough, and nothing of the model's size is allocated."""
    assert sorted(os.listdir(LLAMA_1B)) == ["config.json"]
    command = [sys.executable, "-m", "jaxrl_llm.cli", "plan", "--config", "configs/rloo_arithmetic.yaml", "--devices", "8",
               "--device-memory-gb", "80", "rollout.oversample=1",
               f"model.path={LLAMA_1B}", "mesh.fsdp=8", "model.dtype=bfloat16", "model.remat=layer",
               "model.scan_layers=true", "rollout.prompts_per_step=8", "algo.num_samples=4",
               "rollout.prompt_length=64", "rollout.max_new_tokens=64", "train.micro_batch_size=16"]
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "mesh {'data': 1, 'fsdp': 8}" in out
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.splitlines()
            if line.split() and line.split()[0] in ("generate", "prepare", "update")}
    assert set(rows) == {"generate", "prepare", "update"}
    state_gib = float(out.split("per-device train state ")[1].split()[0])
    # 1.24B parameters: float32 master (4 B) + AdamW (8 B) + bfloat16 reference (2 B), over 8 devices.
    assert 1.8 < state_gib < 2.2, out
    assert rows["update"][1] == pytest.approx(state_gib, abs=0.02)  # the update's output is the new state
    assert "fits in 80 GB per device" in out


def test_plan_says_what_each_memory_lever_saves(tiny_policy_dir):
    """On the tiny model (one process, its 4 test devices): micro-batches and remat shrink the
    update's temporaries, and PPO's separate critic costs a second set of weights and AdamW state."""

    def peaks(*overrides, programs=("update",)):
        config = load_config(None, [f"model.path={tiny_policy_dir}", "rollout.prompts_per_step=8",
                                    "algo.num_samples=4", "rollout.prompt_length=16", "rollout.max_new_tokens=16",
                                    "mesh.fsdp=2", *overrides])
        result = plan(config, devices=4, programs=programs)
        return {m.name: m for m in result["programs"]}, result["state_bytes"]

    whole, rloo_state = peaks(programs=("prepare", "update"))
    micro, _ = peaks("train.micro_batch_size=4", programs=("prepare", "update"))
    assert micro["update"].temporaries < whole["update"].temporaries
    assert micro["prepare"].temporaries < whole["prepare"].temporaries
    scanned, _ = peaks("model.scan_layers=true")
    remat, _ = peaks("model.scan_layers=true", "model.remat=layer")
    assert remat["update"].temporaries < scanned["update"].temporaries
    _, ppo_state = peaks("algo.name=ppo", "algo.critic=separate", programs=())
    # PPO adds a critic (float32 + AdamW, 12 B per weight) next to RLOO's policy (12 B) and
    # reference (4 B here, float32 compute): close to (12 + 12 + 4) / (12 + 4).
    assert 1.6 < ppo_state / rloo_state < 1.8


def test_plan_lowers_the_packed_programs_at_their_largest_layout(tiny_policy_dir):
    """With train.packing the plan compiles prepare and the update on the largest packed layout a
    batch can need (every sequence full length), and micro-batches still shrink it."""
    common = [f"model.path={tiny_policy_dir}", "rollout.prompts_per_step=8", "algo.num_samples=4",
              "rollout.prompt_length=12", "rollout.max_new_tokens=16", "train.packing=true"]
    whole = {m.name: m for m in plan(load_config(None, common), devices=1, programs=("prepare", "update"),
                                     platform="cpu")["programs"]}
    micro = {m.name: m for m in plan(load_config(None, [*common, "train.micro_batch_size=8"]), devices=1,
                                     programs=("prepare", "update"), platform="cpu")["programs"]}
    assert 0 < micro["update"].temporaries < whole["update"].temporaries
    with pytest.raises(UserError, match="`train.pack_length`: got 20, expected at least 28"):
        plan(load_config(None, [*common, "train.pack_length=20"]), devices=1, programs=("update",), platform="cpu")


def test_plan_needs_the_prompt_width(tiny_policy_dir):
    with pytest.raises(ValueError, match="rollout.prompt_length"):
        plan(load_config(None, [f"model.path={tiny_policy_dir}"]), devices=1)


def test_plan_compares_remat_policies_and_recommends_the_cheapest_that_fits(tiny_policy_dir):
    config = load_config(None, [f"model.path={tiny_policy_dir}", "rollout.prompts_per_step=8", "algo.num_samples=4",
                                "rollout.prompt_length=16", "rollout.max_new_tokens=16", "model.scan_layers=true"])
    result = plan(config, devices=1, programs=("update",), platform="cuda", compare_remat=True)
    remat = result["remat"]
    assert list(remat) == list(REMAT_BY_COST)
    # Keeping less costs recomputation and saves memory: none >= the selective policy >= layer.
    assert remat["none"].temporaries >= remat["dots_with_no_batch_dims_saveable"].temporaries
    assert remat["dots_with_no_batch_dims_saveable"].temporaries > remat["layer"].temporaries
    between = (remat["layer"].peak + remat["none"].peak) / 2 / 1e9  # fits layer, not none
    text = format_plan(result, device_memory_gb=between)
    assert text.startswith("cuda's kernels compiled by XLA:CPU")
    recommended = text.split("recommended: model.remat=")[1].split()[0]
    assert recommended in ("dots_with_no_batch_dims_saveable", "layer")
    assert remat[recommended].peak <= between * 1e9
    assert "no remat policy fits" in format_plan(result, device_memory_gb=remat["layer"].peak / 2 / 1e9)


def test_plan_refuses_an_unknown_platform(tiny_policy_dir):
    with pytest.raises(ValueError, match="--platform.*'gpu'"):
        plan(load_config(None, [f"model.path={tiny_policy_dir}", "rollout.prompt_length=8"]), devices=1,
             platform="gpu")


def test_plan_counts_the_engines_cache_on_one_device(tiny_policy_dir):
    """On one device the sampler is the rollout engine: its decode chunk holds `rollout.slots`
    completion caches and one prompt cache per prompt in flight (not one per sample), and a
    sampler that does not fit names the knob."""
    prompt_len, steps = 64, 16

    def generate_memory(*overrides):
        config = load_config(None, [f"model.path={tiny_policy_dir}", "rollout.prompts_per_step=8",
                                    "algo.num_samples=4", f"rollout.prompt_length={prompt_len}",
                                    f"rollout.max_new_tokens={steps}", *overrides])
        (memory,) = plan(config, devices=1, programs=("generate",))["programs"]
        return memory

    every_row, eight_slots = generate_memory(), generate_memory("rollout.slots=8")
    # The tiny policy's cache: 2 layers x (K, V) x 2 KV heads x 8 dims x 4 bytes a token. 32 slots
    # and 8 prompt entries (every row; a prompt's 4 samples share one) against 8 slots and 4
    # entries: 24 completion caches of T - 1 tokens and 4 prompt caches fewer.
    token_bytes = 2 * 2 * 2 * 8 * 4
    fewer = (24 * (steps - 1) + 4 * prompt_len) * token_bytes
    saved = every_row.arguments - eight_slots.arguments
    assert fewer <= saved <= fewer + 4096, (saved, fewer)
    assert eight_slots.peak < every_row.peak
    text = format_plan({"programs": [every_row], "mesh": {"data": 1}, "sequences": 32, "update_sequences": 32,
                        "state_bytes": 0}, device_memory_gb=every_row.peak / 2e9)
    assert "the sampler does NOT fit: lower rollout.slots" in text
