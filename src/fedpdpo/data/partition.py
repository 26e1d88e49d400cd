"""Split preference pairs into per-client train/test sets.

Partitioners (all deterministic from the seed):

* ``iid``: shuffle, deal out evenly.
* ``dirichlet``: for every value of ``label`` (default ``domain``) draw client proportions from Dir(alpha); small
  alpha gives each client a few dominant labels (label skew).
* ``by_domain``: the cross-domain setting, one domain group per client (explicit groups, ``fnmatch`` patterns
  allowed, or one sorted domain per client round-robin).
* ``by_file`` (``data/files.py``, not here): one client per data file, as in a deployment of participants' files.

Preference conflict: ``conflict_fraction`` of the clients see every pair with chosen and rejected swapped, for
training and testing, so their held-out accuracy measures *their own* taste.

The test pool (a separate file, the records' ``split == "test"``, or a random ``test_fraction``) is partitioned
with the same rule as the train pool, so a client's test set follows its own distribution.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from fedpdpo.config import PartitionConfig
from fedpdpo.data.holdout import seeded_holdout
from fedpdpo.data.records import PreferenceRecord
from fedpdpo.errors import DataError


@dataclass
class ClientData:
    client_id: int
    train: list[PreferenceRecord]
    test: list[PreferenceRecord]
    conflict: bool = False
    domains: list[str] = field(default_factory=list)

    def describe(self) -> dict[str, object]:
        return {
            "id": self.client_id,
            "n_train": len(self.train),
            "n_test": len(self.test),
            "conflict": self.conflict,
            "domains": self.domains,
        }


def split_train_test(
    records: list[PreferenceRecord], test_fraction: float, seed: int | Sequence[int], test_split: str = "test"
) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Use the records' ``split`` field when it marks a test set (the value ``test_split``), else a seeded random
    split (``seed``: anything ``numpy.random.default_rng`` takes, e.g. ``[seed, client id, stream]``) that keeps
    pairs sharing a (prompt, response) sequence on one side (:mod:`fedpdpo.data.holdout`).

    Records without a ``split`` value next to ones that have it (e.g. IMDB with splits + TruthfulQA without, in
    the cross-domain setting) get the seeded random split, so every source keeps a test set.
    """
    if any(r.split == test_split for r in records):
        marked = [r for r in records if r.split]
        train, test = [r for r in marked if r.split != test_split], [r for r in marked if r.split == test_split]
        unmarked = [r for r in records if not r.split]
        if unmarked:
            extra_train, extra_test = split_train_test(unmarked, test_fraction, seed, test_split)
            train, test = train + extra_train, test + extra_test
        return train, test
    return seeded_holdout(records, max(1, round(test_fraction * len(records))), seed)


def _label(record: PreferenceRecord, label: str) -> str:
    if label == "domain":
        return record.domain
    if label == "split":
        return record.split
    return str(record.extras.get(label, ""))


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[list[int]]:
    order = rng.permutation(n)
    return [order[c::num_clients].tolist() for c in range(num_clients)]


def _dirichlet_proportions(
    labels: list[str], num_clients: int, alpha: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    return {lab: rng.dirichlet(np.full(num_clients, alpha)) for lab in sorted(set(labels))}


def _dirichlet(labels: list[str], props: dict[str, np.ndarray], rng: np.random.Generator) -> list[list[int]]:
    num_clients = len(next(iter(props.values())))
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for lab in sorted(props):
        idx = [i for i, x in enumerate(labels) if x == lab]
        if not idx:
            continue
        idx = rng.permutation(idx).tolist()
        cuts = (np.cumsum(props[lab])[:-1] * len(idx)).round().astype(int)
        for c, chunk in enumerate(np.split(np.array(idx, dtype=int), cuts)):
            parts[c].extend(chunk.tolist())
    return [sorted(p) for p in parts]


def domain_groups(all_domains: list[str], num_clients: int, groups: list[list[str]]) -> list[list[str]]:
    """Resolve the domain group of each client (patterns expanded against the data's domains)."""
    if groups:
        if len(groups) != num_clients:
            raise DataError(
                f"partition.domains has {len(groups)} groups but num_clients is {num_clients}; "
                "give one group per client"
            )
        resolved = []
        for c, group in enumerate(groups):
            names = sorted({d for pat in group for d in all_domains if fnmatch.fnmatchcase(d, pat)})
            if not names:
                raise DataError(
                    f"partition.domains[{c}] = {group} matches no domain in the data "
                    f"(domains: {', '.join(all_domains[:10])}{'...' if len(all_domains) > 10 else ''})"
                )
            resolved.append(names)
        return resolved
    if len(all_domains) < num_clients:
        raise DataError(
            f"by_domain partition needs at least num_clients={num_clients} domains, the data has "
            f"{len(all_domains)}: {all_domains}"
        )
    return [all_domains[c::num_clients] for c in range(num_clients)]


def partition(
    train_pool: list[PreferenceRecord],
    test_pool: list[PreferenceRecord],
    num_clients: int,
    cfg: PartitionConfig,
    seed: int,
    max_train: int = 0,
    max_test: int = 0,
) -> list[ClientData]:
    """Assign train and test records to ``num_clients`` clients according to ``cfg``."""
    rng = np.random.default_rng(seed)
    groups: list[list[str]] = [[] for _ in range(num_clients)]
    if cfg.method == "iid":
        train_parts = _iid(len(train_pool), num_clients, rng)
        test_parts = _iid(len(test_pool), num_clients, rng)
    elif cfg.method == "dirichlet":
        train_labels = [_label(r, cfg.label) for r in train_pool]
        test_labels = [_label(r, cfg.label) for r in test_pool]
        props = _dirichlet_proportions(train_labels + test_labels, num_clients, cfg.alpha, rng)
        train_parts = _dirichlet(train_labels, props, rng)
        test_parts = _dirichlet(test_labels, props, rng)
    elif cfg.method == "by_domain":
        all_domains = sorted({r.domain for r in train_pool})
        groups = domain_groups(all_domains, num_clients, cfg.domains)
        train_parts = [[i for i, r in enumerate(train_pool) if r.domain in g] for g in groups]
        test_parts = [[i for i, r in enumerate(test_pool) if r.domain in g] for g in groups]
    else:  # pragma: no cover - config validation rejects other values
        raise DataError(f"unknown partition method {cfg.method!r}")

    n_conflict = round(cfg.conflict_fraction * num_clients)
    conflict_ids = set(rng.permutation(num_clients)[:n_conflict].tolist())

    clients = []
    for c in range(num_clients):
        tr_idx, te_idx = list(train_parts[c]), list(test_parts[c])
        if max_train:
            tr_idx = sorted(rng.permutation(tr_idx)[:max_train].tolist()) if tr_idx else []
        if max_test:
            te_idx = sorted(rng.permutation(te_idx)[:max_test].tolist()) if te_idx else []
        train = [train_pool[i] for i in tr_idx]
        test = [test_pool[i] for i in te_idx]
        if not train or not test:
            which = "training" if not train else "test"
            raise DataError(
                f"client {c} got no {which} pairs after '{cfg.method}' partitioning of {len(train_pool)} train / "
                f"{len(test_pool)} test pairs over {num_clients} clients; use fewer clients, more data, or a "
                "larger partition.alpha"
            )
        conflict = c in conflict_ids
        if conflict:
            train = [r.swapped() for r in train]
            test = [r.swapped() for r in test]
        domains = groups[c] or sorted({r.domain for r in train})
        clients.append(ClientData(c, train, test, conflict, domains))
    return clients
