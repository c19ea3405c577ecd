"""The `dataset` task: every file format, epochs, held-out splits, chat templates, bad inputs."""

import json

import numpy as np
import pytest
from tokenizers import processors
from transformers import PreTrainedTokenizerFast

from jaxrl_llm import UserError
from jaxrl_llm.tasks import DatasetTask, Example, get_task
from jaxrl_llm.tasks.tokenizer import BOS, EOS, PAD, UNK, build_char_tokenizer, char_tokenizer

ROWS = [{"prompt": f"{i}+1=", "answer": i + 1, "source": f"row{i}"} for i in range(10)]


def write(tmp_path, fmt, rows=ROWS):
    """`rows` in format `fmt`; returns the path."""
    import datasets

    table = datasets.Dataset.from_list(rows)
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows))
    elif fmt == "parquet":
        path = tmp_path / "data.parquet"
        table.to_parquet(str(path))
    elif fmt == "csv":
        path = tmp_path / "data.csv"
        table.to_csv(str(path), index=False)
    elif fmt == "save_to_disk":
        path = tmp_path / "saved"
        table.save_to_disk(str(path))
    else:  # a DatasetDict directory: the split is chosen by name
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv", "save_to_disk", "save_to_disk_dict"])
def test_every_format_gives_the_same_examples(tmp_path, fmt):
    task = DatasetTask(write(tmp_path, fmt), answer_field="answer")
    examples = task.train_batch(0, 10)
    assert sorted(e.prompt for e in examples) == sorted(r["prompt"] for r in ROWS)  # one epoch: each row once
    by_prompt = {e.prompt: e for e in examples}
    first = by_prompt["0+1="]
    assert first.answer == "1" and first.raw_prompt == "0+1="  # answers are strings, whatever the file's type
    assert first.columns["source"] == "row0" and str(first.columns["answer"]) == "1"
    assert "prompt" not in first.columns


def test_epochs_reshuffle_and_replay_from_the_index(tmp_path):
    path = write(tmp_path, "jsonl")
    task = DatasetTask(path, shuffle_seed=3)
    epoch0, epoch1 = task.train_batch(0, 10), task.train_batch(10, 10)
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1  # every row once per epoch, a new order
    fresh = DatasetTask(path, shuffle_seed=3)
    assert fresh.train_example(13) == epoch1[3] and fresh.train_batch(7, 6) == epoch0[7:] + epoch1[:3]
    assert DatasetTask(path, shuffle_seed=4).train_batch(0, 10) != epoch0


def test_eval_fraction_is_a_fixed_split_and_eval_path_a_file(tmp_path):
    path = write(tmp_path, "jsonl")
    task = DatasetTask(path, eval_fraction=0.3)
    held = {e.prompt for e in task.eval_examples()}
    trained = {e.prompt for e in task.train_batch(0, 14)}
    assert len(held) == 3 and len(trained) == 7 and not held & trained
    assert {e.prompt for e in DatasetTask(path, eval_fraction=0.3, shuffle_seed=9).eval_examples()} == held
    other = write(tmp_path, "csv", ROWS[:4])
    assert [e.prompt for e in DatasetTask(path, eval_path=other).eval_examples()] == [r["prompt"] for r in ROWS[:4]]
    assert DatasetTask(path).eval_examples() == []


def test_prompt_template_fills_the_rows_fields(tmp_path):
    rows = [{"question": "1+2", "answer": 3, "topic": "sums"}]
    task = DatasetTask(write(tmp_path, "jsonl", rows), prompt_template="{topic}: {question}={{", answer_field="answer")
    example = task.train_example(0)
    assert example.prompt == example.raw_prompt == "sums: 1+2={" and example.columns["question"] == "1+2"
    with pytest.raises(UserError, match=r"names the field 'level', but row 0 of .* has the fields \['answer', "):
        DatasetTask(write(tmp_path, "jsonl", rows), prompt_template="{level}: {question}")
    with pytest.raises(UserError, match=r"is not a format string"):
        DatasetTask(write(tmp_path, "jsonl", rows), prompt_template="{question")
    with pytest.raises(UserError, match=r"`task.options.prompt_template`: give it or prompt_field, not both"):
        DatasetTask(write(tmp_path, "jsonl", rows), prompt_template="{question}", prompt_field="question")


def test_verifier_scores_against_the_answer_field(tmp_path):
    task = DatasetTask(write(tmp_path, "jsonl"), answer_field="answer", verifier="numeric")
    examples = [Example("0+1=", "1"), Example("1+1=", "2"), Example("2+1=", "3")]
    scores = task.score_batch(examples, ["so 1", "2.0", "3"], [True, True, False])
    np.testing.assert_array_equal(scores, [1.0, 1.0, 0.0])  # a cut-off completion scores 0
    assert task.verifies and not DatasetTask(write(tmp_path, "jsonl")).verifies


def template_tokenizer(adds_bos=False):
    if adds_bos:
        backend = build_char_tokenizer()
        backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                            unk_token=UNK)
    else:
        tokenizer = char_tokenizer()
    # A toy template over the char alphabet: each turn is its content then "=", the open
    # assistant turn is "+".
    tokenizer.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}={% endfor %}"
                               "{% if add_generation_prompt %}+{% endif %}")
    return tokenizer


def test_chat_template_renders_messages_and_wraps_strings(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "9"}, {"role": "user", "content": "1+2"}], "answer": "3"}]
    task = get_task("dataset", path=str(write(tmp_path, "jsonl", rows)), chat_template=True,
                    tokenizer=template_tokenizer())
    example = task.train_example(0)
    assert example.prompt == "<bos>9=1+2=+"
    assert example.raw_prompt == rows[0]["prompt"]  # reward functions get the messages
    strings = DatasetTask(write(tmp_path, "csv"), chat_template=True, tokenizer=template_tokenizer())
    assert strings.train_example(0).prompt.startswith("<bos>") and strings.train_example(0).prompt.endswith("=+")
    # A tokenizer that adds BOS itself: the template's BOS text is dropped, so the policy sees one.
    bos_adding = DatasetTask(write(tmp_path, "jsonl", rows), chat_template=True, tokenizer=template_tokenizer(True))
    assert bos_adding.train_example(0).prompt == "9=1+2=+"


def test_bad_inputs_name_the_file_field_or_option(tmp_path):
    path = write(tmp_path, "jsonl")
    cases = [
        (dict(path=str(tmp_path / "missing.jsonl")), r"`task.options.path`: no file or directory at '.*missing.jsonl'"),
        (dict(path=str(path), prompt_field="question"), r"`task.options.prompt_field`: got 'question', but .*data.jsonl"
                                                       r"' has the columns \['prompt', 'answer', 'source'\]"),
        (dict(path=str(path), answer_field="solution"), r"`task.options.answer_field`: got 'solution'"),
        (dict(path=str(write(tmp_path, "csv", [{"prompt": 5}]))), r"row 0 of .*data.csv' has the prompt 5 \(int\), "
                                                                   "expected a string or a list of chat messages"),
        (dict(path=str(path), eval_path=str(path), eval_fraction=0.1), r"`task.options.eval_fraction`: .* eval_path"),
        (dict(path=str(path), verifier="numeric"), r"`task.options.verifier`: .* set task.options.answer_field"),
        (dict(path=str(path), verifier="fuzzy", answer_field="answer"), r"`task.options.verifier`: got 'fuzzy'"),
        (dict(path=str(path), chat_template=True, tokenizer=char_tokenizer()), r"has no chat template"),
        (dict(path=str(path), shuffle_seed=-1), r"`task.options.shuffle_seed`: got -1"),
    ]
    for options, message in cases:
        with pytest.raises(UserError, match=message):
            DatasetTask(**options)
    messages = write(tmp_path, "jsonl", [{"prompt": [{"role": "user", "content": "1+2"}]}])
    with pytest.raises(UserError, match=r"row 0 of .* holds chat messages; set task.options.chat_template: true"):
        DatasetTask(messages)
    text = tmp_path / "data.txt"
    text.write_text("1+2=\n")
    with pytest.raises(UserError, match=r"extension '.txt', expected one of \['.csv', '.json', '.jsonl', '.parquet'\]"):
        DatasetTask(text)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match=r"empty.jsonl"):
        DatasetTask(empty)
    with pytest.raises(UserError, match=r"`task.options.split`: got 'validation', .* \['test', 'train'\]"):
        DatasetTask(write(tmp_path, "save_to_disk_dict"), split="validation")
    with pytest.raises(UserError, match=r"`task.options`: unknown option\(s\) \['paht'\] .* takes \[.*'path'"):
        get_task("dataset", paht=str(path))
