"""Run outputs: ``config.toml`` (as given), ``metrics.jsonl`` (a line per client per round), ``summary.json``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedpdpo.client.state import atomic_write
from fedpdpo.client.trainer import SCORES
from fedpdpo.config import RunConfig, save_config
from fedpdpo.jsonio import dumps


def write_config(out: Path, cfg: RunConfig) -> None:
    atomic_write(out / "config.toml", lambda p: save_config(cfg, p))


def append_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    with (out / "metrics.jsonl").open("a", encoding="utf-8") as fh:
        for row in rows:
            fh.write(dumps(row, sort_keys=True) + "\n")


def read_metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def mean_accuracy_by_round(rows: list[dict[str, Any]]) -> dict[int, float]:
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if "accuracy" in r:
            by_round.setdefault(r["round"], []).append(r["accuracy"])
    return {k: statistics.fmean(v) for k, v in sorted(by_round.items())}


def validation_by_round(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Per trained round, the clients' mean validation accuracy of the score each of them ranks by (its own
    held-out training pairs; clients without validation pairs are left out).

    Why: the test accuracy of the last round is the headline, but only the validation curve may say how many rounds
    a budget needs; where it peaks before the last round, the local modules overfit (docs/results.md, full budget)."""
    by_round: dict[int, list[float]] = {}
    for r in rows:
        if r["round"] < 1 or "selected_score" not in r:
            continue
        value = r.get(f"val/accuracy_{SCORES[int(r['selected_score'])]}")
        if value is not None:
            by_round.setdefault(r["round"], []).append(value)
    return {k: statistics.fmean(v) for k, v in sorted(by_round.items())}


def build_summary(
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    clients: list[dict[str, Any]],
    communication: dict[str, Any],
) -> dict[str, Any]:
    """The run's summary: the last round's accuracy per client (with ``select_round = "best_val"``: that of the
    round whose model the client kept, ``selected_round``), the history of the mean, and the training each
    client did: ``local_steps`` (gradient steps of its accepted updates, as the client reported them; the budget
    that comparisons check) and ``rounds_trained``."""
    last_round = max(r["round"] for r in rows)
    last = {r["client"]: r for r in rows if r["round"] == last_round and "accuracy" in r}
    steps: dict[int, float] = {}
    trained: dict[int, int] = {}
    for r in rows:
        if "train/steps" in r:
            steps[r["client"]] = steps.get(r["client"], 0.0) + r["train/steps"]
            trained[r["client"]] = trained.get(r["client"], 0) + 1
    evaluated = {(r["client"], r["round"]): r for r in rows if "accuracy" in r}
    per_client = []
    for c in clients:
        row = last[c["id"]]
        entry = dict(c) | {"local_steps": int(steps.get(c["id"], 0)), "rounds_trained": trained.get(c["id"], 0)}
        if "best_round" in row:  # select_round = "best_val": the round of the model the client kept
            entry |= {"selected_round": int(row["best_round"]), "accuracy_last_round": row["accuracy"]}
            row = evaluated.get((c["id"], int(row["best_round"])), row)
        for key in (
            "accuracy",
            "accuracy_implicit",
            "accuracy_explicit",
            "accuracy_combined",
            "accuracy_global",
            "accuracy_policy",
            "accuracy_logp",
            "reward_margin",
            "explicit_margin",
        ):
            if key in row:
                entry[key] = row[key]
        entry |= {k: v for k, v in row.items() if k.startswith("val/accuracy")}
        if "selected_score" in row:  # which score the client ranks by (chosen on its validation pairs by default)
            entry["selected_score"] = SCORES[int(row["selected_score"])]
            entry["selected_policy"] = "own" if row.get("selected_policy", 1.0) else "global"
        per_client.append(entry)
    history = mean_accuracy_by_round(rows)
    validation = validation_by_round(rows)
    peak = {"best_val_round": max(validation, key=lambda k: (validation[k], -k))} if validation else {}
    return {
        **meta,
        "mean_accuracy": statistics.fmean(c["accuracy"] for c in per_client),
        "mean_accuracy_round0": history.get(0),
        "mean_accuracy_by_round": {str(k): v for k, v in history.items()},
        "mean_val_accuracy_by_round": {str(k): v for k, v in validation.items()},
        **peak,
        "clients": per_client,
        "communication": communication,
    }


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    atomic_write(out / "summary.json", lambda p: Path(p).write_text(dumps(summary, indent=2) + "\n"))
