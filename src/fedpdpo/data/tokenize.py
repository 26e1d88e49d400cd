"""Tokenize preference pairs and collate them into padded batches.

A pair becomes ``prompt_ids`` plus ``chosen_ids`` / ``rejected_ids``. The prompt is rendered with the tokenizer's
chat template when it has one (the generation prompt is appended, so the response is the assistant turn) and
truncated from the left to ``max_prompt_length`` (the end of a prompt matters most); responses are truncated from
the right so that prompt + response fits ``max_length``. The end-of-turn token closes every untruncated response.

A batch stacks the B chosen sequences and then the B rejected ones (shape ``[2B, L]``), so one forward pass scores
both sides; ``response_mask`` marks the tokens whose log-probability counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedpdpo.data.records import PreferenceRecord


@dataclass(frozen=True)
class TokenizedPair:
    index: int  # position in the client's split, the key of the reference log-prob cache
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PairBatch:
    index: torch.Tensor  # [B]
    input_ids: torch.Tensor  # [2B, L]: chosen rows first, then rejected rows
    attention_mask: torch.Tensor  # [2B, L]
    response_mask: torch.Tensor  # [2B, L], True where the token is part of the response

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(*(t.to(device) for t in (self.index, self.input_ids, self.attention_mask, self.response_mask)))


class PairTokenizer:
    """Turns :class:`PreferenceRecord` objects into :class:`TokenizedPair` objects for one tokenizer."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.use_chat_template = bool(getattr(tokenizer, "chat_template", None))
        self.end_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.end_id or 0)

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            ids = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        return ids[-self.max_prompt_length :]

    def response_ids(self, response: str, budget: int) -> list[int]:
        ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
        if self.end_id is not None:
            ids = [*ids, self.end_id]
        return ids[:budget]

    def __call__(self, index: int, record: PreferenceRecord) -> TokenizedPair:
        prompt = self.prompt_ids(record.prompt)
        budget = self.max_length - len(prompt)
        return TokenizedPair(
            index,
            tuple(prompt),
            tuple(self.response_ids(record.chosen, budget)),
            tuple(self.response_ids(record.rejected, budget)),
        )

    def encode_all(self, records: Sequence[PreferenceRecord]) -> list[TokenizedPair]:
        return [self(i, r) for i, r in enumerate(records)]


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> PairBatch:
    """Right-pad chosen and rejected sequences of ``pairs`` to the longest one in the batch."""
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response = torch.zeros((len(seqs), width), dtype=torch.bool)
    for row, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, : len(seq)] = 1
        response[row, plen : len(seq)] = True
    index = torch.tensor([p.index for p in pairs], dtype=torch.long)
    return PairBatch(index, input_ids, attention, response)


def length_bucketed_batches(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Fixed batches of similar length (for evaluation and reference caching: less padding, same results)."""
    ordered = sorted(pairs, key=lambda p: (p.length, p.index))
    return [list(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
