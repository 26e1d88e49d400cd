"""Look at a preference data file before training: counts, token lengths, domains, duplicates, problems, partition.

Everything here reuses what training uses (the record validation of :mod:`fedpdpo.data.records`, the prompt
rendering of :class:`~fedpdpo.data.tokenize.PairTokenizer`, the partitioner behind :func:`fedpdpo.data.build_clients`),
so what the report says is what a run would see. :func:`inspect_data` returns a JSON-ready dict;
:func:`render_report` turns it into rich tables.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from rich.columns import Columns
from rich.console import Group
from rich.markup import escape
from rich.table import Table

from fedpdpo.config import RunConfig
from fedpdpo.data.records import PreferenceRecord, check_file, load_records
from fedpdpo.data.tokenize import PairTokenizer

HISTOGRAM_BINS = 10
TOP_DOMAINS = 12
MAX_PROBLEMS = 20


def token_lengths(records: list[PreferenceRecord], tokenizer) -> dict[str, list[int]]:
    """Untruncated token counts: prompt as rendered for training (chat template), responses with their end token."""
    untruncated = PairTokenizer(tokenizer, 1 << 30, 1 << 30)
    encoded = [untruncated.encode(r) for r in records]
    prompt = [len(e.prompt) for e in encoded]
    chosen = [len(e.chosen) for e in encoded]
    rejected = [len(e.rejected) for e in encoded]
    pair = [p + max(c, r) for p, c, r in zip(prompt, chosen, rejected, strict=True)]
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "pair": pair}


def length_stats(values: list[int]) -> dict[str, Any]:
    """Summary statistics and an integer-edged histogram (``edges[i] <= n < edges[i + 1]``)."""
    arr = np.asarray(values)
    lo, hi = int(arr.min()), int(arr.max())
    width = max(1, math.ceil((hi - lo + 1) / HISTOGRAM_BINS))
    edges = list(range(lo, hi + width + 1, width))
    counts = [int(((arr >= a) & (arr < b)).sum()) for a, b in itertools.pairwise(edges)]
    return {
        "min": lo,
        "median": float(np.median(arr)),
        "mean": round(float(arr.mean()), 2),
        "p95": float(np.percentile(arr, 95)),
        "max": hi,
        "histogram": {"edges": edges, "counts": counts},
    }


def duplicates(records: list[PreferenceRecord]) -> dict[str, Any]:
    """Exact duplicate pairs (each one after the first counts) and prompts shared by several pairs."""
    pairs = Counter((r.prompt, r.chosen, r.rejected) for r in records)
    prompts = Counter(r.prompt for r in records)
    repeated = {p: n for p, n in prompts.items() if n > 1}
    examples = [r.source for r in records if pairs[(r.prompt, r.chosen, r.rejected)] > 1][:5]
    return {
        "duplicate_pairs": sum(n - 1 for n in pairs.values()),
        "duplicate_pair_examples": examples,
        "unique_prompts": len(prompts),
        "prompts_with_several_pairs": len(repeated),
        "max_pairs_per_prompt": max(prompts.values()),
    }


def domain_mix(records: list[PreferenceRecord], top: int = 3) -> list[list[Any]]:
    """The ``top`` most common domains as ``[domain, share]`` (share of the records)."""
    counts = Counter(r.domain or "(none)" for r in records)
    return [[d, round(n / len(records), 4)] for d, n in counts.most_common(top)]


def partition_preview(path: str, cfg: RunConfig, tokenizer) -> list[dict[str, Any]]:
    """Per-client sizes, length limits, truncation, domain mix and conflict flag of ``cfg``'s partition applied to
    ``path``, from the same client setup as training (:func:`fedpdpo.data.task.build_task`)."""
    from fedpdpo.data import build_clients
    from fedpdpo.data.task import build_task

    cfg = copy.deepcopy(cfg)
    cfg.data.path = str(path)
    cfg.data.on_bad_record = "skip"  # problems are reported above; preview what training with skip would see
    clients, _ = build_clients(cfg)
    return [
        {"id": c.client_id}
        | build_task(c, tokenizer, cfg).info
        | {"conflict": c.conflict, "domains": len({r.domain for r in c.train}), "domain_mix": domain_mix(c.train)}
        for c in clients
    ]


def inspect_data(path: str | Path, tokenizer, cfg: RunConfig | None = None) -> dict[str, Any]:
    """Everything :mod:`fedpdpo.data.inspect` reports about ``path``; ``cfg`` adds truncation and partition."""
    path = Path(path)
    fields = cfg.data.fields if cfg is not None else None
    problems = check_file(path, fields)
    records, load_report = load_records(path, on_bad_record="skip", max_problems=0, fields=fields)
    lengths = token_lengths(records, tokenizer)
    domains = Counter(r.domain or "(none)" for r in records)
    report: dict[str, Any] = {
        "path": str(path),
        "records_read": load_report.n_read,
        "valid": len(records),
        "invalid": load_report.n_skipped,
        "problems": problems[:MAX_PROBLEMS],
        "splits": dict(Counter(r.split or "(none)" for r in records).most_common()),
        "domains": dict(domains.most_common()),
        "duplicates": duplicates(records),
        "tokens": {name: length_stats(v) for name, v in lengths.items()},
    }
    if cfg is not None:
        report["partition"] = {
            "method": cfg.partition.method,
            "num_clients": cfg.num_clients,
            "conflict_fraction": cfg.partition.conflict_fraction,
            "clients": partition_preview(str(path), cfg, tokenizer),
        }
    return report


def _histogram_table(name: str, stats: dict[str, Any]) -> Table:
    hist = stats["histogram"]
    table = Table(title=f"{name} tokens", show_edge=False, title_justify="left")
    table.add_column("range", justify="right")
    table.add_column("pairs", justify="right")
    table.add_column("", justify="left")
    peak = max(hist["counts"]) or 1
    for (lo, hi), n in zip(itertools.pairwise(hist["edges"]), hist["counts"], strict=True):
        table.add_row(f"{lo}-{hi - 1}", str(n), "█" * round(24 * n / peak))
    table.caption = f"median {stats['median']:g}, p95 {stats['p95']:g}, max {stats['max']}"
    return table


def render_report(report: dict[str, Any]) -> Group:
    """Rich tables for :func:`inspect_data`'s report."""
    parts: list[Any] = []
    overview = Table(title=escape(report["path"]), show_header=False, show_edge=False, title_justify="left")
    overview.add_column(style="bold")
    overview.add_column()
    dup = report["duplicates"]
    rows = [
        ("records", f"{report['records_read']} read, {report['valid']} valid, {report['invalid']} invalid"),
        ("splits", ", ".join(f"{k} {v}" for k, v in report["splits"].items())),
        ("domains", f"{len(report['domains'])}"),
        ("duplicate pairs", str(dup["duplicate_pairs"])),
        (
            "prompts",
            f"{dup['unique_prompts']} unique; {dup['prompts_with_several_pairs']} with several pairs "
            f"(at most {dup['max_pairs_per_prompt']})",
        ),
    ]
    for key, value in rows:
        overview.add_row(key, escape(value))
    parts.append(overview)

    domains = Table(title="domains", show_edge=False, title_justify="left")
    domains.add_column("domain")
    domains.add_column("pairs", justify="right")
    items = list(report["domains"].items())
    for name, n in items[:TOP_DOMAINS]:
        domains.add_row(escape(name), str(n))
    if len(items) > TOP_DOMAINS:
        domains.add_row(f"... {len(items) - TOP_DOMAINS} more", str(sum(n for _, n in items[TOP_DOMAINS:])))
    parts.append(domains)

    parts.append(Columns([_histogram_table(n, report["tokens"][n]) for n in ("prompt", "chosen", "rejected", "pair")]))

    if report["problems"]:
        problems = Table(title=f"problems ({report['invalid']} invalid records)", show_edge=False, title_justify="left")
        problems.add_column("where: what", style="red")
        for line in report["problems"]:
            problems.add_row(escape(line))
        parts.append(problems)

    if "partition" in report:
        p = report["partition"]
        table = Table(
            title=f"partition: {p['method']}, {p['num_clients']} clients, conflict_fraction {p['conflict_fraction']}",
            show_edge=False,
            title_justify="left",
        )
        columns = ("client", "train", "val", "test", "max len", "prompt", "cut prompts", "cut responses", "conflict")
        for col in (*columns, "domains", "domain mix (train)"):
            table.add_column(col, justify="left" if col.startswith("domain mix") else "right")
        for c in p["clients"]:
            mix = escape(", ".join(f"{d} {share:.0%}" for d, share in c["domain_mix"]))
            table.add_row(
                str(c["id"]),
                str(c["n_train"]),
                str(c["n_val"]),
                str(c["n_test"]),
                str(c["max_length"]),
                str(c["max_prompt_length"]),
                f"{c['prompts_truncated']:.0%}",
                f"{c['responses_truncated']:.0%}",
                "yes" if c["conflict"] else "",
                str(c["domains"]),
                mix,
            )
        parts.append(table)
    return Group(*parts)
