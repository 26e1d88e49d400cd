"""One client's data as training needs it, built the same way by every engine.

:func:`build_task` is the single path from a client's records to its :class:`ClientTask`: a seeded validation split
of its training pairs (what the client may use to decide how much to trust its own modules, and what settings are
chosen on; never the test pairs), the length limits (chosen from its own training pairs when the config leaves them
at 0, see :mod:`fedpdpo.data.lengths`), and tokenization. The in-process engine, the Ray simulation and a deployed
node all call it, so a record is cut, split and tokenized identically whichever engine runs the client.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from fedpdpo.config import RunConfig
from fedpdpo.data.holdout import seeded_holdout
from fedpdpo.data.lengths import Lengths, resolve_lengths, truncation_shares
from fedpdpo.data.partition import ClientData
from fedpdpo.data.records import PreferenceRecord
from fedpdpo.data.tokenize import PairTokenizer, TokenizedPair

log = logging.getLogger(__name__)

#: Seed stream of the validation split (kept apart from partitioning and training seeds).
VALIDATION_STREAM = 0x5A1


@dataclass
class ClientTask:
    """One client's tokenized data, ready for training and evaluation."""

    client_id: int
    train: list[TokenizedPair]
    test: list[TokenizedPair]
    pad_id: int
    val: list[TokenizedPair] = field(default_factory=list)
    lengths: Lengths | None = None
    info: dict[str, Any] = field(default_factory=dict)  # sizes, limits and truncation shares, for the summary
    # Tokens that end a sampled response (end of turn, end of text), and the one that closes a response in training
    # pairs (None: responses are not closed): what on-policy pairs need to look like the training pairs.
    stop_ids: frozenset[int] = frozenset()
    end_id: int | None = None

    def split(self, name: str) -> list[TokenizedPair]:
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def split_validation(
    records: list[PreferenceRecord], fraction: float, seed: int, client_id: int
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """``records`` as (train, validation): a seeded ``fraction`` of them, whole groups of pairs that share a
    (prompt, response) sequence (:mod:`fedpdpo.data.holdout`: a validation pair whose chosen response is also
    trained on would reward memorisation); none when no training pair would remain."""
    n_val = int(fraction * len(records))
    if n_val < 1 or len(records) - n_val < 1:
        return records, []
    train, val = seeded_holdout(records, n_val, [seed, client_id, VALIDATION_STREAM])
    return (train, val) if train else (records, [])


def build_task(client: ClientData, tokenizer, cfg: RunConfig) -> ClientTask:
    """The client's validation split, length limits and tokenized pairs (see the module docstring)."""
    train, val = split_validation(client.train, cfg.data.validation_fraction, cfg.seed, client.client_id)
    probe = PairTokenizer(tokenizer, cfg.max_length, cfg.data.max_prompt_length)
    records = {"train": train, "val": val, "test": client.test}
    encoded = {name: [probe.encode(r) for r in recs] for name, recs in records.items()}
    lengths = resolve_lengths(encoded["train"] + encoded["val"], cfg.max_length, cfg.data.max_prompt_length)
    tok = PairTokenizer(tokenizer, lengths.max_length, lengths.max_prompt_length)
    splits = {name: [tok.cut(i, p) for i, p in enumerate(pairs)] for name, pairs in encoded.items()}
    seen = splits["train"] + splits["val"]
    shares = truncation_shares(seen)
    info = {
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "n_test": len(splits["test"]),
        "max_length": lengths.max_length,
        "max_prompt_length": lengths.max_prompt_length,
    } | {k: round(v, 4) for k, v in shares.items()}
    log.info(
        "client %d: %d training / %d validation / %d test pairs; max_length %d, prompt budget %d; "
        "%.0f%% of prompts and %.0f%% of responses truncated",
        client.client_id,
        info["n_train"],
        info["n_val"],
        info["n_test"],
        lengths.max_length,
        lengths.max_prompt_length,
        100 * shares["prompts_truncated"],
        100 * shares["responses_truncated"],
    )
    return ClientTask(
        client.client_id,
        splits["train"],
        splits["test"],
        tok.pad_id,
        splits["val"],
        lengths,
        info,
        stop_ids=tok.stop_ids,
        end_id=tok.end_id,
    )
