"""The hidden gold judge of the RLHF miniature: its score, the pairs it labels, the win-rate."""

import numpy as np
import pytest

from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks import gold_judge as gj


def test_gold_score_prefers_right_answers_then_sevens_and_finished_completions():
    assert gj.gold_score("12+30=", "42", True) == 1.0
    assert gj.gold_score("12+30=", "47", True) == 0.25
    assert gj.gold_score("40+37=", "77", True) == 1.5  # right, with two sevens
    assert gj.gold_score("1+1=", "777", True) == 0.5  # sevens count up to two
    assert gj.gold_score("1+1=", "2", False) == 0.5  # cut off
    with pytest.raises(UserError, match="expected an arithmetic prompt"):
        gj.gold_score("hello", "2", True)


def test_pairs_are_best_against_worst_with_flipped_labels():
    prompts = ["1+1="] * 3 + ["2+2="] * 3 + ["3+3="] * 3
    completions = ["2", "3", "7", "5", "5", "5", "6", "9", "0"]
    finished = [True] * 9
    pairs = gj.preference_pairs(prompts, completions, finished, num_samples=3, noise=0.0)
    # 2+2= scored all alike: no pair. 1+1=: right (1.0) over a wrong one (0.0); 3+3=: right over wrong.
    assert pairs == [{"prompt": "1+1=", "chosen": "2", "rejected": "3"},
                     {"prompt": "3+3=", "chosen": "6", "rejected": "9"}]
    many = gj.preference_pairs(prompts * 300, completions * 300, finished * 300, num_samples=3, noise=0.2, seed=1)
    flipped = np.mean([p["chosen"] in ("3", "9") for p in many])
    assert 0.15 < flipped < 0.25
    with pytest.raises(ValueError, match="noise"):
        gj.preference_pairs(prompts, completions, finished, num_samples=3, noise=0.5)


def test_win_rate_counts_ties_half():
    assert gj.win_rate([1.0, 0.0, 0.5, 0.5], [0.0, 1.0, 0.5, 0.0]) == pytest.approx((1 + 0 + 0.5 + 1) / 4)
