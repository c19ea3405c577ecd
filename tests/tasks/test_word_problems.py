"""The shipped word problems: reproducible from the script, well formed, verifiable, disjoint splits."""

import ast
import importlib.util
import json
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
ASSETS = ROOT / "jaxrl_llm" / "assets" / "word_problems"


def _load_script():
    path = ROOT / "scripts" / "make_word_problems.py"
    spec = importlib.util.spec_from_file_location("make_word_problems", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mwp = _load_script()


@pytest.fixture(scope="module")
def shipped():
    return {split: (ASSETS / f"{split}.jsonl").read_bytes() for split in ("train", "eval")}


@pytest.fixture(scope="module")
def records(shipped):
    return {split: [json.loads(line) for line in data.decode("utf-8").splitlines()]
            for split, data in shipped.items()}


def _evaluate(expression: str) -> Fraction:
    """Evaluates ints, + - * / and parentheses only; every intermediate must be a non-negative integer."""
    ops = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}

    def walk(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in ops:
            value = ops[type(node.op)](walk(node.left), walk(node.right))
            assert value >= 0 and value.denominator == 1, expression
            return value
        raise ValueError(f"unexpected syntax in {expression!r}")

    return walk(ast.parse(expression, mode="eval").body)


def test_shipped_files_are_the_scripts_output(shipped):
    train, evals = mwp.generate(3000, 200, 0)
    assert shipped["train"] == mwp.to_jsonl(train).encode("utf-8")
    assert shipped["eval"] == mwp.to_jsonl(evals).encode("utf-8")


def test_generation_is_deterministic():
    assert mwp.generate(300, 50, 3) == mwp.generate(300, 50, 3)
    assert mwp.generate(300, 50, 3) != mwp.generate(300, 50, 4)
    assert mwp.generate(10, 50, 3)[1] == mwp.generate(300, 50, 3)[1]  # eval does not move with train


def test_records_are_well_formed_and_verifiable(records):
    for record in records["train"] + records["eval"]:
        assert list(record) == ["question", "answer", "solution"]
        answer = record["answer"]
        assert answer.isdigit() and answer == str(int(answer)) and int(answer) < 1000
        expression, rest = record["solution"].split(" = ")
        assert rest == f"{answer}. #### {answer}"
        assert record["solution"].rsplit("#### ", 1)[1] == answer
        assert _evaluate(expression) == int(answer)


def test_splits_are_disjoint_and_unique(records):
    train = [r["question"] for r in records["train"]]
    evals = [r["question"] for r in records["eval"]]
    assert (len(train), len(evals)) == (3000, 200)
    assert len(set(train)) == len(train) and len(set(evals)) == len(evals)
    assert not set(train) & set(evals)


def recipe_template() -> str:
    config = yaml.safe_load((ROOT / "configs" / "rloo_gemma3_270m_math.yaml").read_text())
    return config["task"]["options"]["prompt_template"]


def test_the_recipes_prompts_are_two_worked_examples_then_the_question(records):
    template = recipe_template()
    prefix, last = template.rsplit("Question: ", 1)
    assert last == "{question}\nAnswer:" and prefix.count("Question: ") == 2 and prefix.endswith("\n\n")
    for record in records["train"] + records["eval"]:
        assert template.format(**record) == f"{prefix}Question: {record['question']}\nAnswer:"
        assert record["question"] not in prefix


def test_templates_and_few_shot_examples_check():
    # The few-shot examples follow the completion format: "Answer: <expr> = <n>. The answer is <n>."
    answers = [line for line in recipe_template().splitlines() if line.startswith("Answer: ")]
    assert len(answers) == 2
    for line in answers:
        expression, rest = line.removeprefix("Answer: ").split(" = ")
        value = rest.split(".")[0]
        assert rest == f"{value}. The answer is {value}." and _evaluate(expression) == int(value)
    assert len(mwp.TEMPLATES) >= 12
    rng = mwp.random.Random(0)
    for template in mwp.TEMPLATES:
        for _ in range(200):  # each template alone keeps its promises on many draws
            question, expression, answer = template(rng, mwp._person(rng))
            assert 0 <= answer < 1000 and _evaluate(expression) == answer, question
