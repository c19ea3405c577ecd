"""Reward combination, penalties, clipping, normalisation and error reporting."""

import numpy as np
import pytest

from jaxrl_llm.rewards import RewardError, RewardFunction, Sample, python_term
from jaxrl_llm.tasks import Example, get_task


def samples(texts, finished=None):
    finished = finished or [True] * len(texts)
    return [Sample(Example(f"{i}+1=", str(i + 1)), t, f, ()) for i, (t, f) in enumerate(zip(texts, finished))]


def test_weighted_terms_and_missing_eos_penalty():
    length = lambda ss: [len(s.text) for s in ss]
    ones = lambda ss: [1.0] * len(ss)
    fn = RewardFunction([(0.5, length), (2.0, ones)], missing_eos_penalty=1.0)
    scores, valid = fn(samples(["ab", "abcd"], finished=[True, False]))
    np.testing.assert_allclose(scores, [0.5 * 2 + 2.0, 0.5 * 4 + 2.0 - 1.0])
    assert valid.all()


def test_clip_and_normalize():
    fn = RewardFunction([(1.0, lambda ss: [-5.0, 0.0, 5.0])], clip=1.0)
    np.testing.assert_allclose(fn(samples(["a", "b", "c"]))[0], [-1.0, 0.0, 1.0])
    fn = RewardFunction([(1.0, lambda ss: [1.0, 2.0, 3.0])], normalize=True)
    scores = fn(samples(["a", "b", "c"]))[0]
    np.testing.assert_allclose([scores.mean(), scores.std()], [0.0, 1.0], atol=1e-6)


def test_task_verifier_scores_exact_answers():
    task = get_task("arithmetic")
    from jaxrl_llm.rewards import task_term

    examples = [Example("2+3=", "5"), Example("2+3=", "5"), Example("2+3=", "5")]
    ss = [Sample(e, t, f, ()) for e, t, f in zip(examples, ["5", "5", "6"], [True, False, True])]
    np.testing.assert_array_equal(task_term(task)(ss), [1.0, 0.0, 0.0])


def raises_on_b(ss):
    if any("b" in s.text for s in ss):
        raise KeyError("b")
    return [0.0] * len(ss)


def test_a_raising_term_is_named_with_the_sample():
    fn = RewardFunction([(1.0, raises_on_b)])
    with pytest.raises(RewardError, match=r"raises_on_b raised KeyError: 'b' on sample 1 \(prompt '1\+1=', completion 'b'\)"):
        fn(samples(["a", "b"]))
    scores, valid = RewardFunction([(1.0, raises_on_b)], on_error="mask")(samples(["a", "b"]))
    assert valid.tolist() == [True, False] and scores.tolist() == [0.0, 0.0]


def test_a_nan_is_named_or_masked():
    nan_term = lambda ss: [1.0, float("nan")]
    with pytest.raises(RewardError, match=r"returned nan for sample 1"):
        RewardFunction([(1.0, nan_term)])(samples(["a", "b"]))
    scores, valid = RewardFunction([(1.0, nan_term)], on_error="mask")(samples(["a", "b"]))
    assert valid.tolist() == [True, False]


def test_wrong_length_and_bad_targets():
    with pytest.raises(RewardError, match=r"returned shape \(1,\), expected \(2,\)"):
        RewardFunction([(1.0, lambda ss: [1.0])])(samples(["a", "b"]))
    with pytest.raises(ValueError, match="expected 'package.module:function'"):
        python_term("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        python_term("not_a_module_xyz:f")


def test_dynamic_sampling_keeps_groups_whose_rewards_differ():
    from jaxrl_llm.training.trainer import informative_rows

    scores = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1, 1], np.float32)  # groups of 2: [0,0] [1,0] [1,1] [0,1] [0,0] [1,1]
    valid = np.ones(12, bool)
    np.testing.assert_array_equal(informative_rows(scores, valid, 2, 2), [2, 3, 6, 7])
    # Too few informative groups: fill with the others, in sampling order.
    np.testing.assert_array_equal(informative_rows(scores, valid, 2, 3), [0, 1, 2, 3, 6, 7])
    # An invalid sample does not make its group look informative.
    valid[1] = False
    scores[1] = 5.0
    np.testing.assert_array_equal(informative_rows(scores, valid, 2, 2), [2, 3, 6, 7])


def test_reward_model_term_scores_with_eos_on_bucketed_lengths(tmp_path):
    """The reward-model term: prompt + completion + EOS, jitted, one compilation per length bucket."""
    import torch
    import transformers

    from jaxrl_llm.rewards import reward_model_term
    from jaxrl_llm.tasks.tokenizer import VOCAB, char_tokenizer, save_char_tokenizer

    config = transformers.LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, num_labels=1, pad_token_id=0,
                                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = transformers.LlamaForSequenceClassification(config).eval()
    hf.save_pretrained(tmp_path)
    save_char_tokenizer(tmp_path)
    tokenizer = char_tokenizer()

    def hf_score(text, eos=True):
        ids = tokenizer(text)["input_ids"] + ([VOCAB["<eos>"]] if eos else [])
        with torch.no_grad():
            return float(hf(torch.tensor([ids])).logits[0, 0])

    term = reward_model_term(str(tmp_path), batch_size=4)
    batch = samples(["12", "3456", "7", "", "99"])  # 5 samples: two batches of 4 rows
    expected = [hf_score(s.example.prompt + s.text) for s in batch]
    np.testing.assert_allclose(term(batch), expected, atol=1e-4)
    without_eos = reward_model_term(str(tmp_path), batch_size=4, append_eos=False)
    np.testing.assert_allclose(without_eos(batch), [hf_score(s.example.prompt + s.text, eos=False) for s in batch],
                               atol=1e-4)
    assert not np.allclose(expected, without_eos(batch), atol=1e-3)
    term(samples(["1234567"]))  # another length inside the same 16-token bucket
    assert term.forward._cache_size() == 1
