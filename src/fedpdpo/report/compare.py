"""Fair comparison of algorithms: aggregate finished runs over seeds, check they are like for like, report.

This module only reads run directories (``summary.json``, ``config.toml``); running the jobs of a comparison is
:mod:`fedpdpo.sweep`. Fairness comes from construction: every run of a comparison starts from the same config file
and overrides and differs only in ``algorithm`` and ``seed``. The report re-checks this from the runs' saved
``config.toml`` (data, partition, model, LoRA and optimizer must match across algorithms) and from the local steps
each client reports having run (``summary.json``: the total number of gradient steps must match), and lists any
difference, so a report built from mixed runs says so.

Output: ``comparison.json``, ``report.md`` and ``*.png`` in the comparison's directory.
"""

from __future__ import annotations

import json
import statistics
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpdpo.client.state import atomic_write
from fedpdpo.errors import FedPDPOError, first_line
from fedpdpo.jsonio import dumps

#: Config keys that must be equal across every run of a comparison (the local steps are compared as a budget).
FAIRNESS_KEYS = (
    "model",
    "num_clients",
    "rounds",
    "batch_size",
    "max_length",
    "lr",
    "beta",
    "lora",
    "data",
    "partition",
)


@dataclass
class Run:
    """One finished run: its directory, summary and saved config (as the user gave it)."""

    path: Path
    summary: dict[str, Any]
    config: dict[str, Any]

    @property
    def algorithm(self) -> str:
        return str(self.summary["algorithm"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    @property
    def step_budget(self) -> int:
        """Total local gradient steps of the run, summed over clients, as they reported them (equal across
        algorithms by design: ``centralized`` runs them all on one client; Ditto's personal pass adds its own)."""
        return sum(int(c["local_steps"]) for c in self.summary["clients"])

    @property
    def client_rounds(self) -> int:
        """Client-rounds of training (each one downloads and uploads the shared tensors once)."""
        return sum(int(c["rounds_trained"]) for c in self.summary["clients"])


def load_run(path: Path) -> Run:
    summary_path = path / "summary.json"
    if not summary_path.is_file():
        raise FedPDPOError(f"{path} is not a finished run (no summary.json)")
    summary = _parse(summary_path, json.loads)
    check_summary(summary_path, summary)
    config_path = path / "config.toml"
    if not config_path.is_file():
        raise FedPDPOError(f"{path} is not a fedpdpo run (no config.toml next to its summary.json)")
    return Run(path, summary, _parse(config_path, tomllib.loads))


def _parse(path: Path, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise FedPDPOError(f"{path} is unreadable ({first_line(exc)}); run it again, or leave it out") from None


#: What a report reads from each summary.json, with the types it needs.
SUMMARY_FIELDS: dict[str, type | tuple[type, ...]] = {
    "algorithm": str,
    "seed": int,
    "mean_accuracy": (int, float),
    "mean_accuracy_by_round": dict,
    "clients": list,
    "communication": dict,
    "time_s": (int, float),
}


def check_summary(path: Path, summary: Any) -> None:
    """Refuse a summary.json that fedpdpo did not write (or that was cut short) before any number is read from it."""
    if problem := _summary_problem(summary):
        raise FedPDPOError(f"{path} is not a fedpdpo run summary ({problem}); run it again, or leave it out")


def _summary_problem(summary: Any) -> str:
    if not isinstance(summary, dict):
        return "it is not a JSON object"
    for key, tp in SUMMARY_FIELDS.items():
        if not isinstance(summary.get(key), tp) or isinstance(summary.get(key), bool):
            return f"field '{key}' is missing or of the wrong type"
    for client in summary["clients"]:
        if not isinstance(client, dict) or not all(
            isinstance(client.get(k), int | float) for k in ("accuracy", "accuracy_implicit")
        ):
            return "an entry of 'clients' lacks its accuracies"
        if "local_steps" not in client:
            return "it does not say how many local steps its clients ran (written by an older fedpdpo)"
    needed = {"shared_parameters", "uplink_bytes_per_client_round", "downlink_bytes_per_client_round"}
    if not needed <= set(summary["communication"]):
        return "field 'communication' is incomplete"
    return ""


def run_curves(run: Run) -> dict[str, dict[str, dict[str, float]]]:
    """Per-round curves of one run from its ``metrics.jsonl``: held-out ``accuracy`` and ``train_loss`` (the mean
    loss of a client's local steps in the round), each by client id then round (as strings, like JSON keys)."""
    path = run.path / "metrics.jsonl"
    curves: dict[str, dict[str, dict[str, float]]] = {"accuracy": {}, "train_loss": {}}
    if not path.is_file():
        return curves
    rows = _parse(path, lambda text: [json.loads(line) for line in text.splitlines() if line.strip()])
    for row in rows:
        for key, curve in curves.items():
            value = row.get(key) if isinstance(row, dict) else None
            if isinstance(value, int | float) and not isinstance(value, bool):
                curve.setdefault(str(row.get("client")), {})[str(row.get("round"))] = float(value)
    return curves


def mean_by_round(by_client: dict[str, dict[str, float]]) -> dict[str, float]:
    """The mean over clients of a per-client curve, by round."""
    rounds: dict[int, list[float]] = {}
    for curve in by_client.values():
        for r, v in curve.items():
            rounds.setdefault(int(r), []).append(v)
    return {str(r): statistics.fmean(vs) for r, vs in sorted(rounds.items())}


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """Finished runs in ``paths``: each path is a run directory or a directory holding runs (searched recursively)."""
    found: dict[Path, Run] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise FedPDPOError(f"{p} is not a directory")
        summaries = [p / "summary.json"] if (p / "summary.json").is_file() else sorted(p.rglob("summary.json"))
        for s in summaries:
            found[s.parent.resolve()] = load_run(s.parent)
    if not found:
        raise FedPDPOError(f"no finished runs (summary.json) under {', '.join(map(str, paths))}")
    return list(found.values())


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _by_round(runs: Sequence[Run]) -> tuple[dict[str, float], dict[str, float]]:
    rounds = sorted({int(r) for run in runs for r in run.summary["mean_accuracy_by_round"]})
    mean, std = {}, {}
    for r in rounds:
        vals = [
            run.summary["mean_accuracy_by_round"][str(r)]
            for run in runs
            if str(r) in run.summary["mean_accuracy_by_round"]
        ]
        mean[str(r)], std[str(r)] = _mean_std(vals)
    return mean, std


def _group_mean(runs: Sequence[Run], conflict: bool) -> float | None:
    """Mean over seeds of the mean accuracy of the clients with (or without) swapped preferences."""
    per_seed = []
    for run in runs:
        values = [c["accuracy"] for c in run.summary["clients"] if bool(c.get("conflict")) == conflict]
        if values:
            per_seed.append(statistics.fmean(values))
    return statistics.fmean(per_seed) if per_seed else None


def summarize_algorithm(runs: Sequence[Run]) -> dict[str, Any]:
    """Mean and std over seeds of the headline numbers of one algorithm."""
    runs = sorted(runs, key=lambda r: r.seed)
    acc_mean, acc_std = _mean_std([r.summary["mean_accuracy"] for r in runs])
    implicit = [statistics.fmean(c["accuracy_implicit"] for c in r.summary["clients"]) for r in runs]
    imp_mean, imp_std = _mean_std(implicit)
    round0 = [r.summary["mean_accuracy_round0"] for r in runs if r.summary.get("mean_accuracy_round0") is not None]
    n_clients = len(runs[0].summary["clients"])
    per_client = [[r.summary["clients"][c]["accuracy"] for r in runs] for c in range(n_clients)]
    by_round_mean, by_round_std = _by_round(runs)
    first = runs[0]
    comm = first.summary["communication"]
    per_round_bytes = comm["uplink_bytes_per_client_round"] + comm["downlink_bytes_per_client_round"]
    times = [float(r.summary["time_s"]) for r in runs]
    losses = [mean_by_round(run_curves(r)["train_loss"]) for r in runs]
    loss_rounds = sorted({int(k) for curve in losses for k in curve})
    return {
        "seeds": [r.seed for r in runs],
        "runs": [str(r.path) for r in runs],
        "eval_score": first.summary.get("eval_score"),
        "mean_accuracy": acc_mean,
        "std_accuracy": acc_std,
        "mean_accuracy_implicit": imp_mean,
        "std_accuracy_implicit": imp_std,
        "mean_accuracy_round0": statistics.fmean(round0) if round0 else None,
        "per_client_accuracy": [statistics.fmean(v) for v in per_client],
        "per_client_accuracy_std": [_mean_std(v)[1] for v in per_client],
        "per_client_accuracy_by_seed": {str(r.seed): [c["accuracy"] for c in r.summary["clients"]] for r in runs},
        # which client conflicts depends on the seed, so per-client means mix roles; these two do not
        "accuracy_conflict_clients": _group_mean(runs, conflict=True),
        "accuracy_other_clients": _group_mean(runs, conflict=False),
        "clients": [
            {k: c[k] for k in ("id", "n_train", "n_test", "domains") if k in c}
            | {"conflict_in_seeds": [r.seed for r in runs if r.summary["clients"][i].get("conflict")]}
            for i, c in enumerate(first.summary["clients"])
        ],
        "accuracy_by_round": by_round_mean,
        "accuracy_by_round_std": by_round_std,
        # mean over clients of the mean loss of their local steps, per round, then mean over seeds
        "train_loss_by_round": {
            str(r): statistics.fmean(c[str(r)] for c in losses if str(r) in c) for r in loss_rounds
        },
        "shared_tensors": len(comm["shared_parameters"]),
        "uplink_bytes_per_client_round": comm["uplink_bytes_per_client_round"],
        "communication_bytes_total": per_round_bytes * first.client_rounds,
        "step_budget": first.step_budget,
        "time_s_mean": statistics.fmean(times),
        "time_s_total": sum(times),
    }


def fairness_differences(runs: Sequence[Run]) -> list[str]:
    """Settings that differ between runs but should not (empty when the comparison is fair)."""
    problems = []
    for key in (*FAIRNESS_KEYS, "step_budget"):
        values: dict[str, list[str]] = {}
        for run in runs:
            value = run.step_budget if key == "step_budget" else run.config.get(key)
            values.setdefault(json.dumps(value, sort_keys=True), []).append(f"{run.algorithm}/seed{run.seed}")
        if len(values) > 1:
            detail = "; ".join(f"{v} in {', '.join(who)}" for v, who in values.items())
            problems.append(f"{key} differs: {detail}")
    return problems


def build_comparison(runs: Sequence[Run]) -> dict[str, Any]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.algorithm, []).append(run)
    algorithms = {name: summarize_algorithm(group) for name, group in groups.items()}
    ranking = sorted(algorithms, key=lambda a: (-algorithms[a]["mean_accuracy"], a))
    first = runs[0].config
    return {
        "setup": {k: first.get(k) for k in (*FAIRNESS_KEYS, "local_steps")},
        "ranking": ranking,
        "algorithms": algorithms,
        "fairness_differences": fairness_differences(runs),
    }


def run_label(run: Run) -> str:
    """How a report names one run: algorithm, seed and directory."""
    return f"{run.algorithm} seed {run.seed} ({run.path.resolve().name})"


def write_report(runs: Sequence[Run], out: str | Path) -> dict[str, Any]:
    """Write ``comparison.json``, the PNG plots and ``report.md`` for ``runs`` into ``out``.

    One run gets a report of that run (its clients, their curves); several get a comparison of the algorithms."""
    from fedpdpo.report.evaluation import evaluation_section
    from fedpdpo.report.markdown import render_report, render_run_report
    from fedpdpo.report.plots import (
        plot_accuracy_by_round,
        plot_per_client,
        plot_run_curves,
        plot_train_loss_by_round,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    comparison = build_comparison(runs)
    if len(runs) == 1:
        run = runs[0]
        label = run_label(run)
        comparison["run"] = {
            "label": label,
            "path": str(run.path),
            "eval_score": run.summary.get("eval_score"),
            "curves": run_curves(run),
            "client_labels": {
                str(c["id"]): f"client {c['id']}{' (conflict)' if c.get('conflict') else ''}"
                for c in run.summary["clients"]
            },
        }
        plots = {
            "accuracy_by_round": plot_run_curves(comparison["run"], "accuracy", out / "accuracy_by_round.png"),
            "train_loss_by_round": plot_run_curves(comparison["run"], "train_loss", out / "train_loss_by_round.png"),
            "per_client_accuracy": plot_per_client(comparison, out / "per_client_accuracy.png", label),
        }
    else:
        names = out.resolve().name
        plots = {
            "accuracy_by_round": plot_accuracy_by_round(comparison, out / "accuracy_by_round.png", names),
            "train_loss_by_round": plot_train_loss_by_round(comparison, out / "train_loss_by_round.png", names),
            "per_client_accuracy": plot_per_client(comparison, out / "per_client_accuracy.png", names),
        }
    comparison["plots"] = {k: p.name for k, p in plots.items()}
    evaluation = [
        line
        for run in sorted(runs, key=lambda r: (r.algorithm, r.seed))
        for line in evaluation_section(f"{run.algorithm} seed {run.seed}", run.summary, out)
    ]
    atomic_write(out / "comparison.json", lambda p: Path(p).write_text(dumps(comparison, indent=2) + "\n"))
    if len(runs) == 1:
        text = render_run_report(comparison, runs[0].summary, evaluation)
    else:
        text = render_report(comparison, evaluation)
    atomic_write(out / "report.md", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return comparison
