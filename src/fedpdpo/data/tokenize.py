"""Tokenize preference pairs and collate them into padded batches.

A pair becomes ``prompt_ids`` plus ``chosen_ids`` / ``rejected_ids``. The prompt is built by
:class:`~fedpdpo.data.prompts.PromptEncoder` (chat template kept whole; a long prompt loses tokens from the start of
its content only) within ``max_prompt_length`` tokens; responses are cut from their end so that prompt + response
fits ``max_length``. The end-of-turn token closes every response that was not cut.

A batch stacks the B chosen sequences and then the B rejected ones (shape ``[2B, L]``), so one forward pass scores
both sides; ``response_mask`` marks the tokens whose log-probability counts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from fedpdpo.data.formats import Text
from fedpdpo.data.prompts import PromptEncoder, PromptIds
from fedpdpo.data.records import PreferenceRecord


@dataclass(frozen=True)
class TokenizedPair:
    index: int  # position in the client's split, the key of the reference log-prob cache
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]
    # what the length limits cut (for the truncation shares logged at the start of a run)
    prompt_truncated: bool = field(default=False, compare=False)
    response_truncated: bool = field(default=False, compare=False)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class PairBatch:
    index: torch.Tensor  # [B], always on the CPU: it indexes the CPU reference tables (no device round trip)
    input_ids: torch.Tensor  # [2B, L]: chosen rows first, then rejected rows
    attention_mask: torch.Tensor  # [2B, L]
    response_mask: torch.Tensor  # [2B, L], True where the token is part of the response
    # (rows, columns) of the predicted response tokens, i.e. of ``response_mask[:, 1:]``, found on the CPU by
    # :meth:`to`: finding them on a GPU (``nonzero``) would make the host wait for the device in mid-step
    positions: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def num_pairs(self) -> int:
        return int(self.index.shape[0])

    def to(self, device: torch.device | str) -> PairBatch:
        """The sequences and response positions on ``device``; the index stays on the CPU, where the tables it
        indexes live (reading a GPU tensor back would make the host wait for the device's queue)."""
        positions = self.positions
        if positions is None and self.response_mask.device.type == "cpu":
            rows, cols = self.response_mask[:, 1:].nonzero(as_tuple=True)
            positions = (rows, cols)
        return PairBatch(
            self.index,
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.response_mask.to(device),
            None if positions is None else (positions[0].to(device), positions[1].to(device)),
        )


@dataclass(frozen=True)
class EncodedPair:
    """A pair's token ids before any length limit (what the automatic lengths are chosen from)."""

    prompt: PromptIds
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


class PairTokenizer:
    """Turns :class:`PreferenceRecord` objects into :class:`TokenizedPair` objects for one tokenizer and one pair of
    length limits (``max_length`` for prompt + response, ``max_prompt_length`` for the prompt)."""

    def __init__(self, tokenizer, max_length: int, max_prompt_length: int) -> None:
        self.tokenizer = tokenizer
        self.encoder = PromptEncoder(tokenizer)
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.end_id = self.encoder.end_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.end_id or 0)
        # the tokens that end a sampled response: end of turn (what closes training responses) and end of text
        self.stop_ids = frozenset({tokenizer.eos_token_id, self.end_id} - {None})

    def prompt_ids(self, prompt: Text) -> list[int]:
        """The prompt as training sees it (and ``fedpdpo generate`` samples from it)."""
        return list(self.encoder.encode(prompt).ids(self.max_prompt_length)[0])

    def encode(self, record: PreferenceRecord) -> EncodedPair:
        return EncodedPair(
            self.encoder.encode(record.prompt),
            self.encoder.response(record.chosen),
            self.encoder.response(record.rejected),
        )

    def cut(self, index: int, pair: EncodedPair) -> TokenizedPair:
        """``pair`` within the length limits."""
        prompt, prompt_cut = pair.prompt.ids(self.max_prompt_length)
        budget = self.max_length - len(prompt)
        return TokenizedPair(
            index,
            prompt,
            pair.chosen[:budget],
            pair.rejected[:budget],
            prompt_cut,
            max(len(pair.chosen), len(pair.rejected)) > budget,
        )

    def response_ids(self, response: str, budget: int) -> list[int]:
        return list(self.encoder.response(response)[:budget])

    def __call__(self, index: int, record: PreferenceRecord) -> TokenizedPair:
        return self.cut(index, self.encode(record))

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


def collate_responses(prompt_ids: tuple[int, ...], responses: Sequence[tuple[int, ...]], pad_id: int) -> PairBatch:
    """A batch of single responses to one prompt (for scoring them, not for DPO): :func:`collate`'s chosen half,
    one row per response (its rejected half would repeat them)."""
    full = collate([TokenizedPair(i, prompt_ids, r, r) for i, r in enumerate(responses)], pad_id)
    n = len(responses)
    return PairBatch(full.index, full.input_ids[:n], full.attention_mask[:n], full.response_mask[:n])


def length_bucketed_batches(pairs: Sequence[TokenizedPair], batch_size: int) -> list[list[TokenizedPair]]:
    """Fixed batches of similar length (for evaluation and reference caching: less padding, same results)."""
    ordered = sorted(pairs, key=lambda p: (p.length, p.index))
    return [list(ordered[i : i + batch_size]) for i in range(0, len(ordered), batch_size)]
