"""Interruptions and failures lose nothing: SIGTERM/SIGINT checkpoint and stop, `kill -9` mid-save
and damaged checkpoints leave the last good one in use, non-finite updates are never applied, and
rewards that always fail stop the run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxrl_llm import UserError
from jaxrl_llm.training import Checkpointer, Trainer, load_config
from jaxrl_llm.training.runtime import InvalidRewards, NonFiniteUpdate

ROOT = Path(__file__).parents[2]
MAIN = ROOT / "configs" / "rloo_arithmetic.yaml"
# The main job cut to a fraction of a second a step, with a constant learning rate: a run of N
# steps and a longer run stopped at step N take the same updates.
FAST = ["rollout.prompts_per_step=4", "rollout.oversample=1", "task.num_eval=4", "train.eval_samples=0",
        "train.plot=false", "train.tensorboard=false", "optim.schedule=constant", "optim.warmup_steps=0",
        "train.eval_every=1000", "train.checkpoint_every=1000", "mesh.data=1"]
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a user runs it


def start(run_dir, *overrides, prelude=""):
    code = f"{prelude}import sys; from jaxrl_llm.cli import main; sys.exit(main(sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, "train", "--config", str(MAIN), *FAST,
                             f"train.run_dir={run_dir}", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def params(run_dir, steps):
    """The policy parameters of the latest checkpoint under `run_dir`."""
    trainer = Trainer(load_config(MAIN, [*FAST, f"train.run_dir={run_dir}", f"train.steps={steps}"]), resume=True)
    return int(trainer.state.step), jax.tree.map(np.asarray, trainer.state.params["policy"])


def wait_for_steps(run_dir, n, proc, timeout=300):
    """Block until `metrics.jsonl` has `n` training steps (the run is past compilation)."""
    metrics = Path(run_dir) / "metrics.jsonl"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()}")
        if metrics.exists() and metrics.read_text().count('"loss/total"') >= n:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach the step in time")


@pytest.mark.parametrize("signum", [pytest.param(signal.SIGTERM, marks=pytest.mark.slow), signal.SIGINT])
def test_a_signal_finishes_the_step_checkpoints_and_resume_is_exact(tmp_path, signum):
    proc = start(tmp_path / "stopped", "train.steps=100000")
    wait_for_steps(tmp_path / "stopped", 2, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=300)
    name = signal.Signals(signum).name
    assert proc.returncode == 128 + signum, err
    assert f"{name}: finishing this step" in err and f"jaxrl-llm train: stopped by {name} after step" in err, err
    stopped_at = Checkpointer(tmp_path / "stopped" / "checkpoints").latest_step()
    assert stopped_at >= 2  # the step in progress finished, then its checkpoint was written
    if signum == signal.SIGINT:
        return  # the same path as SIGTERM from here on: resumed exactness is checked once

    total = stopped_at + 2
    resumed = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "train", "--config", str(MAIN), *FAST,
                              f"train.run_dir={tmp_path / 'stopped'}", f"train.steps={total}", "--resume"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    straight = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "train", "--config", str(MAIN), *FAST,
                               f"train.run_dir={tmp_path / 'straight'}", f"train.steps={total}"],
                              capture_output=True, text=True, env=ENV, timeout=300)
    assert straight.returncode == 0, straight.stderr
    (step_a, a), (step_b, b) = params(tmp_path / "stopped", total), params(tmp_path / "straight", total)
    assert step_a == step_b == total
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)  # the interrupted run is the uninterrupted one


def test_a_second_signal_abandons_the_step_and_writes_nothing(tmp_path):
    # Slow steps (a sleep in the reward) so that both signals land inside one step.
    (tmp_path / "slow.py").write_text("import time\ndef reward(completions, **kw):\n    time.sleep(0.5)\n"
                                      "    return [0.0] * len(completions)\n")
    proc = start(tmp_path / "run", "train.steps=100000", "train.checkpoint_every=2",
                 f"reward.terms=[{{kind: python, target: '{tmp_path / 'slow.py'}:reward'}}]")
    wait_for_steps(tmp_path / "run", 3, proc)  # step 2's checkpoint is written
    time.sleep(0.2)  # past step 3's end (a signal there would save step 3): inside step 4's 0.5 s reward
    proc.send_signal(signal.SIGINT)
    time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "SIGINT again: the step in progress was abandoned" in err, err
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpoints.all_steps() == [2] and not checkpoints.incomplete()  # step 4 wrote nothing
    assert params(tmp_path / "run", 100000)[0] == 2  # what is there restores


# Patched into a training process: the third save is killed (SIGKILL, nothing runs after it) once
# its arrays are written, before orbax renames its temporary directory: the most delicate moment.
KILL_BEFORE_RENAME = """
import os, signal
from orbax.checkpoint._src.path import atomicity
_finalize = atomicity.AtomicRenameTemporaryPath.finalize
async def finalize(self, *args, **kwargs):
    if self.get_final().name == "3":  # the step directory of step 3, its items written
        os.kill(os.getpid(), signal.SIGKILL)
    return await _finalize(self, *args, **kwargs)
atomicity.AtomicRenameTemporaryPath.finalize = finalize
"""


def test_kill_9_during_a_save_leaves_the_last_checkpoint_in_use(tmp_path):
    proc = start(tmp_path / "run", "train.steps=100", "train.checkpoint_every=1", "train.keep_checkpoints=5",
                 prelude=KILL_BEFORE_RENAME)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err
    checkpoints = Checkpointer(tmp_path / "run" / "checkpoints")
    assert checkpoints.all_steps() == [1, 2] and len(checkpoints.incomplete()) == 1
    resumed = subprocess.run([sys.executable, "-m", "jaxrl_llm.cli", "train", "--config", str(MAIN), *FAST,
                              f"train.run_dir={tmp_path / 'run'}", "train.steps=4", "--resume"],
                             capture_output=True, text=True, env=ENV, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stdout
    assert f"warning: {checkpoints.incomplete()[0]} is an incomplete checkpoint" in resumed.stderr
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 4


def toy_run(toy_config, tmp_path, *overrides):
    return Trainer(toy_config("train.checkpoint_every=1", "train.keep_checkpoints=3", *overrides,
                              f"train.run_dir={tmp_path / 'run'}"))


def test_a_damaged_checkpoint_is_skipped_with_a_warning(toy_config, tmp_path, capsys):
    toy_run(toy_config, tmp_path, "train.steps=3").run()
    directory = tmp_path / "run" / "checkpoints"
    for path in (directory / "3" / "state").rglob("*"):  # the array data of the latest step is lost
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"")
    resumed = toy_run(toy_config, tmp_path, "train.steps=3")
    resumed.restore()
    assert int(resumed.state.step) == 2 and resumed.data_position == 2 * 8
    err = capsys.readouterr().err
    assert f"warning: the checkpoint {directory / '3'} does not restore" in err and "trying the one before" in err
    with pytest.raises(UserError, match=r"`--resume`: the checkpoint .*3 does not restore"):
        resumed.restore(3)  # asked for by number: an error, not a silent fallback


def test_a_nonfinite_update_is_not_applied(toy_config, tmp_path):
    trainer = toy_run(toy_config, tmp_path, "train.steps=2")
    trainer.run()
    # A corrupted reference (NaN weights) makes the KL, the shaped reward, the loss and the
    # gradients NaN; the policy itself samples normally.
    trainer.state = trainer.state.replace(ref_params=jax.tree.map(lambda x: x * np.nan, trainer.state.ref_params))
    before = jax.tree.map(np.asarray, trainer.state.params["policy"])
    with pytest.raises(NonFiniteUpdate, match=r"step 3: non-finite .*loss/total.*stopped without saving: the "
                                              r"checkpoint of step 2 is intact"):
        trainer.step()
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.params["policy"])):
        np.testing.assert_array_equal(x, np.asarray(y))  # the NaN update never reached the parameters
    assert Checkpointer(tmp_path / "run" / "checkpoints").latest_step() == 2

    trainer.config.train.on_nonfinite = "skip"
    metrics = trainer.step()
    assert metrics["train/skipped_updates"] == 1 and not np.isfinite(metrics["loss/total"])
    for x, y in zip(jax.tree.leaves(before), jax.tree.leaves(trainer.state.params["policy"])):
        np.testing.assert_array_equal(x, np.asarray(y))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(trainer.state.opt_state))


def test_rewards_that_always_fail_stop_the_run(toy_config, tmp_path, capsys):
    trainer = toy_run(toy_config, tmp_path, "train.steps=10", "reward.on_error=mask", "reward.max_invalid_steps=2",
                      "reward.terms=[{kind: python, target: 'toy_rewards:broken_always'}]")
    with pytest.raises(InvalidRewards, match=r"every reward failed .* 2 step\(s\) in a row, the limit "
                                             r"reward.max_invalid_steps=2"):
        trainer.run()
    out = capsys.readouterr().out
    assert "warning: step 1: every reward failed (reward/valid_fraction 0, nothing trained), 1 step(s) in a row" in out
