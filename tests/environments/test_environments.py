"""Environments and tools: the tagged and chat call formats, the built-in tool environment, loading
a user's environment class, and rendering prompts and observations (text, and chat messages
through a chat template: an observation is exactly what the template writes between the
policy's end-of-turn token and the next generation prompt)."""

import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxrl_llm.environments import (Renderer, ToolEnvironment, check_tools, environment_factory, load_environment,
                                    parse_chat, parse_tagged)
from jaxrl_llm.environments.formats import Call
from jaxrl_llm.errors import UserError
from jaxrl_llm.tasks.base import Example
from jaxrl_llm.tasks.tokenizer import TOOL_VOCAB, char_tokenizer


# ------------------------------------------------------------------------------------ tools
def add(a: int, b: int = 0) -> int:
    """Add two integers.

    Args:
      a: the first.
      b: the second.
    """
    return a + b


def echo(text: str) -> str:
    """Return the text as it is.

    Args:
      text: anything.
    """
    return text


def broken(text: str) -> str:
    """Always fails.

    Args:
      text: anything.
    """
    raise ValueError(f"cannot handle {text!r}")


PARAMETERS = {"add": 2, "echo": 1}
EXAMPLE = Example(prompt="12+30=", answer="42")


# ------------------------------------------------------------------------------------ parse_tagged
@pytest.mark.parametrize("text, call", [
    ('I will add. <call>add(1, 2)</call>', Call("add", (1, 2), {})),
    ('<call>echo("a")</call>', Call("echo", ("a",), {})),
    ("<call>add(1, b=2)</call>", Call("add", (1,), {"b": 2})),
    ("<call>add(a=2)</call>", Call("add", (), {"a": 2})),
    ("<call> echo( [1, 'x'] ) </call>", Call("echo", ([1, "x"],), {})),
    # A one-parameter tool gets text that is not a literal as the string it is.
    ("<call>echo(1234+5678)</call>", Call("echo", ("1234+5678",), {})),
    ("<call>echo(hello world)</call>", Call("echo", ("hello world",), {})),
])
def test_parse_tagged_reads_literal_and_raw_arguments(text, call):
    assert parse_tagged(text, PARAMETERS) == [call]


def test_parse_tagged_takes_the_first_call_and_none_is_empty():
    assert parse_tagged("<call>echo(1)</call><call>echo(2)</call>", PARAMETERS) == [Call("echo", (1,), {})]
    assert parse_tagged("The answer is 42.", PARAMETERS) == []
    assert parse_tagged("", PARAMETERS) == []


@pytest.mark.parametrize("text, error", [
    ("<call>mul(2, 3)</call>", "unknown tool 'mul'; tools: add, echo"),
    ("<call>calc 12</call>", "malformed call 'calc 12': expected name(arguments)"),
    ("<call>add(1, 2)", "malformed call: no </call> after <call>"),
    ("<call>add(1+1, 2)</call>", "malformed arguments '1+1, 2'"),  # two parameters: no raw text
    ("<call>echo()</call>", None),  # a literal call (no arguments) is well-formed; the tool call may fail
])
def test_parse_tagged_says_why_a_call_cannot_run(text, error):
    [call] = parse_tagged(text, PARAMETERS)
    if error is None:
        assert call == Call("echo", (), {})
    else:
        assert call.error is not None and call.error.startswith(error), call


# ------------------------------------------------------------------------------------ parse_chat
def test_parse_chat_reads_one_and_several_calls():
    one = '<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    assert parse_chat("Let me add. " + one) == [Call("add", (), {"a": 1, "b": 2})]
    two = one + '\n<tool_call>\n{"name": "echo", "arguments": {"text": "hi"}}\n</tool_call>'
    assert parse_chat(two) == [Call("add", (), {"a": 1, "b": 2}), Call("echo", (), {"text": "hi"})]
    as_string = '<tool_call>{"name": "add", "arguments": "{\\"a\\": 5}"}</tool_call>'
    assert parse_chat(as_string) == [Call("add", (), {"a": 5})]
    assert parse_chat('<tool_call>{"name": "echo"}</tool_call>') == [Call("echo", (), {})]
    assert parse_chat("No call here, <call>echo(1)</call> is the other format.") == []


@pytest.mark.parametrize("text, error", [
    ("<tool_call>{name: add}</tool_call>", "malformed call '{name: add}'"),
    ('<tool_call>{"arguments": {}}</tool_call>', "malformed call"),  # no name
    ('<tool_call>{"name": 3}</tool_call>', "malformed call"),
    ('<tool_call>{"name": "add", "arguments": [1, 2]}</tool_call>', "malformed call"),
    ('<tool_call>{"name": "add", "arguments": "not json"}</tool_call>', "malformed call"),
    ("<tool_call>[1, 2]</tool_call>", "malformed call"),
    ('<tool_call>{"name": "add", "arguments": {"a": 1}}', "malformed call: no </tool_call> after <tool_call>"),
])
def test_parse_chat_says_why_a_call_cannot_run(text, error):
    [call] = parse_chat(text)
    assert call.name is None and call.error.startswith(error), call


def test_parse_chat_keeps_a_good_call_before_an_unclosed_one():
    calls = parse_chat('<tool_call>{"name": "echo", "arguments": {"text": "a"}}</tool_call><tool_call>{"na')
    assert calls[0] == Call("echo", (), {"text": "a"}) and calls[1].error.startswith("malformed call: no")


# ------------------------------------------------------------------------------------ ToolEnvironment
def test_tagged_tool_environment_runs_calls_and_counts_them():
    env = ToolEnvironment([add, echo, broken])
    assert env.reset(EXAMPLE) is None and env.stop_strings == ["</call>"]
    assert env.step("<call>add(40, 2)</call>") == "<result>42</result>"
    assert env.step("<call>echo(1234+5678)</call>") == "<result>1234+5678</result>"
    assert env.metrics() == {"tools/calls": 2.0, "tools/errors": 0.0}
    assert env.step("<call>broken(x)</call>") == "<result>error: ValueError: cannot handle 'x'</result>"
    assert env.step("<call>add(1, 2, 3)</call>").startswith("<result>error: TypeError: ")
    malformed = "<result>error: malformed call 'add 1 2': expected name(arguments)</result>"
    assert env.step("<call>add 1 2</call>") == malformed
    assert env.step("<call>mul(2, 3)</call>") == "<result>error: unknown tool 'mul'; tools: add, broken, echo</result>"
    assert env.metrics() == {"tools/calls": 6.0, "tools/errors": 4.0}
    assert env.step("The answer is 42.") is None  # no call: the final answer
    assert env.metrics() == {"tools/calls": 6.0, "tools/errors": 4.0}
    env.reset(EXAMPLE)
    assert env.metrics() == {"tools/calls": 0.0, "tools/errors": 0.0}


def test_chat_tool_environment_answers_with_tool_messages():
    env = ToolEnvironment([add, broken], format="chat")
    assert env.stop_strings == []
    assert env.reset(EXAMPLE) == [{"role": "user", "content": "12+30="}]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Add 12 and 30."}]
    assert env.reset(Example(prompt="rendered", answer="42", raw_prompt=history)) == history
    assert env.reset(Example(prompt="Add.", answer=None, raw_prompt="Add.")) == [{"role": "user", "content": "Add."}]
    turn = ('<tool_call>{"name": "add", "arguments": {"a": 12, "b": 30}}</tool_call>'
            '<tool_call>{"name": "broken", "arguments": {"text": "y"}}</tool_call>'
            '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
            '<tool_call>{"name": "add", "arguments": {"c": 1}}</tool_call>'
            '<tool_call>oops</tool_call>')
    got = env.step(turn)
    assert got[:3] == [{"role": "tool", "name": "add", "content": "42"},
                       {"role": "tool", "name": "broken", "content": "error: ValueError: cannot handle 'y'"},
                       {"role": "tool", "name": "nope", "content": "error: unknown tool 'nope'; tools: add, broken"}]
    assert got[3]["name"] == "add" and got[3]["content"].startswith("error: TypeError: ")
    assert got[4] == {"role": "tool", "content": "error: malformed call 'oops': expected {\"name\": ..., "
                                                 "\"arguments\": {...}}"}  # no name to give
    assert env.metrics() == {"tools/calls": 5.0, "tools/errors": 4.0}
    assert env.step("It is 42.") is None


def test_check_tools_names_the_bad_tool():
    def undocumented(x):
        return x

    assert list(check_tools([add, echo])) == ["add", "echo"]
    with pytest.raises(UserError, match=r"`rollout.tools`\[1\]: the tool 'undocumented' has no docstring"):
        check_tools([add, undocumented])
    with pytest.raises(UserError, match=r"`rollout.tools`\[2\]: a second tool named 'add'"):
        check_tools([add, echo, add])
    with pytest.raises(UserError, match=r"`rollout.tools`\[0\]: got 3, expected a function"):
        check_tools([3])
    with pytest.raises(UserError, match=r"`rollout.tools`: got no tools"):
        check_tools([])
    with pytest.raises(UserError, match=r"`rollout.tool_format`: got 'json', expected one of \['tagged', 'chat'\]"):
        ToolEnvironment([add], format="json")


# ------------------------------------------------------------------------------------ loading
ENV_FILE = '''
class Guess:
    """Ends after `turns` turns; counts what it saw."""

    def __init__(self, turns=1, hint="higher"):
        self.turns, self.hint, self.seen = turns, hint, []

    def reset(self, example):
        return "Guess: "

    def step(self, text):
        self.seen.append(text)
        return None if len(self.seen) >= self.turns else self.hint


class NoStep:
    def reset(self, example):
        return None

    step = "not a method"
'''


def test_load_environment_from_a_file(tmp_path):
    (tmp_path / "env.py").write_text(ENV_FILE)
    factory = load_environment(f"{tmp_path / 'env.py'}:Guess", {"turns": 2, "hint": "lower"})
    a, b = factory(), factory()
    assert a is not b and a.reset(EXAMPLE) == "Guess: "
    assert a.step("5") == "lower" and a.step("3") is None and b.seen == []
    made, tools = environment_factory(f"{tmp_path / 'env.py'}:Guess", {"turns": 1})
    assert tools == [] and made().step("5") is None


def test_load_environment_checks_at_load_time(tmp_path):
    (tmp_path / "env.py").write_text(ENV_FILE)
    with pytest.raises(UserError, match=r"`rollout.environment`: .*'NoStep' has no method\(s\) \['step'\]"):
        load_environment(f"{tmp_path / 'env.py'}:NoStep")
    with pytest.raises(UserError, match=r"`rollout.environment_options`: .*unexpected keyword argument 'rounds'"):
        load_environment(f"{tmp_path / 'env.py'}:Guess", {"rounds": 3})
    with pytest.raises(UserError, match=r"`rollout.environment`: no file at .*missing\.py"):
        load_environment(f"{tmp_path / 'missing.py'}:Guess")
    with pytest.raises(UserError, match=r"`rollout.environment`: .*env\.py' has no class 'Gues'"):
        load_environment(f"{tmp_path / 'env.py'}:Gues")
    with pytest.raises(UserError, match=r"`rollout.environment`: got 'Guess', expected"):
        load_environment("Guess")


def test_environment_factory_with_tools_gives_fresh_environments():
    factory, tools = environment_factory(tools=["jaxrl_llm.tasks.tool_arithmetic:calc"])
    from jaxrl_llm.tasks.tool_arithmetic import calc

    assert tools == [calc]
    a, b = factory(), factory()
    assert a is not b and a.format == b.format == "tagged"
    assert a.step("<call>calc(1234+5678)</call>") == "<result>6912</result>"
    assert a.metrics()["tools/calls"] == 1.0 and b.metrics()["tools/calls"] == 0.0
    with pytest.raises(UserError, match=r"`rollout.tool_format`"):
        environment_factory(tools=["jaxrl_llm.tasks.tool_arithmetic:calc"], tool_format="xml")
    with pytest.raises(UserError, match=r"`rollout.tools`\[1\]: .*has no function 'nothing'"):
        environment_factory(tools=["jaxrl_llm.tasks.tool_arithmetic:calc", "jaxrl_llm.tasks.tool_arithmetic:nothing"])


# ------------------------------------------------------------------------------------ rendering: text
def test_renderer_text_prompts_and_observations():
    tokenizer = char_tokenizer(tools=True)
    renderer = Renderer(tokenizer)
    assert renderer.prompt(None, EXAMPLE) == "12+30="
    assert renderer.prompt("7+8=", EXAMPLE) == "7+8="
    v = TOOL_VOCAB
    assert renderer.observation_ids("<result>42</result>") == [v["<result>"], v["4"], v["2"], v["</result>"]]
    with pytest.raises(UserError, match="reset returned chat messages, but the tokenizer has no chat template"):
        renderer.prompt([{"role": "user", "content": "12+30="}], EXAMPLE)
    with pytest.raises(UserError, match="step returned chat messages, but the tokenizer has no chat template"):
        renderer.observation_ids([{"role": "tool", "content": "42"}])


# ------------------------------------------------------------------------------------ rendering: chat
WITH_TOOLS = (  # ChatML with a role "tool" and a system message listing the tools
    "{%- if tools %}<|im_start|>system\nTools: {{ tools | map(attribute='function.name') | join(', ') }}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WITHOUT_TOOLS = (  # no role "tool" (as Gemma 3's), and the tools are not described
    "{%- for m in messages %}{% if m.role not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LAST_DIFFERS = (  # renders the last message in another way: observations cannot be appended as text
    "{%- for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if loop.last %}<|im_end|>\n{% else %}<|im_sep|>\n{% endif %}{% endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def chat_tokenizer(template: str, eos: str = "<|im_end|>"):
    """A character-level fast tokenizer with the ChatML special tokens and `template`."""
    specials = ["<unk>", "<eos>", "<|im_start|>", "<|im_end|>", "<|im_sep|>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)] + ["\n"])}
    inner = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    inner.decoder = decoders.Fuse()
    inner.add_special_tokens(specials)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>", eos_token=eos,
                                                     pad_token="<unk>")
    tokenizer.chat_template = template
    return tokenizer


def render(tokenizer, messages, add_generation_prompt=False, tools=None):
    return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


CONVERSATION = [{"role": "user", "content": "What is 12+30?"},
                {"role": "assistant", "content": '<tool_call>{"name": "add"}</tool_call>'}]


def after_the_turn(tokenizer, tools=None):
    """The rendering of CONVERSATION cut right after the assistant's end-of-turn token, where
    the policy's sampled turn ends."""
    rendered = render(tokenizer, CONVERSATION, tools=tools)
    end_of_turn = CONVERSATION[-1]["content"] + "<|im_end|>"
    assert rendered.count(end_of_turn) == 1
    return rendered[:rendered.index(end_of_turn) + len(end_of_turn)]


@pytest.mark.parametrize("eos", ["<|im_end|>", "<eos>"])  # Gemma 3's EOS is not its end-of-turn token
def test_a_chat_observation_is_what_the_template_renders_after_the_turn(eos):
    tokenizer = chat_tokenizer(WITH_TOOLS, eos=eos)
    renderer = Renderer(tokenizer, tools=[add])
    schemas = [transformers.utils.get_json_schema(add)]
    tool = [{"role": "tool", "name": "add", "content": "42"}]
    text = renderer.observation_text(tool)
    assert text == "\n<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n"
    assert after_the_turn(tokenizer, schemas) + text == render(tokenizer, CONVERSATION + tool, True, schemas)
    ids = renderer.observation_ids(tool)
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text and ids[1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert renderer.observation_ids({"role": "tool", "content": "42"}) == ids  # one message, not in a list
    # The template describes the tools itself: the prompt is its rendering, with no description added.
    prompt = renderer.prompt(CONVERSATION[:1], EXAMPLE)
    assert prompt == render(tokenizer, CONVERSATION[:1], True, schemas)
    assert prompt.startswith("<|im_start|>system\nTools: add<|im_end|>\n") and "<tool_call>" not in prompt


def test_a_template_without_role_tool_gets_tool_responses_in_a_user_message():
    tokenizer = chat_tokenizer(WITHOUT_TOOLS, eos="<eos>")
    renderer = Renderer(tokenizer, tools=[add, echo])
    with pytest.raises(Exception, match="roles must alternate"):  # what the renderer works around
        render(tokenizer, CONVERSATION + [{"role": "tool", "content": "42"}])
    tools = [{"role": "tool", "name": "add", "content": "42"}, {"role": "tool", "name": "echo", "content": "hi"}]
    text = renderer.observation_text(tools)
    user = {"role": "user", "content": "<tool_response>\n42\n</tool_response>\n<tool_response>\nhi\n</tool_response>"}
    assert after_the_turn(tokenizer) + text == render(tokenizer, CONVERSATION + [user], True)
    assert text.count("<|im_start|>user") == 1  # the two results are one user message
    # Messages other than tool messages pass as they are.
    note = [{"role": "user", "content": "Go on."}]
    assert after_the_turn(tokenizer) + renderer.observation_text(note) == render(tokenizer, CONVERSATION + note, True)
    # The template ignores `tools`: they are described in the first user message.
    prompt = renderer.prompt([{"role": "system", "content": "Be brief."}, CONVERSATION[0]], EXAMPLE)
    head, question = prompt.split("<|im_start|>user\n")[1].split("\n\n")
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert question == "What is 12+30?<|im_end|>\n<|im_start|>assistant\n"
    assert head.startswith("You can call these tools. To call one, write <tool_call>{\"name\": <tool name>")
    assert '{"name": "add", "description": "Add two integers."' in head and '{"name": "echo"' in head
    # A prompt that holds tool messages renders them as observations are rendered.
    history = CONVERSATION + [{"role": "tool", "content": "42"}]
    assert Renderer(tokenizer).prompt(history, EXAMPLE) == render(
        tokenizer, CONVERSATION + [{"role": "user", "content": "<tool_response>\n42\n</tool_response>"}], True)


def test_chat_rendering_errors_name_what_to_change():
    renderer = Renderer(chat_tokenizer(WITH_TOOLS))
    with pytest.raises(UserError, match=r"`rollout.environment`: step returned 42, expected text, None or a list"):
        renderer.observation_ids(42)
    with pytest.raises(UserError, match=r"`rollout.environment`: reset returned \[\{'content': 'hi'\}\]"):
        renderer.prompt([{"content": "hi"}], EXAMPLE)
    with pytest.raises(UserError, match=r"`rollout.environment`: the tokenizer's chat template renders a "
                                        r"conversation differently once a message follows it"):
        Renderer(chat_tokenizer(LAST_DIFFERS)).observation_text([{"role": "user", "content": "Go on."}])

    def no_args(text: str) -> str:
        """A tool whose docstring does not describe its argument."""
        return text

    with pytest.raises(UserError, match=r"`rollout.tools`: cannot describe the tools to the chat template: .*'text'"):
        Renderer(chat_tokenizer(WITH_TOOLS), tools=[no_args]).prompt(CONVERSATION[:1], EXAMPLE)
