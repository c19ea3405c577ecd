"""The W&B sink, with the real `wandb` package in offline mode, read back from its `.wandb` file."""

import json
import os
import subprocess
import sys

import pytest

from _wandb_records import history, offline_run, records

from jaxrl_llm.errors import UserError
from jaxrl_llm.training.wandb_sink import WandbSink


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


LOGGED = {0: {"loss": 1.5, "reward/mean": 0.25}, 1: {"loss": 0.75, "reward/mean": 0.5, "kl": 0.01},
          3: {"loss": 0.5, "reward/mean": 1.0, "eval/accuracy": 0.875}}
TABLE = [["1+1=", "2", 1.0], ["2+2=", "5", 0.0]]
# Run in a process of its own, as the trainer would: wandb starts a `wandb-core` service that
# lives as long as the process that imported it, which should not be a test worker.
SINK_SCRIPT = """
import json, sys
from pathlib import Path
from jaxrl_llm.training.wandb_sink import WandbSink
run_dir, logged, table = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
sink = WandbSink(run_dir=run_dir, project="jaxrl-llm-test", name="toy", mode="offline", config={"algo": {"name": "rloo"}})
for step, scalars in logged.items():
    sink.log_scalars(int(step), scalars)
sink.log_text(3, "eval/samples", ["prompt", "completion", "reward"], table)
sink.close()
sink.close()  # idempotent
second = WandbSink(run_dir=run_dir / "again", project="jaxrl-llm-test", name=None, mode="offline", config={})
second.log_scalars(0, {"loss": 2.0})
second.close()
"""


def test_offline_run_records_the_logged_scalars_and_table(tmp_path):
    pytest.importorskip("wandb")
    done = subprocess.run([sys.executable, "-c", SINK_SCRIPT, str(tmp_path), json.dumps(LOGGED), json.dumps(TABLE)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "WANDB_MODE": "offline",
                                                                           "WANDB_SILENT": "true"})
    assert done.returncode == 0, done.stderr[-3000:]

    run, log = offline_run(tmp_path)
    rows_by_step = history(log)
    assert sorted(rows_by_step) == [0, 1, 3]
    for step, scalars in LOGGED.items():
        extra = {"eval/samples"} if step == 3 else set()
        assert set(rows_by_step[step]) == set(scalars) | extra
        assert {k: rows_by_step[step][k] for k in scalars} == scalars
    assert rows_by_step[3]["eval/samples"]["_type"] == "table-file"
    assert rows_by_step[3]["eval/samples"]["nrows"] == 2
    [table] = run.glob("files/media/table/eval/samples_3_*.table.json")
    assert json.loads(table.read_text()) == {"columns": ["prompt", "completion", "reward"], "data": TABLE}

    [run_record] = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"]
    assert run_record.project == "jaxrl-llm-test" and run_record.display_name == "toy"
    config = {u.key: json.loads(u.value_json) for u in run_record.config.update}
    assert config["algo"] == {"name": "rloo"}

    # a second run in the same process is a run of its own
    _, second_log = offline_run(tmp_path / "again")
    assert second_log.name != log.name
    assert history(second_log) == {0: {"loss": 2.0}}


def test_bad_mode_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"train\.wandb\.mode.*'cloud'.*'online', 'offline', 'disabled'"):
        WandbSink(run_dir=tmp_path, project="p", name=None, mode="cloud", config={})
    assert not (tmp_path / "wandb").exists()


def test_missing_wandb_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError
    with pytest.raises(UserError) as error:
        WandbSink(run_dir=tmp_path, project="p", name=None, mode="offline", config={})
    assert str(error.value) == (
        "`train.wandb`: the wandb package is not installed; "
        "pip install 'jaxrl_llm[wandb]' (or remove train.wandb)"
    )
