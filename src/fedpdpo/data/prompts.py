"""Prompt construction shared by training, evaluation, scoring and generation.

A prompt is rendered with the tokenizer's chat template (with the generation prompt, so the response is the
assistant turn) and cut into three token spans::

    head     the template before the conversation's content: system turn, user-turn start
    content  the conversation itself (for several turns, everything from the first user content to the last)
    tail     the template after it: end of the last turn, assistant start

When a prompt is longer than its budget, only ``content`` loses tokens, from its start (the end of a prompt
matters most, and the template must stay intact: a cut system turn or a missing assistant start is a different
input from the one the model sees at generation). Without a chat template, ``head`` holds the tokenizer's own
special tokens (e.g. BOS) and ``tail`` is empty.

Where the spans begin and end is found by rendering the template with marker strings around the content and
tokenizing each span on its own, so the same prompt gives the same ids in training, ``fedpdpo generate`` and
``fedpdpo score``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from fedpdpo.data.formats import Text, to_messages
from fedpdpo.errors import ConfigError

START, END = "\u27e6fedpdpo:start\u27e7", "\u27e6fedpdpo:end\u27e7"


@dataclass(frozen=True)
class PromptIds:
    head: tuple[int, ...]
    content: tuple[int, ...]
    tail: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.head) + len(self.content) + len(self.tail)

    def ids(self, budget: int | None = None) -> tuple[tuple[int, ...], bool]:
        """The prompt's ids within ``budget`` tokens (content cut from its start) and whether anything was cut."""
        keep = len(self.content)
        if budget is not None:
            keep = min(keep, budget - len(self.head) - len(self.tail))
            if keep < 1:
                raise ConfigError(
                    f"the prompt budget of {budget} tokens (data.max_prompt_length) does not fit the chat "
                    f"template's {len(self.head) + len(self.tail)} tokens plus one token of content; raise it"
                )
        content = self.content[len(self.content) - keep :]
        return self.head + content + self.tail, keep < len(self.content)


class PromptEncoder:
    """Renders prompts (text or conversations) and responses into token ids for one tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))

    def _tokens(self, text: str) -> tuple[int, ...]:
        return tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else ()

    def _render(self, messages: list[dict[str, str]], generation: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)

    def encode(self, prompt: Text) -> PromptIds:
        """The head, content and tail token spans of ``prompt``."""
        messages = to_messages(prompt)
        if not self.use_chat_template:
            text = prompt if isinstance(prompt, str) else self._plain(messages)
            return PromptIds(self._special_head, self._tokens(text), ())
        first = next((i for i, m in enumerate(messages) if m["role"] != "system"), 0)
        marked = [dict(m) for m in messages]
        marked[first]["content"] = START + marked[first]["content"]
        marked[-1]["content"] = marked[-1]["content"] + END
        text = self._render(marked)
        if text.count(START) != 1 or text.count(END) != 1:
            raise ConfigError("the tokenizer's chat template does not keep message contents as they are")
        head, rest = text.split(START)
        content, tail = rest.split(END)
        return PromptIds(self._tokens(head), self._tokens(content), self._tokens(tail))

    @staticmethod
    def _plain(messages: list[dict[str, str]]) -> str:
        """A conversation as plain text for tokenizers without a chat template (HH-RLHF's layout)."""
        names = {"user": "Human", "assistant": "Assistant"}
        turns = [f"{names.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
        return "\n\n".join([*turns, "Assistant:"])

    @cached_property
    def _special_head(self) -> tuple[int, ...]:
        """The special tokens the tokenizer puts before any text (BOS), when it has no chat template."""
        return tuple(self.tokenizer("", add_special_tokens=True)["input_ids"])

    @cached_property
    def end_id(self) -> int | None:
        """The token that closes an assistant turn: the template's end-of-turn token (``<|im_end|>``,
        ``<end_of_turn>``), else the tokenizer's EOS."""
        if self.use_chat_template:
            messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": END}]
            after = self._render(messages, generation=False).split(END, 1)[1]
            ids = self._tokens(after)
            if ids and ids[0] in set(self.tokenizer.all_special_ids):
                return ids[0]
        return self.tokenizer.eos_token_id

    def response(self, text: str) -> tuple[int, ...]:
        """A response's ids, closed by the end-of-turn token."""
        ids = self._tokens(text)
        return ids if self.end_id is None else (*ids, self.end_id)
