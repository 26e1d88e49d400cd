"""PNG plots of a comparison or of one run (matplotlib, headless Agg backend, so it works on servers and in CI).

Every plot has a title naming what it shows and for which runs, axis labels naming the metric, and a labelled
chance line (0.5: a model that ranks chosen and rejected at random) on accuracy axes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen before pyplot is imported
from matplotlib.ticker import MaxNLocator

MARKERS = "osD^v<>ph*"


def score_label(score: str | None) -> str:
    """How a plot names ``method.eval_score``: with ``auto`` each client ranks pairs by the score its own
    validation pairs chose, so no single score name is true for every client."""
    return {"auto": "validation-chosen", None: "?"}.get(score, score or "?")


def _colors(n: int) -> list:
    """One distinct colour per algorithm: tab10 repeats after 10, and a comparison can hold 15 algorithms."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


CHANCE = 0.5


def _chance(ax) -> None:
    ax.axhline(CHANCE, color="grey", linewidth=0.8, linestyle="--", label="chance (0.5)", zorder=3)


def _save(fig, ax, path: Path, title: str, legend_outside: bool = False) -> Path:
    ax.set_title(title, fontsize=10)
    if legend_outside:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    else:
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_accuracy_by_round(comparison: dict[str, Any], path: Path, subject: str) -> Path:
    """Mean held-out accuracy over clients per round, one line per algorithm (band: std over seeds)."""
    fig, ax = plt.subplots(figsize=(7 if len(comparison["ranking"]) <= 6 else 9, 4.5))
    colors = _colors(len(comparison["ranking"]))
    for i, name in enumerate(comparison["ranking"]):
        algo = comparison["algorithms"][name]
        rounds = sorted(algo["accuracy_by_round"], key=int)
        x = [int(r) for r in rounds]
        y = [algo["accuracy_by_round"][r] for r in rounds]
        s = [algo["accuracy_by_round_std"][r] for r in rounds]
        label = f"{name} ({score_label(algo.get('eval_score'))} score, {len(algo['seeds'])} seed(s))"
        (line,) = ax.plot(x, y, marker=MARKERS[i % len(MARKERS)], color=colors[i], label=label)
        ax.fill_between(
            x,
            [a - b for a, b in zip(y, s, strict=True)],
            [a + b for a, b in zip(y, s, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    _chance(ax)
    ax.set_xlabel("round (0 = before training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("held-out pairwise accuracy, mean over clients")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, f"{subject}: held-out accuracy by round (band: std over seeds)", legend_outside=True)


def plot_train_loss_by_round(comparison: dict[str, Any], path: Path, subject: str) -> Path:
    """Training loss per round (mean over the round's local steps and the clients that trained), per algorithm."""
    fig, ax = plt.subplots(figsize=(7 if len(comparison["ranking"]) <= 6 else 9, 4.5))
    colors = _colors(len(comparison["ranking"]))
    for i, name in enumerate(comparison["ranking"]):
        curve = comparison["algorithms"][name].get("train_loss_by_round") or {}
        rounds = sorted(curve, key=int)
        ax.plot(
            [int(r) for r in rounds],
            [curve[r] for r in rounds],
            marker=MARKERS[i % len(MARKERS)],
            color=colors[i],
            label=name,
        )
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("training loss, mean over local steps and clients")
    ax.grid(alpha=0.3)
    return _save(fig, ax, path, f"{subject}: training loss by round (mean over seeds)", legend_outside=True)


def plot_run_curves(run: dict[str, Any], metric: str, path: Path) -> Path:
    """One run: a line per client and the mean over clients, of held-out ``accuracy`` or ``train_loss`` by round."""
    by_client = run["curves"][metric]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = _colors(max(1, len(by_client)))
    rounds: dict[int, list[float]] = {}
    for i, (cid, curve) in enumerate(sorted(by_client.items(), key=lambda kv: int(kv[0]))):
        x = sorted(int(r) for r in curve)
        for r in x:
            rounds.setdefault(r, []).append(curve[str(r)])
        ax.plot(
            x,
            [curve[str(r)] for r in x],
            marker=MARKERS[i % len(MARKERS)],
            color=colors[i],
            alpha=0.8,
            label=run["client_labels"].get(cid, f"client {cid}"),
        )
    mean = sorted(rounds)
    ax.plot(mean, [sum(rounds[r]) / len(rounds[r]) for r in mean], color="black", linewidth=2, label="mean")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if metric == "accuracy":
        _chance(ax)
        ax.set_xlabel("round (0 = before training)")
        ax.set_ylabel(f"held-out pairwise accuracy ({score_label(run['eval_score'])} score)")
        ax.set_ylim(0, 1)
        return _save(fig, ax, path, f"{run['label']}: held-out accuracy by round", legend_outside=True)
    ax.set_xlabel("round")
    ax.set_ylabel("training loss, mean over the round's local steps")
    return _save(fig, ax, path, f"{run['label']}: training loss by round", legend_outside=True)


def plot_per_client(comparison: dict[str, Any], path: Path, subject: str) -> Path:
    """Final held-out accuracy of every client, grouped by client, one bar per algorithm (error bar: std)."""
    names = comparison["ranking"]
    algos = [comparison["algorithms"][name] for name in names]
    runs = sum(len(a["seeds"]) for a in algos)  # algorithms may have been run with different seeds (partitions)
    labels = []
    for i, client in enumerate(algos[0]["clients"]):
        conflict = sum(len(a["clients"][i]["conflict_in_seeds"]) for a in algos)
        role = {0: "", runs: "\n(conflict)"}.get(conflict, "\n(conflict in some seeds)")
        labels.append(f"client {client['id']}{role}")
    width = 0.8 / len(names)
    colors = _colors(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(names) / 3)), 4.5))
    for i, (name, algo) in enumerate(zip(names, algos, strict=True)):
        x = [c + (i - (len(names) - 1) / 2) * width for c in range(len(labels))]
        ax.bar(
            x,
            algo["per_client_accuracy"],
            width,
            yerr=algo["per_client_accuracy_std"],
            label=name,
            capsize=2,
            color=colors[i],
        )
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("held-out pairwise accuracy after the last round")
    ax.set_ylim(0, 1)
    _chance(ax)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"{subject}: final held-out accuracy per client", fontsize=10)
    ax.legend(fontsize=8, ncol=2 if len(names) <= 8 else 3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
