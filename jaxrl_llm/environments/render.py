"""Environment output to tokens: a prompt from `reset`, an observation from `step`.

Text is tokenized as it is (no special tokens added). Chat messages are rendered with the
tokenizer's chat template: a prompt with the generation prompt after it, an observation as the
text the template puts between the policy's end-of-turn token and the next generation prompt
(the difference of two renderings), so the transcript is exactly what the template would render
for the whole conversation. A template that does not know the role "tool" (Gemma 3's) gets
the result as a user message in ``<tool_response>`` tags; a template that ignores `tools` gets
them described in the first user message.
"""

from __future__ import annotations

import functools
import json

from jaxrl_llm.environments import formats
from jaxrl_llm.errors import UserError


class Renderer:
    """`prompt(reset output, example) -> text` and `observation_ids(observation) -> token ids`.

    Args:
      tokenizer: the policy's (transformers) tokenizer.
      tools: functions to describe to a chat template (the built-in tool environment's); None: none.
    """

    def __init__(self, tokenizer, tools=None):
        self.tokenizer = tokenizer
        self.tools = list(tools or [])
        self._schemas = None
        self._tool_role = None  # whether the template renders role "tool" (found on first use)

    # -- prompts ------------------------------------------------------------------------------
    def prompt(self, reset_output, example) -> str:
        """The episode's prompt text: the example's own (None), the text given, or chat messages
        rendered with the generation prompt."""
        if reset_output is None:
            return example.prompt
        if isinstance(reset_output, str):
            return reset_output
        messages = self._as_template_messages(self._messages(reset_output, "reset"))  # as observations render
        text = self._template(self._with_tool_description(messages), add_generation_prompt=True)
        # The template writes the BOS as text; when encoding adds one too, the text's own is
        # dropped so the policy sees one (as `tasks.dataset` does for chat prompts).
        bos = self.tokenizer.bos_token
        return text[len(bos):] if self._encoding_adds_bos and text.startswith(bos) else text

    @functools.cached_property
    def _encoding_adds_bos(self) -> bool:
        probe = self.tokenizer("x")["input_ids"]
        return self.tokenizer.bos_token is not None and len(probe) > 0 and probe[0] == self.tokenizer.bos_token_id

    # -- observations -------------------------------------------------------------------------
    def observation_ids(self, observation) -> list[int]:
        if isinstance(observation, str):
            return list(self.tokenizer(observation, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(self.observation_text(observation), add_special_tokens=False)["input_ids"])

    def observation_text(self, messages) -> str:
        """What the chat template writes after the policy's end-of-turn token for `messages`, up to
        and including the next generation prompt."""
        messages = self._as_template_messages(self._messages(messages, "step"))
        before = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
        rendered = self._template(before)
        end = rendered.rfind("Hello.") + len("Hello.")
        cut = end + self._end_of_turn_length(rendered[end:])  # the policy samples its end-of-turn token itself
        full = self._template(before + messages, add_generation_prompt=True)
        if not full.startswith(rendered[:cut]):
            raise UserError("`rollout.environment`: the tokenizer's chat template renders a conversation differently "
                            "once a message follows it; observations cannot be appended as text after the policy's "
                            "turn with this template (return text observations instead).")
        return full[cut:]

    def _end_of_turn_length(self, after: str) -> int:
        """The length of the token that ends an assistant message in the template's text `after`
        it: the special token right after it (Gemma 3's ``<end_of_turn>``, ChatML's ``<|im_end|>``,
        not always the tokenizer's EOS: Gemma 3's is ``<eos>``), else the EOS where the text holds
        it, else 0."""
        specials = {t.content for t in getattr(self.tokenizer, "added_tokens_decoder", {}).values() if t.special}
        found = [t for t in specials.union(self.tokenizer.all_special_tokens) if t and after.startswith(t)]
        if found:
            return len(max(found, key=len))
        eos = self.tokenizer.eos_token
        return after.find(eos) + len(eos) if eos and eos in after else 0

    # -- chat template ------------------------------------------------------------------------
    def _messages(self, value, method: str) -> list[dict]:
        if isinstance(value, dict):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
            raise UserError(f"`rollout.environment`: {method} returned {value!r}, expected text, None or a list of "
                            "chat messages ({'role': ..., 'content': ...})")
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"`rollout.environment`: {method} returned chat messages, but the tokenizer has no chat "
                            "template; return text, or use a model with one (`rollout.tool_format: tagged` for "
                            "base models).")
        return value

    def _template(self, messages, add_generation_prompt: bool = False, tools=None) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or self._tool_schemas() or None,
                                                  tokenize=False, add_generation_prompt=add_generation_prompt)

    def _tool_schemas(self):
        if self._schemas is None:
            from transformers.utils import get_json_schema

            try:
                self._schemas = [get_json_schema(tool) for tool in self.tools]
            except Exception as err:  # transformers' own message names what the docstring lacks
                raise UserError(f"`rollout.tools`: cannot describe the tools to the chat template: {err} (a chat "
                                "tool needs type hints and a Google-style docstring with Args).") from None
        return self._schemas

    def _with_tool_description(self, messages: list[dict]) -> list[dict]:
        """`messages`, with the tools described in the first user message when the template ignores them."""
        if not self.tools:
            return messages
        probe = [{"role": "user", "content": "Hi."}]
        if self.tokenizer.apply_chat_template(probe, tokenize=False) != self._template(probe):
            return messages  # the template describes the tools itself
        description = ("You can call these tools. To call one, write "
                       f'{formats.TOOL_CALL_OPEN}{{"name": <tool name>, "arguments": {{...}}}}{formats.TOOL_CALL_CLOSE}'
                       " and end your turn; the result comes back in the next message.\n"
                       + "\n".join(json.dumps(s["function"]) for s in self._tool_schemas()) + "\n\n")
        first = next(i for i, m in enumerate(messages + [{"role": "user"}]) if m["role"] == "user")
        if first == len(messages):
            return [{"role": "user", "content": description.strip()}] + messages
        return [*messages[:first], {**messages[first], "content": description + str(messages[first].get("content", ""))},
                *messages[first + 1:]]

    def _as_template_messages(self, messages: list[dict]) -> list[dict]:
        """Tool messages as the template takes them: as they are, or (a template without role
        "tool") one user message holding each result in ``<tool_response>`` tags."""
        tool = [m for m in messages if m.get("role") == "tool"]
        if not tool:
            return messages
        if self._tool_role is None:
            probe = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, tool[0]]
            try:
                self._template(probe, add_generation_prompt=True)
                self._tool_role = True
            except Exception:  # e.g. "Conversation roles must alternate user/assistant/..."
                self._tool_role = False
        if self._tool_role:
            return messages
        merged, responses = [], []
        for message in messages + [None]:
            if message is not None and message.get("role") == "tool":
                responses.append(f"<tool_response>\n{message.get('content', '')}\n</tool_response>")
                continue
            if responses:
                merged.append({"role": "user", "content": "\n".join(responses)})
                responses = []
            if message is not None:
                merged.append(message)
        return merged


__all__ = ["Renderer"]
