"""PNG plots of a comparison (matplotlib, headless Agg backend, so it works on servers and in CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen before pyplot is imported
from matplotlib.ticker import MaxNLocator

MARKERS = "osD^v<>ph*"


def _colors(n: int) -> list:
    """One distinct colour per algorithm: tab10 repeats after 10, and a comparison can hold 15 algorithms."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def plot_accuracy_by_round(comparison: dict[str, Any], path: Path) -> Path:
    """Mean held-out accuracy over clients per round, one line per algorithm (band: std over seeds)."""
    fig, ax = plt.subplots(figsize=(7 if len(comparison["ranking"]) <= 6 else 9, 4.5))
    colors = _colors(len(comparison["ranking"]))
    for i, name in enumerate(comparison["ranking"]):
        algo = comparison["algorithms"][name]
        rounds = sorted(algo["accuracy_by_round"], key=int)
        x = [int(r) for r in rounds]
        y = [algo["accuracy_by_round"][r] for r in rounds]
        s = [algo["accuracy_by_round_std"][r] for r in rounds]
        (line,) = ax.plot(
            x, y, marker=MARKERS[i % len(MARKERS)], color=colors[i], label=f"{name} (n={len(algo['seeds'])})"
        )
        ax.fill_between(
            x,
            [a - b for a, b in zip(y, s, strict=True)],
            [a + b for a, b in zip(y, s, strict=True)],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set_xlabel("round (0 = before training)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
    ax.set_ylabel("mean held-out pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines stay visible
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_per_client(comparison: dict[str, Any], path: Path) -> Path:
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
    ax.set_ylabel("final held-out pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2 if len(names) <= 8 else 3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
