"""The trainer on a `dataset` task: long prompts truncated or skipped (and counted), fixed prompt
widths, exact resume across epochs, a dataset without answers."""

import json

import jax
import numpy as np
import pytest

from jaxrl_llm import UserError
from jaxrl_llm.training import Trainer
from jaxrl_llm.rollout.padding import bucket_width
from jaxrl_llm.training.prompts import fit_prompts


def prompt_width(longest, limit):
    return bucket_width(longest, limit=limit)

SHORT = [f"{a}+{b}=" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 1), (2, 3), (4, 5), (6, 7)]]  # 4 tokens
LONG = [f"{a}+{b}=" for a, b in [(123, 456), (789, 12), (3456, 7)]]  # 7-8 tokens


def write_jsonl(path, prompts, with_answers=True):
    rows = [{"prompt": p, **({"answer": str(eval(p[:-1]))} if with_answers else {})} for p in prompts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dataset_config(toy_config, tmp_path, prompts, *overrides, with_answers=True):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts, with_answers)
    answer = ", answer_field: answer" if with_answers else ""
    return toy_config(
        "task.name=dataset", f"task.options={{path: {data}, shuffle_seed: 1{answer}}}", "rollout.prompts_per_step=4",
        *overrides)


def test_prompt_widths_are_a_few_buckets():
    assert [prompt_width(n, None) for n in (1, 5, 16, 17, 100)] == [16, 16, 16, 32, 128]
    assert [prompt_width(n, 6) for n in (3, 6)] == [6, 6] and prompt_width(70, 100) == 100


def test_truncation_keeps_the_bos_token():
    rows = [[1, 5, 6, 7, 8, 9], [5, 6, 7, 8, 9], [1, 5]]
    kept, fitted, truncated, skipped = fit_prompts("abc", rows, 4, "truncate", bos_id=1)
    assert fitted == [[1, 7, 8, 9], [6, 7, 8, 9], [1, 5]] and (truncated, skipped) == (2, 0) and kept == list("abc")
    assert fit_prompts("abc", rows, 4, "skip", bos_id=1)[1:] == ([[1, 5]], 0, 2)
    assert fit_prompts("abc", rows, None, "skip")[1] == rows


def test_long_prompts_are_truncated_from_the_left_and_counted(toy_config, tmp_path, tiny_policy_dir):
    trainer = Trainer(dataset_config(toy_config, tmp_path, LONG + SHORT[:1], "rollout.prompt_length=6",
                                     "rollout.long_prompts=truncate"))
    batch, samples, *_, data = trainer.collect()
    prompts = [s.example.prompt for s in samples[::4]]  # one per group of K=4
    assert data == {"data/truncated": float(sum(len(p) > 6 for p in prompts)), "data/skipped": 0.0}
    assert data["data/truncated"] >= 3 and trainer.data_position == 4
    ids, mask = np.asarray(batch.prompt_ids), np.asarray(batch.prompt_mask)
    assert ids.shape[1] == 6
    for row, row_mask, prompt in zip(ids[::4], mask[::4], prompts):
        want = [int(i) for i in trainer.tokenizer(prompt)["input_ids"]][-6:]  # the end of the prompt is kept
        assert row[row_mask == 1].tolist() == want and row_mask.sum() == min(len(prompt), 6)


def test_long_prompts_are_skipped_and_the_position_moves_past_them(toy_config, tmp_path):
    trainer = Trainer(dataset_config(toy_config, tmp_path, LONG + SHORT, "rollout.prompt_length=6",
                                     "rollout.long_prompts=skip"))
    _, samples, *_, data = trainer.collect()
    assert all(len(s.example.prompt) <= 6 for s in samples)
    skipped = int(data["data/skipped"])
    assert data["data/truncated"] == 0 and trainer.data_position == 4 + skipped
    # The skipped prompts are the long ones among those read, in the task's order.
    read = trainer.task.train_batch(0, 4 + skipped)
    assert skipped == sum(len(e.prompt) > 6 for e in read)
    assert [s.example.prompt for s in samples[::4]] == [e.prompt for e in read if len(e.prompt) <= 6]


def test_resume_across_epochs_is_exact(toy_config, tmp_path):
    # 11 rows, 4 prompts a step with skipping: steps cross epoch boundaries mid-batch.
    prompts = LONG + SHORT
    common = ["rollout.prompt_length=6", "rollout.long_prompts=skip", "train.checkpoint_every=2"]
    straight = Trainer(dataset_config(toy_config, tmp_path, prompts, *common, "train.steps=6",
                                      f"train.run_dir={tmp_path / 'straight'}"))
    straight.run()
    Trainer(dataset_config(toy_config, tmp_path, prompts, *common, "train.steps=2",
                           f"train.run_dir={tmp_path / 'resumed'}")).run()
    resumed = Trainer(dataset_config(toy_config, tmp_path, prompts, *common, "train.steps=6",
                                     f"train.run_dir={tmp_path / 'resumed'}"), resume=True)
    assert 8 <= resumed.data_position < straight.data_position
    resumed.run()
    assert resumed.data_position == straight.data_position > 11  # more than one epoch read
    for a, b in zip(jax.tree.leaves(resumed.state.params), jax.tree.leaves(straight.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("straight", "resumed")}
    for key in ("reward/mean", "data/skipped", "data/epoch"):
        assert [r.get(key) for r in rows["resumed"]] == [r.get(key) for r in rows["straight"]], key


def test_a_dataset_without_answers_trains_on_a_python_reward(toy_config, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", SHORT[:3], with_answers=False)
    trainer = Trainer(dataset_config(toy_config, tmp_path, SHORT, f"task.options.eval_path={data}",
                                     "train.steps=1", "train.eval_every=1", with_answers=False))
    summary = trainer.run()
    assert "eval/reward" in summary and "eval/accuracy" not in summary and "train/accuracy" not in summary
    assert 0.0 <= summary["eval/reward"] <= 1.0  # toy_rewards:fraction_of_sevens
    with pytest.raises(UserError, match=r"kind 'task' needs a task with a verifier.*answer_field"):
        Trainer(dataset_config(toy_config, tmp_path, SHORT, "reward.terms=[{kind: task}]", with_answers=False))


def test_chat_template_on_a_tokenizer_without_one_is_an_error(toy_config, tmp_path):
    with pytest.raises(UserError, match=r"`task.options.chat_template`: the tokenizer .* has no chat template"):
        Trainer(dataset_config(toy_config, tmp_path, SHORT, "task.options.chat_template=true"))
