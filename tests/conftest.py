"""Test set-up: 4 fake CPU devices for the multi-device tests, float32 everywhere.

On an accelerator: `JAX_PLATFORMS=cuda,cpu python -m pytest -m "not slow and not real_model"`
(what benchmarks/gpu_suite.py runs). The accelerator is then the default device; tests that need
several devices of one kind skip themselves, and the GPU-only tests (marked `gpu`) run.
"""

import os
import shutil
import tempfile

# Must happen before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test session, new and empty each time, shared through the
# environment by the xdist workers and by the processes tests start (CLI, README blocks): a program
# they have in common is compiled once instead of once per process. It changes no result.
if "JAXRL_LLM_TEST_CACHE" not in os.environ:  # set once, in the process that starts the session
    os.environ["JAXRL_LLM_TEST_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(
        prefix="jaxrl_llm_compilation_cache_")
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "-1"

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

if jax.default_backend() != "cpu":
    # The tests compare float32 computations with float32 (or float64) references; a GPU's default
    # float32 matmul may round its inputs to TF32 (10-bit mantissa), another precision altogether.
    jax.config.update("jax_default_matmul_precision", "highest")


# What CI leaves out for time, on top of the tests marked `slow` where they are defined: each of
# these repeats, for another algorithm, parameter or path, what a test kept in CI already checks
# (for example one reference update per algorithm family stays, its variants go). They run with
# the slow tests: `python -m pytest -m slow`.
LEFT_OUT_OF_CI = {
    "tests/rollout/test_sampler.py": (
        "test_split_over_a_mesh_equals_one_device[4-AxisType.Auto]",
    ),
    "tests/test_cli.py": (
        "test_wandb_offline_gets_what_tensorboard_gets_and_json_stays_strict",
        "test_transformers_torch_notice_is_silenced",
        "test_no_checkpoint_blames_the_flag_that_asked[command1-`--checkpoint`]",
        "test_no_checkpoint_blames_the_flag_that_asked[command2-`train.run_dir`]",
    ),
    "tests/test_properties.py": (
        "test_values_at_masked_positions_never_change_any_output",
        "test_transforms_ignore_masked_positions",
    ),
    "tests/training/test_dataset_training.py": (
        "test_resume_across_epochs_is_exact",
    ),
    "tests/training/test_interruptions.py": (
        "test_a_damaged_checkpoint_is_skipped_with_a_warning",
        "test_a_second_signal_abandons_the_step_and_writes_nothing",
    ),
    "tests/training/test_lora_training.py": (
        "test_dropout_changes_the_update_and_is_reproducible",
        "test_policy_and_reference_logprobs_are_transformers_and_peft",
        "test_every_algorithm_trains_adapters_on_a_frozen_base[ppo-separate-critic-fsdp-bf16]",
        "test_merged_export_is_a_transformers_model_with_the_adapted_logits",
        "test_the_plan_counts_the_base_once",
        "test_checkpoints_hold_adapters_only_and_resume_exactly",
        "test_the_adapter_gradient_is_the_merged_models_gradient_pulled_through_the_other_factor",
    ),
    "tests/training/test_micro_batches.py": (
        "test_failed_rewards_count_in_no_denominator[reinforce]",
        "test_failed_rewards_count_in_no_denominator[vanilla_pg]",
        "test_failed_rewards_count_in_no_denominator[ppo]",
        "test_failed_rewards_count_in_no_denominator[grpo]",
        "test_failed_rewards_count_in_no_denominator[raft]",
        "test_four_micro_batches_give_the_one_pass_update[reinforce]",
        "test_four_micro_batches_give_the_one_pass_update[vanilla_pg]",
        "test_four_micro_batches_give_the_one_pass_update[grpo]",
        "test_four_micro_batches_give_the_one_pass_update[raft]",
        "test_reinforce_with_an_ema_baseline_in_micro_batches",
        "test_micro_batches_inside_minibatches_give_the_same_update[ppo]",
    ),
    "tests/training/test_mixed_precision.py": (
        "test_bf16_first_update_matches_float32_within_bf16_tolerance[ppo]",
        "test_bf16_parameters_are_an_explicit_choice_and_lose_small_steps",
    ),
    "tests/training/test_multihost.py": (
        "test_two_processes_train_as_one",
    ),
    "tests/training/test_plan.py": (
        "test_plan_compares_remat_policies_and_recommends_the_cheapest_that_fits",
    ),
    "tests/training/test_reference_updates.py": (
        "test_bandit_update_equals_the_reference[rloo-k3]",
        "test_bandit_update_equals_the_reference[reinforce-k1]",
        "test_bandit_update_equals_the_reference[vanilla_pg-k1]",
        "test_ppo_update_equals_the_reference[shared]",
        "test_reinforce_ema_baseline_advances_once_per_update",
    ),
    "tests/training/test_reward_model_training.py": (
        "test_bf16_compute_keeps_float32_masters_and_every_small_step_lands",
        "test_the_reward_model_learns_the_preference_from_pairs",
    ),
    "tests/training/test_trainer.py": (
        "test_four_devices_equal_one[mesh1-ppo]",
        "test_separate_critic_trains",
        "test_value_head_only_in_ppo_checkpoints[raft-False-False]",
    ),
    "tests/training/test_wiring.py": (
        "test_kl_metric_is_k1_of_the_sampling_policy_for_every_algorithm[ppo-extra2]",
        "test_kl_metric_is_k1_of_the_sampling_policy_for_every_algorithm[grpo-extra1]",
        "test_kl_metric_is_k1_of_the_sampling_policy_for_every_algorithm[reinforce-extra3]",
        "test_value_loss_reaches_the_policy_only_through_a_shared_critic[separate]",
        "test_logprob_chunks_reach_the_forward_and_leave_the_gradient_unchanged",
        "test_execution_keys_reach_the_policy_and_the_critic_and_leave_the_update_unchanged",
    ),
}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the marks
def pytest_collection_modifyitems(config, items):
    left_out = {f"{path}::{test}" for path, tests in LEFT_OUT_OF_CI.items() for test in tests}
    for item in items:
        if item.nodeid in left_out:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def glibc_as_it_is(monkeypatch):
    """A test that runs `jaxrl-llm` in this process would tune the worker's malloc for every test
    after it (`--host-malloc`); tests/training/test_host_memory.py checks the tuning in processes
    of its own."""
    from jaxrl_llm.training import host_memory

    monkeypatch.setattr(host_memory, "tune_glibc_malloc", lambda: "left as it is by the tests")


def _memory_mappings() -> int:
    try:
        with open("/proc/self/maps") as f:
            return sum(1 for _ in f)
    except OSError:  # not Linux
        return 0


def _max_memory_mappings() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


@pytest.fixture(autouse=True, scope="session")
def _map_limit():
    return _max_memory_mappings()


@pytest.fixture(autouse=True)
def release_compiled_programs(_map_limit):
    """Every live XLA:CPU program holds three memory mappings (code, read-only data, data), and
    JAX's caches keep every program a test process compiled alive: a worker that runs a few
    thousand tests reaches the kernel's limit per process (vm.max_map_count, 65530), where XLA's
    next allocation fails ("LLVM compilation error: Cannot allocate memory") and the process
    aborts or segfaults. After a test that leaves the process past half the limit, JAX's caches
    are cleared: the programs are released and compiled again (from the persistent cache) when
    called. scripts/xla_cpu_map_limit.py reproduces the abort in one process."""
    yield
    if _map_limit and _memory_mappings() > _map_limit // 2:
        jax.clear_caches()


def pytest_sessionfinish(session):
    if not hasattr(session.config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(os.environ["JAXRL_LLM_TEST_CACHE"], ignore_errors=True)
