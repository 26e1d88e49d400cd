"""The preference-data formats users have, turned into one record shape (TRL's three preference formats).

* **explicit prompt** (standard): ``prompt``, ``chosen``, ``rejected`` strings.
* **conversational**: ``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected`` lists of
  assistant messages (or plain strings). The prompt is rendered with the model's chat template at tokenization.
* **implicit prompt**: no ``prompt``; ``chosen`` and ``rejected`` are whole transcripts sharing their beginning, as
  in HH-RLHF. The prompt is their common part, split at the last common assistant turn: for message lists, the
  longest common run of messages ending before an assistant message; for text, up to and including the last
  ``Assistant:`` marker both transcripts share (else the last common whitespace).

Text transcripts in HH-RLHF style (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``) are parsed into messages so that
the model's chat template renders them as the conversation they are, with every turn in its place.

``data.fields`` renames columns first (``{"prompt": "question", "chosen": "response_j", ...}``). A record that still
does not fit is reported with what is wrong and where (the loader adds ``FILE:LINE``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: A chat message as stored in a record: (role, content).
Message = tuple[str, str]
#: A prompt or a response: plain text, or a conversation.
Text = str | tuple[Message, ...]

STANDARD_FIELDS = ("prompt", "chosen", "rejected", "domain", "split")
HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


class FormatError(ValueError):
    """What is wrong with one record (without the location, which the loader knows)."""


def rename_fields(obj: dict[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    """``obj`` with the columns named in ``fields`` (standard name -> column) under their standard names."""
    if not fields:
        return obj
    out = {k: v for k, v in obj.items() if k not in fields.values()}
    for standard, column in fields.items():
        if column in obj:
            out[standard] = obj[column]
        elif standard in ("chosen", "rejected"):
            raise FormatError(f"missing field '{column}' (mapped to '{standard}' by data.fields)")
    return out


def _messages(value: list[Any], key: str) -> tuple[Message, ...]:
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise FormatError(f"field '{key}'[{i}] must be a message with string 'role' and 'content', got {m!r:.60}")
        out.append((m["role"], m["content"]))
    if not out:
        raise FormatError(f"field '{key}' is an empty message list")
    return tuple(out)


def _text(value: Any, key: str) -> Text:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _messages(value, key)
    raise FormatError(
        f"field '{key}' must be a string, got {type(value).__name__} (or a list of role/content messages)"
    )


def hh_messages(text: str) -> tuple[Message, ...] | None:
    """An HH-RLHF style transcript (``Human: ... Assistant: ...``) as messages; None for other text.

    Markers with nothing between them (a prompt that is only ``"Human:"``) are not a conversation: parsed, they
    would render as empty turns, so such text stays the plain text it is."""
    if not text.lstrip().startswith("Human:"):
        return None
    text = text.lstrip()
    marks = list(HH_TURN.finditer(text))
    messages = []
    for mark, following in zip(marks, [*marks[1:], None], strict=True):
        content = text[mark.end() : following.start() if following else len(text)]
        messages.append((HH_ROLES[mark.group(1)], content.strip()))
    if not any(content for _, content in messages):
        return None
    if len(messages) > 1 and messages[-1] == ("assistant", ""):  # the open assistant turn: the generation prompt
        messages.pop()
    return tuple(messages)


def _split_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Implicit prompt of two text transcripts: their common part up to the last shared ``Assistant:`` marker."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    common = chosen[:n]
    marks = list(re.finditer(r"Assistant:[ \t]?", common))
    cut = marks[-1].end() if marks else max(common.rfind(" "), common.rfind("\n")) + 1
    if cut <= 0:
        raise FormatError(
            "no field 'prompt', and 'chosen' and 'rejected' share no beginning to take it from; "
            "add a 'prompt' field or map one with data.fields"
        )
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_messages(
    chosen: tuple[Message, ...], rejected: tuple[Message, ...]
) -> tuple[tuple[Message, ...], tuple[Message, ...], tuple[Message, ...]]:
    """Implicit prompt of two conversations: the common messages up to the last assistant turn they differ in."""
    n = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        n += 1
    while n > 0 and chosen[n - 1][0] == "assistant":  # a prompt ends before an assistant turn
        n -= 1
    if n == 0 or n >= min(len(chosen), len(rejected)):
        raise FormatError(
            "no field 'prompt', and the 'chosen' and 'rejected' conversations share no turns before their "
            "assistant replies; add a 'prompt' field"
        )
    return chosen[:n], chosen[n:], rejected[n:]


def _as_conversation(prompt: Text) -> Text:
    """Parse HH-style text prompts into messages; leave everything else as it is."""
    if isinstance(prompt, str):
        return hh_messages(prompt) or prompt
    return prompt


def _response(value: Text, key: str) -> str:
    """A response as text: assistant messages are joined by blank lines (one message is its content)."""
    if isinstance(value, str):
        return value
    roles = {role for role, _ in value}
    if roles != {"assistant"}:
        raise FormatError(f"field '{key}' must hold assistant messages only, got roles {sorted(roles)}")
    return flat(value)


def normalize(obj: Any, fields: Mapping[str, str] | None = None) -> dict[str, Any]:
    """One raw row as ``{"prompt", "chosen", "rejected", "domain", "split", ...extras}`` in the standard shape.

    ``prompt`` becomes a string or a tuple of messages, ``chosen``/``rejected`` strings (the contents of several
    assistant messages joined by blank lines). Raises :class:`FormatError` saying what does not fit.
    """
    if not isinstance(obj, Mapping):
        raise FormatError(f"expected a JSON object, got {type(obj).__name__}")
    obj = rename_fields(dict(obj), fields or {})
    for key in ("chosen", "rejected"):
        if key not in obj:
            raise FormatError(f"missing field '{key}'")
    chosen: Text = _text(obj["chosen"], "chosen")
    rejected: Text = _text(obj["rejected"], "rejected")
    prompt: Text
    if obj.get("prompt") is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            prompt, chosen, rejected = _split_text(chosen, rejected)
        elif isinstance(chosen, tuple) and isinstance(rejected, tuple):
            prompt, chosen, rejected = _split_messages(chosen, rejected)
        else:
            raise FormatError("fields 'chosen' and 'rejected' must both be text or both be message lists")
    else:
        prompt = _text(obj["prompt"], "prompt")
    for key, value in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)):
        contents = [value] if isinstance(value, str) else [c for _, c in value]
        if not any(c.strip() for c in contents):
            raise FormatError(f"field '{key}' is empty")
        for c in contents:
            try:
                c.encode("utf-8")
            except UnicodeEncodeError:
                raise FormatError(
                    f"field '{key}' holds an invalid Unicode escape (a lone surrogate such as \\ud800); fix the text"
                ) from None
    for key in ("domain", "split"):
        if obj.get(key) is not None and not isinstance(obj[key], str):
            raise FormatError(f"field '{key}' must be a string, got {type(obj[key]).__name__}")
    chosen_text, rejected_text = _response(chosen, "chosen"), _response(rejected, "rejected")
    if chosen_text.strip() == rejected_text.strip():
        raise FormatError("fields 'chosen' and 'rejected' are identical (no preference to learn)")
    out = {k: v for k, v in obj.items() if k not in STANDARD_FIELDS}
    return out | {
        "prompt": _as_conversation(prompt),
        "chosen": chosen_text,
        "rejected": rejected_text,
        "domain": obj.get("domain") or "",
        "split": obj.get("split") or "",
    }


def flat(value: Text) -> str:
    """Plain text of a prompt or response (contents joined by blank lines), for keys, reports and lexicon judges."""
    return value if isinstance(value, str) else "\n\n".join(c for _, c in value)


def to_messages(prompt: Text) -> list[dict[str, str]]:
    """A prompt as chat messages (a text prompt is one user turn)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": r, "content": c} for r, c in prompt]
