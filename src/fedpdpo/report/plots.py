"""PNG plots of a comparison (matplotlib, headless Agg backend, so it works on servers and in CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen before pyplot is imported
from matplotlib.ticker import MaxNLocator


def plot_accuracy_by_round(comparison: dict[str, Any], path: Path) -> Path:
    """Mean held-out accuracy over clients per round, one line per algorithm (band: std over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in comparison["ranking"]:
        algo = comparison["algorithms"][name]
        rounds = sorted(algo["accuracy_by_round"], key=int)
        x = [int(r) for r in rounds]
        y = [algo["accuracy_by_round"][r] for r in rounds]
        s = [algo["accuracy_by_round_std"][r] for r in rounds]
        (line,) = ax.plot(x, y, marker="o", label=f"{name} (n={len(algo['seeds'])})")
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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_client(comparison: dict[str, Any], path: Path) -> Path:
    """Final held-out accuracy of every client, grouped by client, one bar per algorithm (error bar: std)."""
    names = comparison["ranking"]
    first = comparison["algorithms"][names[0]]
    n_seeds = len(first["seeds"])
    labels = [
        f"client {c['id']}"
        + {0: "", n_seeds: "\n(conflict)"}.get(len(c["conflict_in_seeds"]), "\n(conflict in some seeds)")
        for c in first["clients"]
    ]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(labels) * max(1, len(names) / 3)), 4.5))
    for i, name in enumerate(names):
        algo = comparison["algorithms"][name]
        x = [c + (i - (len(names) - 1) / 2) * width for c in range(len(labels))]
        ax.bar(x, algo["per_client_accuracy"], width, yerr=algo["per_client_accuracy_std"], label=name, capsize=2)
    ax.set_xticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylabel("final held-out pairwise accuracy")
    ax.set_ylim(0, 1)
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
