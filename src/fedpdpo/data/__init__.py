"""Preference data: load and validate records, partition them over clients, tokenize and collate."""

from __future__ import annotations

from fedpdpo.config import RunConfig
from fedpdpo.data.files import load_client_files, load_file
from fedpdpo.data.partition import ClientData, partition, split_train_test
from fedpdpo.data.records import LoadReport, PreferenceRecord, check_file, load_records
from fedpdpo.data.tokenize import PairBatch, PairTokenizer, TokenizedPair, collate
from fedpdpo.errors import ConfigError

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
    "load_client_files",
    "load_records",
]


def build_clients(cfg: RunConfig) -> tuple[list[ClientData], list[LoadReport]]:
    """Load the configured data files and partition them into ``cfg.num_clients`` clients.

    ``partition.method = "by_file"`` gives each file to one client, through the same :func:`load_client_files` as a
    deployed node holding that file.
    """
    if not cfg.data.path:
        raise ConfigError(
            "config key 'data.path' is empty: point it at a JSONL, parquet or HF dataset directory (with "
            "--engine flower-deploy, each node can hold its own file instead: docs/deployment.md)"
        )
    reports: list[LoadReport] = []
    if cfg.partition.method == "by_file":
        tests = [cfg.data.test_path, *(cfg.data.extra_test_paths or [""] * len(cfg.data.extra_paths))]
        clients = []
        for cid, (path, test_path) in enumerate(zip([cfg.data.path, *cfg.data.extra_paths], tests, strict=True)):
            client, loaded = load_client_files(cid, path, test_path, cfg)
            clients.append(client)
            reports += loaded
        return clients, reports
    records = []
    for path in [cfg.data.path, *cfg.data.extra_paths]:
        records.extend(load_file(path, cfg, reports))
    if cfg.data.test_path:
        train_pool, test_pool = records, load_file(cfg.data.test_path, cfg, reports)
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
