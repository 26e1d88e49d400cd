"""Sweep training settings on validation pairs only: each variant is one federated run of a config with overrides.

Every run holds out each client's validation pairs (``data.validation_fraction`` of its training pairs) and reports
accuracy on them (``val/accuracy_*`` in summary.json). This script runs the variants one after another (one real-model
job at a time), then ranks them by the mean over clients of the validation accuracy of the score each client chose
(``val/accuracy_<selected>``) and, separately, of the implicit reward. Test accuracies are collected for the record
but never used to rank: settings are chosen on validation pairs, and the test split is read once, for the report.

    python scripts/sweep_settings.py --config configs/experiments/imdb-3c-conflict.toml --out runs/sweep \\
        --variant base --variant "beta05:beta=0.5" --variant "allmods:lora.target_modules=[...]"

A variant is ``NAME`` or ``NAME:KEY=VALUE;KEY=VALUE`` (``--set`` syntax, separated by ``;``). Finished variants
(a summary.json in OUT/NAME) are not run again, so an interrupted sweep continues where it stopped. Results:
OUT/sweep.json and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from fedpdpo.config import load_config
from fedpdpo.engines.inprocess import run_inprocess

SCORES = ("implicit", "combined", "explicit", "global")


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, _, rest = text.partition(":")
    return name.strip(), [s.strip() for s in rest.split(";") if s.strip()]


def _mean(values: list[float]) -> float | None:
    return round(statistics.fmean(values), 4) if values else None


def summarize(name: str, overrides: list[str], summary: dict) -> dict:
    clients = summary["clients"]
    row = {"variant": name, "overrides": overrides, "time_s": summary.get("time_s")}
    selected = [c.get(f"val/accuracy_{c['selected_score']}") for c in clients if "selected_score" in c]
    row["val_selected"] = _mean([v for v in selected if v is not None])
    for score in SCORES:
        row[f"val_{score}"] = _mean([c[f"val/accuracy_{score}"] for c in clients if f"val/accuracy_{score}" in c])
        row[f"test_{score}"] = _mean([c[f"accuracy_{score}"] for c in clients if f"accuracy_{score}" in c])
    row["test_selected"] = round(summary["mean_accuracy"], 4)
    row["per_client_selected"] = [c.get("selected_score") for c in clients]
    return row


def table(rows: list[dict]) -> str:
    head = "| variant | val: chosen / implicit / combined / global | test: chosen / implicit / combined / global | s |"
    lines = [head, "|---|---|---|---:|"]

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    for r in sorted(rows, key=lambda r: -(r["val_selected"] or 0)):
        val = " / ".join(pct(r[k]) for k in ("val_selected", "val_implicit", "val_combined", "val_global"))
        test = " / ".join(pct(r[k]) for k in ("test_selected", "test_implicit", "test_combined", "test_global"))
        lines.append(f"| {r['variant']} | {val} | {test} | {r['time_s'] or 0:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--variant", action="append", required=True, help="NAME or NAME:KEY=VALUE;KEY=VALUE")
    parser.add_argument("--set", action="append", default=[], help="override for every variant")
    args = parser.parse_args()
    out = Path(args.out)
    rows = []
    for text in args.variant:
        name, overrides = parse_variant(text)
        run_dir = out / name
        if not (run_dir / "summary.json").is_file():
            start = time.perf_counter()
            cfg = load_config(args.config, [*args.set, *overrides])
            run_inprocess(cfg, run_dir, quiet=True, overwrite=run_dir.exists())
            print(f"{name}: {time.perf_counter() - start:.0f} s", flush=True)
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        rows.append(summarize(name, [*args.set, *overrides], summary))
        (out / "sweep.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(table(rows))


if __name__ == "__main__":
    main()
