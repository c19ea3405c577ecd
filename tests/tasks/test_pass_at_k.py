"""pass@k against its definition: the share of k-subsets of the n samples that hold a right one."""

import itertools

import numpy as np
import pytest

from jaxrl_llm.tasks.evaluate import pass_at_k


@pytest.mark.parametrize("n", [1, 2, 4, 6])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_sample(n):
    for k in range(1, n + 1):
        correct = np.arange(n + 1)  # every possible count of right samples, one prompt each
        by_definition = [np.mean([any(i < c for i in subset) for subset in itertools.combinations(range(n), k)])
                         for c in correct]
        np.testing.assert_allclose(pass_at_k(correct, n, k), by_definition, rtol=0, atol=1e-12)


def test_pass_at_1_is_the_mean_and_pass_at_n_is_any():
    correct = np.array([0, 3, 10, 1])
    np.testing.assert_allclose(pass_at_k(correct, 10, 1), correct / 10)
    np.testing.assert_array_equal(pass_at_k(correct, 10, 10), [0, 1, 1, 1])


@pytest.mark.parametrize("call,match", [
    (lambda: pass_at_k([1], 4, 5), "`k`: got 5"),
    (lambda: pass_at_k([1], 4, 0), "`k`: got 0"),
    (lambda: pass_at_k([5], 4, 2), "`num_correct`"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
