"""The command line as a user meets it, each case in its own `python -m jaxrl_llm.cli` process:
anticipated errors are one line with exit status 2 (a traceback only with `--debug`), progress
and evaluation say what they measured, and every JSON file is strict JSON."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _wandb_records import history, offline_run

ROOT = Path(__file__).parents[1]
MAIN = str(ROOT / "configs" / "rloo_arithmetic.yaml")
# The main job's recipe, cut to seconds: 4 prompts x 4 samples, 4 held-out prompts, no plot/TensorBoard.
FAST = ["rollout.prompts_per_step=4", "rollout.oversample=1", "task.num_eval=4", "train.eval_samples=0",
        "train.plot=false", "train.tensorboard=false"]


def cli(*args, cwd, env=None, prelude=""):
    """`jaxrl-llm ARGS` in a fresh interpreter (the console script runs `jaxrl_llm.cli:main`)."""
    code = f"{prelude}import sys; from jaxrl_llm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, **(env or {})})


def assert_one_line_error(proc, *fragments):
    """Exit status 2, no traceback, and exactly one `jaxrl-llm ...:` line containing `fragments`."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxrl-llm")]
    assert len(lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def strict_json(text: str):
    def reject(constant):
        raise AssertionError(f"bare {constant} in JSON")

    return json.loads(text, parse_constant=reject)


# -- anticipated errors: one line, exit status 2 --------------------------------------------------


def test_malformed_yaml_names_the_line_and_column(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("algo:\n  name: rloo\n  kl_coef: [0.1\ntrain:\n  steps: 3\n")
    assert_one_line_error(cli("train", "--config", config, cwd=tmp_path), "bad.yaml", "not valid YAML",
                          "line 4, column 6")


def test_empty_yaml_and_missing_config_are_errors_not_silent_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("\n")
    assert_one_line_error(cli("train", "--config", "empty.yaml", cwd=tmp_path), "empty.yaml", "is empty",
                          "configs/rloo_arithmetic.yaml")
    proc = cli("train", "train.steps=1", cwd=tmp_path)
    assert proc.returncode == 2 and "the following arguments are required: --config" in proc.stderr


def test_unknown_key_lists_the_valid_ones(tmp_path):
    assert_one_line_error(cli("train", "--config", MAIN, "algo.kl_coeff=0.1", cwd=tmp_path), "`algo`",
                          "unknown key(s) ['kl_coeff']", "valid keys are")


@pytest.mark.parametrize("command,flag", [
    (["train", "--resume"], "`--resume`"),
    (["eval", "--checkpoint"], "`--checkpoint`"),
    (["export", "--output", "hf"], "`train.run_dir`"),
])
def test_no_checkpoint_blames_the_flag_that_asked(tmp_path, command, flag):
    assert_one_line_error(cli(*command, "--config", MAIN, "train.run_dir=empty_run", cwd=tmp_path), flag,
                          "no checkpoint under", "empty_run")


def test_model_path_that_does_not_exist(tmp_path):
    assert_one_line_error(cli("train", "--config", MAIN, "model.path=no/such/model", cwd=tmp_path), "`model.path`",
                          "'no/such/model'", "does not exist")


def test_model_directory_without_tokenizer_files(tmp_path):
    from jaxrl_llm.tasks.arithmetic import default_policy_path

    model = tmp_path / "weights_only"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(default_policy_path() / name, model)
    line = assert_one_line_error(cli("train", "--config", MAIN, f"model.path={model}", cwd=tmp_path),
                                 "`model.path`", "no tokenizer could be loaded", "tokenizer.json")
    assert "sentencepiece" not in line


def test_every_prompt_skipped_for_length(tmp_path):
    """Skipping long prompts never loops forever: when (nearly) all are too long, the setting is named."""
    assert_one_line_error(cli("train", "--config", MAIN, "rollout.prompt_length=3", "rollout.long_prompts=skip", *FAST,
                              cwd=tmp_path),
                          "`rollout.prompt_length`: ", "are longer than 3 tokens (rollout.long_prompts: skip)")


def test_reward_function_returning_the_wrong_length(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def short(prompts, completions):\n    return [1.0] * (len(completions) - 1)\n")
    proc = cli("train", "--config", MAIN, *FAST, "train.steps=1", "train.run_dir=run",
               "reward.terms=[{kind: python, target: 'my_rewards:short'}]", cwd=tmp_path,
               env={"PYTHONPATH": str(tmp_path)})
    assert_one_line_error(proc, "reward term my_rewards:short returned shape (3,), expected (4,)",
                          "one score per completion")


def test_batch_not_divisible_by_the_devices(tmp_path):
    proc = cli("train", "--config", MAIN, *FAST, "rollout.prompts_per_step=3", "algo.num_samples=2",
               cwd=tmp_path, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert_one_line_error(proc, "`rollout.prompts_per_step * algo.num_samples`: got 6 sequences",
                          "multiple of the 4 devices", "mesh.data")


def test_debug_shows_the_traceback(tmp_path):
    proc = cli("train", "--debug", "--config", MAIN, "model.path=no/such/model", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "UserError: `model.path`" in proc.stderr


# -- the happy path: progress, resume, samples, pass@k, the step used, strict JSON -----------------


def test_train_resume_eval_export_say_what_they_did(tmp_path):
    run = ["train.run_dir=run", "train.checkpoint_every=1", "train.eval_every=2", "train.log_samples=3",
           "train.tensorboard=true", *FAST[:-1]]
    first = cli("train", "--config", MAIN, "train.steps=2", *run, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert re.search(r"step 1: compiled in \d+\.\d s", first.stdout)
    for field in ("reward(all)=", "acc(trained)=", "kl=", "eval="):
        assert field in first.stderr  # the bar (tqdm writes to stderr)
    summary = strict_json(first.stdout[first.stdout.index("{"):])
    assert set(summary) >= {"eval/accuracy_before", "eval/accuracy_after"}

    resumed = cli("train", "--config", MAIN, "--resume", "train.steps=4", *run, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout and "step 3: compiled in" in resumed.stdout
    counts = re.findall(r"\b(\d)/4\b", resumed.stderr)
    assert counts and min(map(int, counts)) == 3  # the bar continues at the resumed step, never 0/4

    samples = [strict_json(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [0] * 3 + [2] * 3 + [4] * 3  # before, and at every evaluation
    assert set(samples[0]) == {"step", "prompt", "completion", "reward", "correct", "answer", "finished"}
    events = b"".join(f.read_bytes() for f in (tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert b"eval/samples" in events and samples[-1]["prompt"].encode() in events  # the TensorBoard text table

    evaluated = cli("eval", "--config", MAIN, "--checkpoint", *run, "train.eval_samples=3", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert "evaluating step 4 of" in evaluated.stdout
    assert "| prompt | completion | reward | correct | answer | finished |" in evaluated.stdout
    metrics = strict_json(evaluated.stdout[evaluated.stdout.index("{"):])
    assert set(metrics) == {"eval/accuracy", "eval/reward", "eval/pass@3", "eval/mean@3"}
    assert metrics["eval/mean@3"] <= metrics["eval/pass@3"]

    exported = cli("export", "--config", MAIN, "--output", "hf", "--step", "3", *run, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "wrote step 3 of" in exported.stdout and (tmp_path / "hf" / "model.safetensors").exists()


def test_wandb_offline_gets_what_tensorboard_gets_and_json_stays_strict(tmp_path):
    """A reward that fails on every sample (dropped with reward.on_error=mask) leaves the step's
    reward mean NaN: `null` in metrics.jsonl and summary.json, and absent from TensorBoard and W&B,
    which get every finite scalar of every step."""
    pytest.importorskip("wandb")
    (tmp_path / "my_rewards.py").write_text("def fails(prompts, completions):\n    raise RuntimeError('no')\n")
    proc = cli("train", "--config", MAIN, *FAST, "train.steps=2", "train.eval_every=1", "train.run_dir=run",
               "reward.on_error=mask", "reward.terms=[{kind: python, target: 'my_rewards:fails'}]",
               "train.wandb={project: cli-test, mode: offline}", cwd=tmp_path,
               env={"PYTHONPATH": str(tmp_path), "WANDB_SILENT": "true", "WANDB_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr
    rows = [strict_json(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [0, 1, 2]
    assert rows[-1]["reward/mean"] is None and rows[-1]["reward/valid_fraction"] == 0.0
    assert strict_json((tmp_path / "run" / "summary.json").read_text())["reward/mean"] is None
    _, log = offline_run(tmp_path / "run")
    logged = history(log)
    for row in rows:
        step = row.pop("step")
        finite = {k: v for k, v in row.items() if isinstance(v, (int, float))}  # null (NaN) left out
        assert {k: v for k, v in logged[step].items() if k != "eval/samples"} == pytest.approx(finite)
        assert "eval/samples" in logged[step]  # every step evaluated, so every step has its samples table


def test_transformers_torch_notice_is_silenced(tmp_path):
    hide_torch = "import sys; sys.modules['torch'] = None; "  # what `import torch` sees without torch
    control = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"], capture_output=True,
                             text=True, timeout=300)
    assert "PyTorch was not found" in control.stderr  # the notice exists, so its absence below means something
    proc = cli("eval", "--config", MAIN, "task.num_eval=4", cwd=tmp_path, prelude=hide_torch)
    assert proc.returncode == 0, proc.stderr
    assert "PyTorch was not found" not in proc.stderr + proc.stdout
    assert "evaluating the configured policy" in proc.stdout
