"""Preference data: load and validate records, partition them over clients, tokenize and collate."""

from __future__ import annotations

import logging

from fedpdpo.config import RunConfig
from fedpdpo.data.partition import ClientData, partition, split_train_test
from fedpdpo.data.records import LoadReport, PreferenceRecord, check_file, load_records
from fedpdpo.data.tokenize import PairBatch, PairTokenizer, TokenizedPair, collate

log = logging.getLogger(__name__)

__all__ = [
    "ClientData",
    "LoadReport",
    "PairBatch",
    "PairTokenizer",
    "PreferenceRecord",
    "TokenizedPair",
    "build_clients",
    "check_file",
    "collate",
    "load_records",
]


def _load(path: str, cfg: RunConfig, reports: list[LoadReport]) -> list[PreferenceRecord]:
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


def build_clients(cfg: RunConfig) -> tuple[list[ClientData], list[LoadReport]]:
    """Load the configured data files and partition them into ``cfg.num_clients`` clients."""
    reports: list[LoadReport] = []
    records = []
    for path in [cfg.data.path, *cfg.data.extra_paths]:
        records.extend(_load(path, cfg, reports))
    if cfg.data.test_path:
        train_pool, test_pool = records, _load(cfg.data.test_path, cfg, reports)
    else:
        train_pool, test_pool = split_train_test(records, cfg.data.test_fraction, cfg.seed, cfg.data.test_split)
    clients = partition(
        train_pool,
        test_pool,
        cfg.num_clients,
        cfg.partition,
        cfg.seed,
        cfg.data.max_train_per_client,
        cfg.data.max_test_per_client,
    )
    return clients, reports
