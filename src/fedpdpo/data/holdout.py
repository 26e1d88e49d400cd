"""Seeded held-out splits that keep pairs sharing a sequence on one side.

Many preference sets hold several pairs per prompt that share a response: TruthfulQA pairs its one best answer
with each incorrect answer of the question, and ranked-response sets pair one chosen response with several rejected
ones. Split pair by pair, the same (prompt, response) sequence lands in training and in the held-out pairs; the
policy's log-probability of that sequence is then fitted in training and scored again on the held-out side, which
inflates held-out accuracy and makes validation-based choices (the round a client keeps, the score it trusts)
favour memorisation. So pairs connected by a shared (prompt, response) sequence form one group, and a split moves
whole groups. The same response under another prompt is another sequence and does not link pairs (a stock refusal
would otherwise join half a harmlessness set into one group).

Where no two pairs share a sequence every group is one pair and the split is the plain seeded permutation of the
records, so such data sets are split exactly as before this module existed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedpdpo.data.records import PreferenceRecord


def pair_groups(records: Sequence[PreferenceRecord]) -> list[int]:
    """Group id of each record: records linked by a shared (prompt, response) sequence share an id; ids are
    numbered by each group's first record, in record order."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple, int] = {}
    for i, r in enumerate(records):
        for response in (r.chosen, r.rejected):
            j = first.setdefault((r.prompt, response), i)
            a, b = root(i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    ids: dict[int, int] = {}
    return [ids.setdefault(root(i), len(ids)) for i in range(len(records))]


def seeded_holdout(
    records: Sequence[PreferenceRecord], n_held: int, seed: int | Sequence[int]
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """``(kept, held)``: whole groups (:func:`pair_groups`) in a seeded random order go to ``held`` until it has at
    least ``n_held`` records; both keep the records' order. With one record per group this is the records'
    seeded permutation cut after ``n_held``."""
    groups = pair_groups(records)
    members: list[list[int]] = [[] for _ in range(max(groups, default=-1) + 1)]
    for i, g in enumerate(groups):
        members[g].append(i)
    held_idx: set[int] = set()
    for g in np.random.default_rng(seed).permutation(len(members)).tolist():
        if len(held_idx) >= n_held:
            break
        held_idx.update(members[g])
    return (
        [r for i, r in enumerate(records) if i not in held_idx],
        [r for i, r in enumerate(records) if i in held_idx],
    )
