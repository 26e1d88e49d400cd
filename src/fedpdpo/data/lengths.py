"""Length limits that need the tokenizer: a prompt longer than the whole ``max_length`` is a bad record.

Prompts longer than ``data.max_prompt_length`` are normal: the tokenizer keeps their last tokens (the end of a
prompt matters most). A prompt that is longer than the entire sequence budget, though, is almost always a data
mistake (a document or review put in the prompt field, fields shifted by a converter), and training on its last
few tokens would hide that. Such records are reported like any other bad record: an error naming the file and
line, or, with ``on_bad_record = "skip"``, dropped with a count and the first examples in the log.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Literal

from fedpdpo.data.partition import ClientData
from fedpdpo.data.records import PreferenceRecord
from fedpdpo.errors import DataError

log = logging.getLogger(__name__)


def prompt_lengths(tokenizer, prompts: list[str]) -> dict[str, int]:
    """Tokens of each distinct prompt text (without special tokens or chat template)."""
    unique = sorted(set(prompts))
    if not unique:
        return {}
    ids = tokenizer(unique, add_special_tokens=False)["input_ids"]
    return {p: len(i) for p, i in zip(unique, ids, strict=True)}


def check_prompt_lengths(
    clients: list[ClientData],
    tokenizer,
    max_length: int,
    on_bad_record: Literal["error", "skip"] = "error",
    max_problems: int = 5,
) -> list[ClientData]:
    """``clients`` without records whose prompt exceeds ``max_length`` tokens (or a :class:`DataError`)."""
    records = [r for c in clients for r in (*c.train, *c.test)]
    lengths = prompt_lengths(tokenizer, [r.prompt for r in records])

    def problem(r: PreferenceRecord) -> str:
        n = lengths[r.prompt]
        if n <= max_length:
            return ""
        return (
            f"{r.source}: prompt is {n} tokens, longer than max_length={max_length}; "
            "raise the config key 'max_length', shorten the prompt, or check the field mapping"
        )

    problems = [p for r in records if (p := problem(r))]
    if not problems:
        return clients
    if on_bad_record == "error":
        raise DataError(problems[0] + " (use --on-bad-record skip to drop bad records)")
    log.warning(
        "skipped %d record(s) with a prompt longer than max_length=%d; first: %s",
        len(problems),
        max_length,
        "; ".join(problems[:max_problems]),
    )
    kept = []
    for c in clients:
        train = [r for r in c.train if not problem(r)]
        test = [r for r in c.test if not problem(r)]
        if not train or not test:
            which = "training" if not train else "test"
            raise DataError(
                f"client {c.client_id} has no {which} pairs left after skipping prompts longer than "
                f"max_length={max_length}; raise 'max_length' or fix the data"
            )
        kept.append(dataclasses.replace(c, train=train, test=test))
    return kept
