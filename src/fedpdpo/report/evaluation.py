"""Report sections for ``fedpdpo evaluate``'s results: the judge table and the cross-client accuracy matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen before pyplot is imported

MODELS = ("personalized", "global", "base")  # what evaluations written before the "models" key hold


def _models(judge: dict[str, Any]) -> tuple[str, ...]:
    """The judged models in table order (``best_of`` and ``realigned``, when judged, go next to ``personalized``)."""
    models = tuple(judge.get("models", MODELS))
    return (
        "personalized",
        *[m for m in models if m != "personalized" and m not in ("global", "base")],
        *[m for m in ("global", "base") if m in models],
    )


def _others(models: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(m for m in models if m != "base")


SIDE = {1: "higher", -1: "lower", 0: "neither"}


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _vs_base(row: dict[str, Any], model: str) -> str:
    """``+0.120 +- 0.080``; "-" for evaluations written before the difference was recorded."""
    diff, se = row.get(f"{model}/vs_base"), row.get(f"{model}/vs_base_se")
    if diff is None:
        return "-"
    return f"{diff:+.3f}" if se is None else f"{diff:+.3f} +- {se:.3f}"


def judge_lines(judge: dict[str, Any]) -> list[str]:
    neutral = judge.get("zero_is_neutral", False)
    models = _models(judge)
    names, others = " / ".join(models), " / ".join(_others(models))
    lines = [
        f"Judge: {judge['judge']}. Samples per client and model: {judge['clients'][0]['samples']}. "
        "Each client's side is read from its own training pairs (judge score of chosen minus rejected); "
        "'oriented' scores are multiplied by that side's sign, so higher is better for every client. "
        "'minus base' is a model's oriented mean minus the base model's, +- one standard error of that difference "
        "(paired: sample i of every model answers the same prompt with the same random stream); a difference "
        "beyond about twice its standard error is a lean that sampling noise alone rarely gives. 'Repeated "
        "trigrams' is the share of a sample's word trigrams that already occurred in it (near 0 for fluent text): "
        "a judge scores looping text as neutral, so a model with many repeats can show no lean for that reason."
        + (
            f" 'best_of' is, per sample, the one of {judge['settings']['best_of']} personalized samples that the "
            "client's own reward head ranks first."
            if "best_of" in models and "settings" in judge
            else ""
        )
        + (
            f" 'realigned' samples the personalized policy at realignment strength {judge['settings']['realign']:g}: "
            "each token from pi_ref^(1-L) * pi^L, about the policy the client's pairs would train at beta / L."
            if "realigned" in models and "settings" in judge
            else ""
        ),
        "",
    ]
    head = f"| client | prefers | train margin | oriented score: {names} |"
    sep = "|---:|---|---:|---|"
    if neutral:
        head += f" on the client's side %: {names} |"
        sep += "---|"
    head += f" win rate vs base %: {others} | minus base: {others} |"
    sep += "---|---|"
    repeats = all("personalized/repeated_trigrams" in row for row in judge["clients"])  # older runs lack it
    if repeats:
        head += f" repeated trigrams %: {names} |"
        sep += "---|"
    lines += [head, sep]
    for row in judge["clients"]:
        cid = f"{row['client']}{' (conflict)' if row['conflict'] else ''}"
        cells = [
            cid,
            f"{SIDE[row['preferred_direction']]} scores",
            f"{row['train_margin']:+.3f}",
            " / ".join(f"{row[f'{m}/oriented_score']:+.3f}" for m in models),
        ]
        if neutral:
            cells.append(" / ".join(_pct(row.get(f"{m}/match")) for m in models))
        cells.append(" / ".join(_pct(row[f"{m}/win_rate_vs_base"]) for m in _others(models)))
        cells.append(" / ".join(_vs_base(row, m) for m in _others(models)))
        if repeats:
            cells.append(" / ".join(_pct(row[f"{m}/repeated_trigrams"]) for m in models))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def matrix_lines(matrix: dict[str, Any]) -> list[str]:
    ids = matrix["clients"]
    label = [f"{c}{'*' if conflict else ''}" for c, conflict in zip(ids, matrix["conflict"], strict=True)]
    lines = [
        "Row i, column j: client i's personalized model on client j's held-out pairs (% ranked right by i's own "
        "score); `*` marks clients with swapped preferences. "
        f"Own pairs (diagonal) {_pct(matrix['own_mean'])} %, others' pairs {_pct(matrix['others_mean'])} %, "
        f"worst client {_pct(matrix['worst_client'])} %, spread {_pct(matrix['spread'])} points.",
        "",
        "| model \\ pairs of | " + " | ".join(f"client {x}" for x in label) + " |",
        "|---|" + "---:|" * len(ids),
    ]
    for i, row in enumerate(matrix["accuracy"]):
        cells = [f"**{_pct(v)}**" if i == j else _pct(v) for j, v in enumerate(row)]
        lines.append(f"| client {label[i]} | " + " | ".join(cells) + " |")
    return lines


def plot_judge(judge: dict[str, Any], path: Path, title: str) -> Path:
    """Oriented judge score per client: personalized (best-of, realigned), global and base samples side by side."""
    rows = judge["clients"]
    models = _models(judge)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(rows)), 3.8))
    width = 0.8 / len(models)
    for k, model in enumerate(models):
        x = [i + (k - (len(models) - 1) / 2) * width for i in range(len(rows))]
        ax.bar(x, [r[f"{model}/oriented_score"] for r in rows], width, label=model)
    ax.axhline(0, color="grey", linewidth=0.8)
    labels = [f"client {r['client']}{chr(10) + '(conflict)' if r['conflict'] else ''}" for r in rows]
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("judge score toward the client's side")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_matrix(matrix: dict[str, Any], path: Path, title: str) -> Path:
    acc = matrix["accuracy"]
    n = len(acc)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn")
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{100 * acc[i][j]:.0f}", ha="center", va="center", fontsize=8)
    labels = [f"{c}{'*' if f else ''}" for c, f in zip(matrix["clients"], matrix["conflict"], strict=True)]
    ax.set_xticks(range(n), labels)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("held-out pairs of client")
    ax.set_ylabel("model of client")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluation_section(name: str, summary: dict[str, Any], out: Path) -> list[str]:
    """Markdown (and PNGs written to ``out``) for one run's evaluation, or nothing when it was not evaluated."""
    if "judge" not in summary and "cross_client" not in summary:
        return []
    slug = name.replace("/", "-").replace(" ", "")
    lines = [f"### {name}", ""]
    if "judge" in summary:
        plot = plot_judge(summary["judge"], out / f"judge_{slug}.png", f"{name}: generated samples")
        lines += ["#### What the models generate (independent judge)", "", *judge_lines(summary["judge"]), ""]
        lines += [f"![judge {name}]({plot.name})", ""]
    if "cross_client" in summary:
        plot = plot_matrix(summary["cross_client"], out / f"matrix_{slug}.png", f"{name}: cross-client accuracy")
        lines += ["#### Cross-client accuracy", "", *matrix_lines(summary["cross_client"]), ""]
        lines += [f"![matrix {name}]({plot.name})", ""]
    return lines
