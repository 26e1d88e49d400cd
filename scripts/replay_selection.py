"""What ``select_round = "best_val"`` would have kept had a finished run stopped after round R, for every R.

Why: the learning rate is constant and training never reads the selection, so the first R rounds of a run with more
rounds *are* the run with R rounds (same seed, same data order). One long run therefore answers "how many rounds?"
for every shorter budget, on validation pairs only: for each R the script replays the selection rule
(:func:`fedpdpo.client.selection.validation_accuracy`, ties to the later round) over rounds 1..R of the run's
``metrics.jsonl`` and prints the validation score ``fedpdpo tune`` ranks variants by
(:func:`fedpdpo.tune.validation_score`, from the same per-client values) beside the test accuracies the kept
rounds give, which choose nothing.

    python scripts/replay_selection.py --run runs/imdb-3c-full/fedpdpo/seed0 [--run ...] [--json OUT]

Several ``--run`` directories (seeds of one variant) are averaged per R.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any, NoReturn

from fedpdpo.client.selection import below, validation_accuracy
from fedpdpo.tune import TEST_KEYS


def _fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2 (as the CLI)."""
    print(f"replay_selection: {message}", file=sys.stderr)
    raise SystemExit(2)


def evaluations(run: Path) -> dict[int, dict[int, dict[str, Any]]]:
    """The run's evaluated rounds, ``{client: {round: metrics}}``, from ``metrics.jsonl`` (the last row wins when a
    resumed run evaluated a round again)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        _fail(f"{path}: no such file (not a run directory, or no round evaluated yet)")
    rows: dict[int, dict[int, dict[str, Any]]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            _fail(f"{path}:{number}: not a JSON line ({err.msg})")
        if "accuracy" in row and "client" in row:
            rows.setdefault(int(row["client"]), {})[int(row["round"])] = row
    return rows


def kept_rounds(rows: dict[int, dict[int, dict[str, Any]]], last_round: int) -> dict[int, int]:
    """Per client, the round ``best_val`` keeps among rounds 1..last_round: the highest validation accuracy, ties
    to the later round (as :func:`fedpdpo.client.selection.keep_if_best`)."""
    kept = {}
    for client, by_round in rows.items():
        best_round, best = None, None
        for rnd in sorted(r for r in by_round if 1 <= r <= last_round):
            value = validation_accuracy(by_round[rnd])
            if best_round is None or not below(value, best):
                best_round, best = rnd, value
        if best_round is not None:
            kept[client] = best_round
    return kept


def replay(rows: dict[int, dict[int, dict[str, Any]]], last_round: int) -> dict[str, float]:
    """The summary figures a run (its :func:`evaluations`) stopped after ``last_round`` would have reported: its
    validation score (the mean over clients of the kept rounds' :func:`validation_accuracy`, which is what
    :func:`fedpdpo.tune.validation_score` reads from a summary) and the mean over clients of each test accuracy at
    the kept rounds."""
    clients = [rows[c][r] for c, r in sorted(kept_rounds(rows, last_round).items())]
    values = [v for v in (validation_accuracy(m) for m in clients) if v is not None]
    result = {"validation_score": statistics.fmean(values) if values else float("nan")}
    for key in TEST_KEYS:
        if all(key in m for m in clients):
            result[key] = statistics.fmean(float(m[key]) for m in clients)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, type=Path, help="a finished run directory")
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    runs = [evaluations(run) for run in args.run]
    last = min(max((r for c in rows.values() for r in c), default=0) for rows in runs)
    if last < 1:
        _fail("no trained round evaluated yet in " + ", ".join(map(str, args.run)))
    table = []
    for rnd in range(1, last + 1):
        per_run = [replay(rows, rnd) for rows in runs]
        row: dict[str, Any] = {"rounds": rnd}
        for key in per_run[0]:
            values = [p[key] for p in per_run if key in p]
            row[key] = statistics.fmean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(row)
    keys = ["validation_score", *(k for k in TEST_KEYS if k in table[0])]
    print("| rounds | " + " | ".join(k.replace("accuracy_", "") for k in keys) + " |")
    print("|---:|" + "---:|" * len(keys))
    for row in table:
        cells = [f"{100 * row[k]:.1f} +- {100 * row[f'{k}_std']:.1f}" for k in keys]
        print(f"| {row['rounds']} | " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps({"runs": [str(r) for r in args.run], "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
