"""The tool_arithmetic task: the calc tool, the final-answer verifier, and the shipped tool-aware policy."""

import json
import time

import numpy as np
import pytest
import torch
import transformers

from jaxrl_llm.assets import tiny_tool_arithmetic_path
from jaxrl_llm.models import from_pretrained
from jaxrl_llm.tasks import TASKS, Example, ToolArithmeticTask, get_task
from jaxrl_llm.tasks.tokenizer import TOOL_VOCAB
from jaxrl_llm.tasks.tool_arithmetic import calc, default_policy_path, final_answer, tool_call, tool_observation

POLICY = tiny_tool_arithmetic_path()
TRANSCRIPT = "<call>calc(1234+5678)</call><result>6912</result>6912"


# ------------------------------------------------------------------------------------ calc
@pytest.mark.parametrize("expression, value", [
    ("1234+5678", "6912"), ("12*(3-5)", "-24"), ("-(-3)", "3"), (" 7 ", "7"), ("((2+3)*4)-1", "19"), ("0", "0"),
])
def test_calc_values(expression, value):
    assert calc(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os')", "unsupported syntax"),
    ("__import__('os').system('true')", "unsupported syntax"),
    ("2**99999", "unsupported syntax"),
    ("x", "unsupported syntax"),
    ("x+1", "unsupported syntax"),
    ("calc(1)", "unsupported syntax"),
    ("1/2", "unsupported syntax"),
    ("7//2", "unsupported syntax"),
    ("1.5+1", "unsupported syntax"),
    ("True+1", "unsupported syntax"),
    ("'1'+'2'", "unsupported syntax"),
    ("[1][0]", "unsupported syntax"),
    ("1 if 1 else 2", "unsupported syntax"),
    ("", "invalid expression"),
    ("1+", "invalid expression"),
    ("(1", "invalid expression"),
    ("1\x00", "invalid expression"),
    ("9" * 41, "too large"),
    ("*".join(["99999999999"] * 5), "too large"),  # each literal is small, the product is not
    ("1+" * 100 + "1", "too long"),
])
def test_calc_rejects(expression, message):
    with pytest.raises(ValueError, match=f"^calc: .*{message}"):
        calc(expression)


def test_calc_takes_ints_and_rejects_other_non_strings():
    assert calc(1234) == "1234" and calc(-5) == "-5"  # what the tagged parser makes of calc(1234)
    for value in (True, 1.5, None, [1]):
        with pytest.raises(ValueError, match="calc: expected a string"):
            calc(value)
    with pytest.raises(ValueError, match="calc: number too large"):
        calc(10**50)


def test_calc_through_the_tagged_tool_environment():
    from jaxrl_llm.environments.tools import ToolEnvironment

    env = ToolEnvironment([calc], "tagged")
    assert env.step("<call>calc(1234+5678)</call>") == "<result>6912</result>"
    assert env.step("<call>calc(1234)</call>") == "<result>1234</result>"
    assert env.step("<call>calc(2**99999)</call>").startswith("<result>error: ValueError: calc: unsupported syntax")


# -------------------------------------------------------------------------------- verifier
def test_final_answer_is_the_text_after_the_last_result():
    assert final_answer("6912") == "6912"
    assert final_answer(TRANSCRIPT) == "6912"
    assert final_answer("<call>calc(1+1)</call><result>2</result><call>calc(2+2)</call><result>4</result>4") == "4"
    assert final_answer("<call>calc(1+1)</call>") == "<call>calc(1+1)</call>"  # no result: no answer
    assert final_answer("<call>calc(1+1)</call><result>2</result>") == ""


def test_transcript_helpers():
    assert tool_call("1234+5678") == "<call>calc(1234+5678)</call>"
    assert tool_observation("1234+5678") == "<result>6912</result>"
    assert ToolArithmeticTask.tool_completion(1234, 5678) == TRANSCRIPT


def test_score_and_accuracy():
    task = ToolArithmeticTask()
    ex = task.make_example(1234, 5678)
    assert ex == Example("1234+5678=", "6912")
    assert task.score(ex, TRANSCRIPT, finished=True) == 1.0
    assert task.score(ex, "6912", finished=True) == 1.0  # the direct path
    assert task.score(ex, TRANSCRIPT, finished=False) == 0.0  # no EOS
    assert task.score(ex, "6912", finished=False) == 0.0
    assert task.score(ex, "<call>calc(1234+5678)</call><result>6912</result>6911", finished=True) == 0.0
    assert task.score(ex, "<call>calc(1234+5678)</call><result>6912</result>", finished=True) == 0.0
    assert task.score(ex, "<call>calc(1234+5678)</call>", finished=True) == 0.0
    assert task.score(ex, "<result>6912</result>69120", finished=True) == 0.0
    partial = ToolArithmeticTask(partial_credit=True)
    assert partial.score(ex, "<call>calc(1234+5678)</call><result>6912</result>6911", finished=True) == 0.5 * 3 / 4 + 0.25
    assert partial.score(ex, TRANSCRIPT, finished=False) == 0.5  # right digits, no EOS
    texts = [TRANSCRIPT, "6912", TRANSCRIPT + "0", TRANSCRIPT]
    assert task.accuracy([ex] * 4, texts, [True, True, True, False]) == 0.5
    np.testing.assert_array_equal(task.score_batch([ex] * 4, texts, [True, True, True, False]), [1, 1, 0, 0])
    assert task.accuracy([], [], []) == 0.0


# ------------------------------------------------------------------------------------ data
def test_defaults_held_out_set_and_registry():
    started = time.perf_counter()
    task = get_task("tool_arithmetic")
    assert time.perf_counter() - started < 0.5  # ~98M pairs: the eval set is drawn, not enumerated
    assert TASKS["tool_arithmetic"] is ToolArithmeticTask and isinstance(task, ToolArithmeticTask)
    assert (task.name, task.min_operand, task.max_operand, task.num_eval) == ("tool_arithmetic", 100, 9999, 200)
    evals = task.eval_examples()
    assert len(set(evals)) == 200 and evals == ToolArithmeticTask(seed=5).eval_examples()
    train = task.train_batch(0, 500)
    assert train == get_task("tool_arithmetic", seed=0).train_batch(0, 500) != ToolArithmeticTask(seed=1).train_batch(0, 500)
    for ex in evals + train:
        a, b = map(int, ex.prompt.removesuffix("=").split("+"))
        assert 100 <= a <= 9999 and 100 <= b <= 9999 and ex.answer == str(a + b)
    assert not {e.prompt for e in train} & {e.prompt for e in evals}
    assert get_task("tool_arithmetic", min_operand=10, max_operand=99).max_operand == 99
    with pytest.raises(ValueError, match="max_operand"):
        get_task("tool_arithmetic", max_operand=50)  # below the default min_operand


# -------------------------------------------------------------------------- shipped policy
@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(POLICY))


@pytest.fixture(scope="module")
def log():
    return json.loads((POLICY / "training_log.json").read_text())


def tool_transcripts(tokenizer, examples):
    """Right-padded ``prompt + tool path + <eos>`` ids and masks [B, W]: attention, and the policy
    tokens a forced-tool greedy rollout must predict (the call after ``<call>``, the answer, EOS)."""
    rows, targets = [], []
    for ex in examples:
        a, b = map(int, ex.prompt[:-1].split("+"))
        expression = f"{a}+{b}"
        pieces = [(ex.prompt, 0), (tool_call(expression)[:6], 0), (tool_call(expression)[6:], 1),
                  (tool_observation(expression), 0), (ex.answer, 1), ("<eos>", 1)]
        ids = [tokenizer.encode(text, add_special_tokens=False) for text, _ in pieces]
        rows.append(sum(ids, []))
        targets.append(sum(([flag] * len(piece) for piece, (_, flag) in zip(ids, pieces)), []))
    width = max(map(len, rows))
    tokens, attention, target = (np.zeros((len(rows), width), np.int32) for _ in range(3))
    for i, (row, flags) in enumerate(zip(rows, targets)):
        tokens[i, : len(row)], attention[i, : len(row)], target[i, : len(row)] = row, 1, flags
    return tokens, attention, target


def test_shipped_policy_files_and_loaders(tokenizer):
    assert default_policy_path() == POLICY
    names = {p.name for p in POLICY.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md",
            "training_log.json"} <= names
    assert sum(p.stat().st_size for p in POLICY.iterdir()) < 4 * 2**20
    assert len(tokenizer) == len(TOOL_VOCAB) == 23
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(TRANSCRIPT)) == (
        ["<call>", "calc", "(", *"1234+5678", ")", "</call>", "<result>", *"6912", "</result>", *"6912"])
    config = transformers.AutoConfig.from_pretrained(str(POLICY))
    assert (config.vocab_size, config.max_position_embeddings, config.eos_token_id) == (23, 64, 2)


def test_shipped_policy_uses_the_tool_when_forced_but_rarely_chooses_it(tokenizer, log):
    """Teacher forcing on the exact tool transcript: a forced-tool greedy rollout is right iff every
    policy token is the argmax, so this reproduces the logged forced-tool accuracy in one forward."""
    policy = from_pretrained(POLICY)
    examples = ToolArithmeticTask().eval_examples()
    tokens, attention, target = tool_transcripts(tokenizer, examples)
    logits = np.asarray(policy(tokens, attention_mask=attention))
    hits = (logits[:, :-1].argmax(-1) == tokens[:, 1:]) | (target[:, 1:] == 0)
    forced = hits.all(axis=1).mean()
    assert forced >= log["target_forced_accuracy"] >= 0.9
    assert forced == pytest.approx(log["final_eval"]["forced_tool_accuracy"], abs=0.011)
    prompt_end = np.asarray([len(e.prompt) - 1 for e in examples])  # logits that choose the first token
    first = logits[np.arange(len(examples)), prompt_end]
    greedy_calls = (first.argmax(-1) == TOOL_VOCAB["<call>"]).mean()
    assert greedy_calls <= log["max_greedy_call_rate"]
    assert greedy_calls == pytest.approx(log["final_eval"]["greedy_call_rate"], abs=0.011)
    p_call = np.exp(first - first.max(-1, keepdims=True))
    p_call = (p_call[:, TOOL_VOCAB["<call>"]] / p_call.sum(-1)).mean()
    assert 0.15 < p_call < 0.45  # it has seen the tool on 30% of its training data

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(POLICY), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(tokens[:16]).long(), attention_mask=torch.from_numpy(attention[:16]).long()).logits
    valid = attention[:16].astype(bool)
    np.testing.assert_allclose(logits[:16][valid], theirs.numpy()[valid], atol=1e-4, rtol=0)
