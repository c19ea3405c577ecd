"""The arithmetic task: deterministic streams, a fixed disjoint held-out set, the verifier by hand."""

import numpy as np
import pytest

from jaxrl_llm.tasks import ArithmeticTask, Example, accuracy, get_task
from jaxrl_llm.tasks.arithmetic import held_out_mask


def test_train_stream_is_a_pure_function_of_seed_and_index():
    a, b = ArithmeticTask(seed=3), ArithmeticTask(seed=3)
    assert [a.train_example(i) for i in range(50)] == [b.train_example(i) for i in reversed(range(50))][::-1]
    assert a.train_batch(1000, 20) == [a.train_example(1000 + i) for i in range(20)]
    assert a.train_batch(0, 100) != ArithmeticTask(seed=4).train_batch(0, 100)


def test_examples_are_well_formed():
    task = ArithmeticTask(min_operand=5, max_operand=12)
    for ex in task.train_batch(0, 200) + task.eval_examples()[:50]:
        lhs = ex.prompt.removesuffix("=")
        x, y = (int(v) for v in lhs.split("+"))
        assert 5 <= x <= 12 and 5 <= y <= 12
        assert ex.prompt == f"{x}+{y}=" and ex.answer == str(x + y)
    assert ArithmeticTask.make_example(23, 58) == Example("23+58=", "81")
    assert task.num_eval == len(task.eval_examples()) < 20  # default shrinks to every held-out pair


def test_eval_set_fixed_distinct_held_out_and_disjoint_from_training():
    task = ArithmeticTask()
    evals = task.eval_examples()
    assert len(evals) == 200 == len(set(evals))
    assert evals == ArithmeticTask(seed=7, partial_credit=True).eval_examples()  # seed does not move it
    assert evals[:3] == [Example("58+96=", "154"), Example("86+7=", "93"), Example("96+74=", "170")]
    train_prompts = {e.prompt for e in task.train_batch(0, 20_000)}
    assert len(train_prompts) > 8000  # covers nearly all ~9000 training pairs
    assert not train_prompts & {e.prompt for e in evals}
    grid = np.arange(100)
    assert 0.09 < held_out_mask(grid[:, None], grid[None, :]).mean() < 0.11


def test_large_operand_range_draws_eval_set_without_enumerating():
    task = ArithmeticTask(max_operand=10**6, num_eval=30)
    evals = task.eval_examples()
    assert len(set(evals)) == 30
    assert all(task.is_held_out(*map(int, e.prompt[:-1].split("+"))) for e in evals)
    assert not any(task.is_held_out(*map(int, e.prompt[:-1].split("+"))) for e in task.train_batch(0, 100))


def test_exact_reward():
    task = ArithmeticTask()
    ex = Example("23+58=", "81")
    assert task.score(ex, "81", finished=True) == 1.0
    assert task.score(ex, "81", finished=False) == 0.0  # no EOS
    assert task.score(ex, "80", finished=True) == 0.0
    assert task.score(ex, "810", finished=True) == 0.0
    assert task.score(ex, "081", finished=True) == 0.0
    assert task.score(ex, " 81", finished=True) == 0.0
    assert task.score(ex, "", finished=True) == 0.0


def test_partial_credit_by_hand():
    task = ArithmeticTask(partial_credit=True)
    ex = Example("97+8=", "105")
    cases = {
        ("105", True): 1.0,
        ("105", False): 0.5,  # all digits, no EOS
        ("104", True): 0.5 * 2 / 3 + 0.25,
        ("15", True): 0.5 * 1 / 3,
        ("1050", True): 0.5,
        ("205", True): 0.25,  # right length only
        ("205", False): 0.0,
        ("", False): 0.0,
    }
    for (text, finished), want in cases.items():
        assert task.score(ex, text, finished=finished) == pytest.approx(want), (text, finished)


def test_score_batch_and_accuracy():
    task = ArithmeticTask(partial_credit=True)
    examples = [Example("1+2=", "3"), Example("10+5=", "15"), Example("9+9=", "18")]
    texts, finished = ["3", "15", "17"], [True, False, True]
    scores = task.score_batch(examples, texts, np.array(finished))
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, [1.0, 0.5, 0.25 + 0.25])
    assert accuracy(examples, texts, finished) == pytest.approx(1 / 3)
    assert task.accuracy(examples, texts, finished) == pytest.approx(1 / 3)
    assert accuracy([], [], []) == 0.0
    with pytest.raises(ValueError, match="texts"):
        task.score_batch(examples, texts[:2], finished)
    with pytest.raises(ValueError, match="finished"):
        accuracy(examples, texts, finished[:1])


@pytest.mark.parametrize(
    "options, argument",
    [
        ({"min_operand": -1}, "min_operand"),
        ({"min_operand": 1.5}, "min_operand"),
        ({"max_operand": True}, "max_operand"),
        ({"min_operand": 10, "max_operand": 9}, "max_operand"),
        ({"seed": -1}, "seed"),
        ({"num_eval": 0}, "num_eval"),
        ({"max_operand": 9, "num_eval": 50}, "num_eval"),  # 100 pairs, ~10 held out
        ({"holdout_fraction": 0.0}, "holdout_fraction"),
        ({"holdout_fraction": 1.0}, "holdout_fraction"),
        ({"partial_credit": 1}, "partial_credit"),
    ],
)
def test_argument_validation(options, argument):
    with pytest.raises(ValueError, match=argument):
        ArithmeticTask(**options)


def test_index_validation():
    task = ArithmeticTask()
    with pytest.raises(ValueError, match="index"):
        task.train_example(-1)
    with pytest.raises(ValueError, match="n"):
        task.train_batch(0, -2)


def test_registry():
    task = get_task("arithmetic", max_operand=50, seed=2)
    assert isinstance(task, ArithmeticTask) and task.max_operand == 50
    with pytest.raises(ValueError, match="arithmetic"):
        get_task("sorting")
    with pytest.raises(ValueError, match="options"):
        get_task("arithmetic", max_operands=5)
