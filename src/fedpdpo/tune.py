"""``fedpdpo tune``: a grid of config variants, each run over seeds, chosen on the clients' validation pairs.

Why a command of its own: a sweep that reads test accuracy to pick its settings reports a number it tuned on. Here
the choice is made by a rule fixed before any run, on the validation pairs each client holds out from its own
training pairs, and the test figures are written next to it only as what the choice gave.

The rule: a run's **validation score** is the mean over its clients of the validation accuracy of the model each
client kept (``select_round``), averaged between the score the client ranks by and its policy's implicit reward,
the quantity ``select_round = "best_val"`` maximises (:func:`fedpdpo.client.selection.validation_accuracy`). A
variant's score is the mean over its seeds; the highest wins, ties going to the variant listed first.

Layout: ``OUT/<variant>/`` is an ordinary ``fedpdpo compare`` directory (``<algorithm>/seed<k>/`` runs, its own
report); ``OUT/tune.json`` and ``OUT/tune.md`` hold the grid, every variant's scores and the choice. Finished runs
are skipped, so running the same command again resumes an interrupted sweep.
"""

from __future__ import annotations

import itertools
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpdpo.client.state import atomic_write
from fedpdpo.config import load_config
from fedpdpo.errors import ConfigError, FedPDPOError
from fedpdpo.jsonio import dumps
from fedpdpo.report.compare import Run, load_run, write_report
from fedpdpo.sweep import execute, plan

#: Test figures reported next to the validation score (summary keys, per client), when the algorithm has them.
TEST_KEYS = ("accuracy", "accuracy_implicit", "accuracy_combined", "accuracy_explicit", "accuracy_global")


@dataclass(frozen=True)
class Variant:
    """One point of the grid: its ``--set`` overrides and the directory name they give."""

    sets: tuple[str, ...]

    @property
    def name(self) -> str:
        slug = "_".join(self.sets) if self.sets else "base"
        return re.sub(r"[^A-Za-z0-9._=+-]", "", slug.replace(",", "+"))[:120]


def split_values(text: str) -> list[str]:
    """``"1e-3,5e-4"`` -> two values; commas inside brackets or quotes belong to a value (TOML lists, strings)."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return [v.strip() for v in values]


def parse_grid(specs: Sequence[str]) -> dict[str, list[str]]:
    """``["lr=1e-3,5e-4", "max_length=128,256"]`` -> ``{"lr": ["1e-3", "5e-4"], ...}`` (values as TOML literals)."""
    grid: dict[str, list[str]] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        values = split_values(raw) if sep else []
        if not key or not values or any(not v for v in values):
            raise ConfigError(f"--grid expects KEY=VALUE[,VALUE...], got {spec!r}")
        if key in grid:
            raise ConfigError(f"--grid names '{key}' twice; give all its values in one --grid")
        if key in ("algorithm", "seed"):  # each run's own: a grid over them would be silently overridden
            raise ConfigError(f"--grid cannot vary '{key}': use --{'algorithm' if key == 'algorithm' else 'seeds'}")
        grid[key] = values
    return grid


def variants(grid: dict[str, list[str]]) -> list[Variant]:
    """Every combination of the grid's values, in the order given (the first key varies slowest)."""
    keys = list(grid)
    return [
        Variant(tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True)))
        for combo in itertools.product(*(grid[k] for k in keys))
    ]


def validation_score(summary: dict[str, Any]) -> float | None:
    """The run's validation score (module docstring); None when its clients held out no validation pairs."""
    per_client = []
    for client in summary["clients"]:
        score = client.get("selected_score", "implicit")
        values = [client.get(f"val/accuracy_{score}"), client.get("val/accuracy_implicit")]
        present = [float(v) for v in values if v is not None]
        if present:
            per_client.append(statistics.fmean(present))
    return statistics.fmean(per_client) if per_client else None


def _mean_std(values: Sequence[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _variant_result(variant: Variant, runs: Sequence[Run], seeds: Sequence[int], where: Path) -> dict[str, Any]:
    scores = [validation_score(r.summary) for r in runs]
    present = [s for s in scores if s is not None]
    if len(present) < len(scores):
        raise FedPDPOError(
            f"{where}: its runs hold out no validation pairs, so nothing can choose between variants; "
            "set data.validation_fraction above 0"
        )
    test: dict[str, dict[str, float]] = {}
    for key in TEST_KEYS:
        values = [
            statistics.fmean(c[key] for c in r.summary["clients"]) for r in runs if key in r.summary["clients"][0]
        ]
        if len(values) == len(runs):
            test[key] = _mean_std(values)
    return {
        "name": variant.name,
        "sets": list(variant.sets),
        "validation_score": _mean_std(present),
        "validation_score_by_seed": dict(zip((str(s) for s in seeds), scores, strict=True)),
        "test": test,
    }


def run_tune(
    config: str | Path,
    grid: dict[str, list[str]],
    algorithm: str,
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Run every variant of ``grid`` (each a comparison of ``algorithm`` over ``seeds``, with its own report),
    choose one by the validation score, write ``tune.json`` and ``tune.md``; returns what ``tune.json`` holds.
    ``workers``: runs at a time, across variants (:func:`fedpdpo.sweep.execute`)."""
    out = Path(out).resolve()
    points = variants(grid)
    # every variant's config loads before anything runs
    bases = [load_config(config, [*overrides, *variant.sets]) for variant in points]
    jobs = {
        v.name: plan(base, [algorithm], seeds, out / v.name, prefix=f"{v.name}: ")
        for v, base in zip(points, bases, strict=True)
    }
    execute([job for batch in jobs.values() for job in batch], quiet, workers)
    results = []
    for v in points:
        runs = [load_run(job.path) for job in jobs[v.name]]
        write_report(runs, out / v.name)
        results.append(_variant_result(v, runs, seeds, out / v.name))
    best = max(range(len(results)), key=lambda i: (results[i]["validation_score"]["mean"], -i))
    tune = {
        "config": str(Path(config).resolve()),
        "overrides": list(overrides),
        "algorithm": algorithm,
        "seeds": list(seeds),
        "grid": grid,
        "rule": "highest mean validation score over seeds (clients' kept-round validation accuracy, mean of the "
        "chosen score's and the implicit reward's); ties to the variant listed first; test figures not used",
        "chosen": results[best]["name"],
        "variants": results,
    }
    atomic_write(out / "tune.json", lambda p: Path(p).write_text(dumps(tune, indent=2) + "\n"))
    atomic_write(out / "tune.md", lambda p: Path(p).write_text(render(tune)))
    return tune


def _cell(stat: dict[str, float] | None) -> str:
    return "-" if stat is None else f"{100 * stat['mean']:.1f} +- {100 * stat['std']:.1f}"


def render(tune: dict[str, Any]) -> str:
    """tune.md: one row per variant, the chosen one in bold; validation decides, test is shown beside it."""
    seeds = ", ".join(str(s) for s in tune["seeds"])
    lines = [
        f"# Tuning {tune['algorithm']} on {tune['config']}",
        "",
        f"Seeds {seeds}; every run with {' '.join(tune['overrides']) or 'the config as is'} and its variant's "
        "settings. **Chosen on validation pairs:** "
        f"{tune['rule']}. Values: mean +- standard deviation over seeds, %.",
        "",
        "| variant | validation score | test accuracy | implicit | combined | explicit | global |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v in tune["variants"]:
        name = ", ".join(f"`{s}`" for s in v["sets"]) or "(the config)"
        if v["name"] == tune["chosen"]:
            name = f"**{name} (chosen)**"
        cells = [_cell(v["validation_score"]), *(_cell(v["test"].get(k)) for k in TEST_KEYS)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
