"""Reward functions from a config: the built-in verifiers, TRL-style Python functions (module or
file targets, relative to the config file), and their errors."""

import math

import numpy as np
import pytest
import yaml

from jaxrl_llm import UserError
from jaxrl_llm.rewards import RewardError, RewardFunction, Sample, build_reward, python_term, trl_arguments
from jaxrl_llm.tasks.verifiers import exact_match, numeric, parse_number, regex
from jaxrl_llm.tasks import Example
from jaxrl_llm.training import load_config


@pytest.mark.parametrize("text,number", [
    ("The answer is 42.", 42.0), ("12 - 5 + 8 = 15. The answer is 15.", 15.0), ("costs $1,234.50 total", 1234.5),
    ("-3 degrees", -3.0), ("#### 7 and then 9", 7.0), ("3 apples #### 12", 12.0), ("no digits", None), (".5", 0.5),
])
def test_parse_number(text, number):
    assert parse_number(text) == number


def test_verifiers_need_a_finished_completion():
    assert numeric(" 3 + 4 = 7. The answer is 7.", "7") == 1.0
    assert numeric("The answer is 7", "#### 7.0") == 1.0
    assert numeric("The answer is 7", "7", finished=False) == 0.0  # cut off: "7" may have been "75"
    assert numeric("The answer is 8", "7") == 0.0 and numeric("none", "7") == 0.0
    assert exact_match(" 81\n", "81") == 1.0 and exact_match("81", "81", finished=False) == 0.0
    assert exact_match("810", "81") == 0.0
    assert regex(r"The answer is \d+\.$")("so. The answer is 5.") == 1.0
    assert regex(r"^\d+$")("5 apples") == 0.0


def samples_of(examples, texts, finished=None, ids=None):
    finished = finished or [True] * len(texts)
    ids = ids or [(4, 5, 2)] * len(texts)
    return [Sample(e, t, f, i) for e, t, f, i in zip(examples, texts, finished, ids)]


def test_trl_arguments_hold_every_column_and_chat_completions():
    chat = [{"role": "user", "content": "1+2"}]
    examples = [Example("1+2=", "3", "1+2=", {"answer": 3, "level": "easy"}),
                Example("<t>1+2</t>", "3", chat, {"answer": 3, "level": "hard"})]
    arguments = trl_arguments(samples_of(examples, ["3", "4"], [True, False], [(7, 2), (8,)]))
    assert arguments["prompts"] == ["1+2=", chat]  # as the dataset holds them
    assert arguments["completions"] == ["3", [{"role": "assistant", "content": "4"}]]  # TRL's chat convention
    assert arguments["completion_ids"] == [[7, 2], [8]] and arguments["finished"] == [True, False]
    assert arguments["answer"] == [3, 3] and arguments["level"] == ["easy", "hard"]
    # The built-in tasks have no columns: their answer is passed as `answer`.
    assert trl_arguments(samples_of([Example("1+2=", "3")], ["3"]))["answer"] == ["3"]


def test_a_trl_reward_file_gets_answer_and_completion_ids(tmp_path):
    (tmp_path / "helpers.py").write_text("BONUS = 0.5\n")
    (tmp_path / "rewards.py").write_text(
        "from helpers import BONUS  # a module beside the reward file\n"
        "def correct(prompts, completions, completion_ids, answer, **kwargs):\n"
        "    assert set(kwargs) >= {'finished', 'level'}, kwargs\n"
        "    return [float(c == a) + BONUS * len(ids) for c, a, ids in zip(completions, answer, completion_ids)]\n"
        "def two_arguments(prompts, completions):\n"
        "    return [len(c) for c in completions]\n"
        "def needs_solution(completions, solution):\n"
        "    return [0.0 for c in completions]\n")
    examples = [Example("1+2=", "3", None, {"answer": "3", "level": 1})] * 2
    samples = samples_of(examples, ["3", "5"], ids=[(7, 2), (9,)])
    scores, valid = RewardFunction([(1.0, python_term(f"{tmp_path}/rewards.py:correct"))])(samples)
    np.testing.assert_allclose(scores, [2.0, 0.5])
    assert valid.all()
    assert python_term(f"{tmp_path}/rewards.py:two_arguments")(samples) == [1, 1]  # the old convention still works
    with pytest.raises(RewardError, match=r"rewards.py:needs_solution needs the argument\(s\) \['solution'\].*'answer'"):
        RewardFunction([(1.0, python_term(f"{tmp_path}/rewards.py:needs_solution"))])(samples)
    with pytest.raises(UserError, match=r"no file at '.*nowhere.py'"):
        python_term(f"{tmp_path}/nowhere.py:correct")
    with pytest.raises(UserError, match=r"has no function 'missing'"):
        python_term(f"{tmp_path}/rewards.py:missing")


def test_a_wrong_length_or_none_names_the_function(tmp_path):
    (tmp_path / "bad.py").write_text("def short(completions, **kw):\n    return [1.0] * (len(completions) - 1)\n"
                                     "def partial(completions, **kw):\n    return [None, 1.0]\n")
    samples = samples_of([Example("1+2=", "3")] * 2, ["3", "4"])
    with pytest.raises(RewardError, match=r"reward term .*bad.py:short returned shape \(1,\), expected \(2,\)"):
        RewardFunction([(1.0, python_term(f"{tmp_path}/bad.py:short"))])(samples)
    scores, valid = RewardFunction([(1.0, python_term(f"{tmp_path}/bad.py:partial"))], on_error="mask")(samples)
    assert valid.tolist() == [False, True] and scores.tolist() == [0.0, 1.0]  # None: not scored, as NaN


def test_builtin_verifier_terms_from_the_config(tmp_path):
    config = load_config(None, ["reward.terms=[{kind: numeric}, {kind: regex, pattern: 'answer is', weight: 0.5}]"])
    reward = build_reward(config.reward, task=None)
    samples = samples_of([Example("q", "12")] * 3, ["the answer is 12", "12", "the answer is 13"])
    np.testing.assert_allclose(reward(samples)[0], [1.5, 1.0, 0.5])
    no_answers = samples_of([Example("q", None)], ["12"])
    with pytest.raises(RewardError, match=r"'numeric' compares completions with reference answers.*answer_field"):
        reward(no_answers)
    for terms, message in [("[{kind: regex}]", r"`reward.terms\[0\].pattern`: got None"),
                           ("[{kind: regex, pattern: '(unclosed'}]", r"`reward.terms\[0\].pattern`: '\(unclosed' is not"),
                           ("[{kind: numeric, pattern: x}]", r"only kind 'regex' takes a pattern")]:
        with pytest.raises(UserError, match=message):
            load_config(None, [f"reward.terms={terms}"])


def test_paths_in_a_config_file_are_relative_to_it(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.parent.mkdir()
    recipe.write_text(yaml.safe_dump({
        "task": {"name": "dataset", "options": {"path": "data/train.jsonl", "eval_path": "/abs/eval.jsonl"}},
        "reward": {"terms": [{"kind": "python", "target": "rewards.py:score"},
                             {"kind": "python", "target": "package.module:score"}]}}))
    monkeypatch.chdir(tmp_path)
    config = load_config(recipe, ["train.steps=1"])
    assert config.task.options["path"] == str(tmp_path / "recipes" / "data" / "train.jsonl")
    assert config.task.options["eval_path"] == "/abs/eval.jsonl"
    assert [t.target for t in config.reward.terms] == [f"{tmp_path}/recipes/rewards.py:score", "package.module:score"]
    overridden = load_config(recipe, ["task.options.path=here.jsonl"])  # an override is the user's own path
    assert overridden.task.options["path"] == "here.jsonl"
    assert math.isclose(config.reward.terms[0].weight, 1.0)
