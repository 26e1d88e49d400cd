"""One client's data from its own file(s): a deployed node's private file, or one file of ``partition.method =
"by_file"``.

:func:`load_client_files` is the single path from a participant's file to its :class:`ClientData`, used by the
node that holds the file (``fedpdpo node --data``) and by the in-process ``by_file`` partition, so a federation of
files and its in-process reproduction give bit-identical clients. Records are loaded and validated exactly as
everywhere else (:func:`fedpdpo.data.records.load_records`: ``data.fields``, ``data.on_bad_record``, the same
``FILE:LINE: problem`` messages as ``fedpdpo data validate``). The test pairs come from the separate test file if
there is one, else from the records whose ``split`` is ``data.test_split``, else from a seeded ``data.test_fraction``.
Every random choice (test split, caps) is seeded by ``(seed, client id)`` only, never by the other clients' data,
which a node does not have.
"""

from __future__ import annotations

import logging

import numpy as np

from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData, split_train_test
from fedpdpo.data.records import LoadReport, PreferenceRecord, load_records
from fedpdpo.errors import DataError

log = logging.getLogger(__name__)

#: Seed streams of a client's own test split and caps (kept apart from the validation split and training seeds).
TEST_STREAM = 0x7E57
CAP_STREAM = 0xCA9


def load_file(path: str, cfg: RunConfig, reports: list[LoadReport]) -> list[PreferenceRecord]:
    """The valid records of ``path`` (``data.on_bad_record = "skip"`` logs what it dropped)."""
    records, report = load_records(path, cfg.data.on_bad_record, fields=cfg.data.fields)
    reports.append(report)
    if report.n_skipped:
        log.warning(
            "%s: skipped %d bad record(s) of %d; first: %s",
            path,
            report.n_skipped,
            report.n_read,
            "; ".join(report.problems),
        )
    return records


def _cap(records: list[PreferenceRecord], limit: int, rng: np.random.Generator) -> list[PreferenceRecord]:
    """At most ``limit`` of ``records`` (a seeded choice, kept in file order); all of them when ``limit`` is 0."""
    if not limit or len(records) <= limit:
        return records
    keep = sorted(rng.permutation(len(records))[:limit].tolist())
    return [records[i] for i in keep]


def load_client_files(client_id: int, path: str, test_path: str, cfg: RunConfig) -> tuple[ClientData, list[LoadReport]]:
    """Client ``client_id``'s data: every valid pair of ``path`` (and ``test_path``), nobody else's (module doc).

    ``partition.conflict_fraction`` does not apply: a participant's file already holds its own preferences.
    """
    reports: list[LoadReport] = []
    records = load_file(path, cfg, reports)
    if test_path:
        train, test = records, load_file(test_path, cfg, reports)
    else:
        seed = [cfg.seed, client_id, TEST_STREAM]
        train, test = split_train_test(records, cfg.data.test_fraction, seed, cfg.data.test_split)
    rng = np.random.default_rng([cfg.seed, client_id, CAP_STREAM])
    train = _cap(train, cfg.data.max_train_per_client, rng)
    test = _cap(test, cfg.data.max_test_per_client, rng)
    if not train or not test:
        which, source = ("training", path) if not train else ("test", test_path or path)
        raise DataError(f"{source}: client {client_id} gets no {which} pairs from it; add pairs to the file")
    return ClientData(client_id, train, test, False, sorted({r.domain for r in train})), reports
