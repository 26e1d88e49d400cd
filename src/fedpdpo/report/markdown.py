"""``report.md``: of a comparison (setup, ranked table, fairness check, plots) or of one run (setup, its clients,
accuracy by round, plots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pct(value: float | None, std: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _bytes(n: float) -> str:
    for unit, size in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _setup_lines(setup: dict[str, Any]) -> list[str]:
    data, part, lora = setup.get("data") or {}, setup.get("partition") or {}, setup.get("lora") or {}
    files = [Path(p).name for p in [data.get("path", ""), *data.get("extra_paths", [])] if p]
    return [
        f"- model: `{setup.get('model')}`; LoRA r={lora.get('r')} alpha={lora.get('alpha')} on "
        f"{', '.join(lora.get('target_modules', []))} "
        f"({'last ' + str(lora['last_n_layers']) if lora.get('last_n_layers') else 'all'} layers)",
        f"- data: {', '.join(files)}; {setup.get('num_clients')} clients, partition `{part.get('method')}`, "
        f"conflict fraction {part.get('conflict_fraction')}; at most {data.get('max_train_per_client') or 'all'} "
        f"train / {data.get('max_test_per_client') or 'all'} test pairs per client",
        f"- training: {setup.get('rounds')} rounds x {setup.get('local_steps')} local steps x batch "
        f"{setup.get('batch_size')}, lr {setup.get('lr')}, beta {setup.get('beta')}, "
        f"max_length {setup.get('max_length')}",
    ]


def _mean(clients: list[dict[str, Any]], score: str) -> float | None:
    """Mean over clients of ``accuracy_<score>``; None when a client lacks it (e.g. no reward head: no explicit)."""
    values = [c.get(f"accuracy_{score}") for c in clients]
    known = [float(v) for v in values if v is not None]
    return sum(known) / len(known) if known and len(known) == len(values) else None


def _conflict_mark(client: dict[str, Any], n_seeds: int) -> str:
    n = len(client.get("conflict_in_seeds", []))
    return "" if n == 0 else "*" if n == n_seeds else "~"


def _plots(comparison: dict[str, Any]) -> list[str]:
    plots = comparison.get("plots", {})
    return ["", "## Plots", "", *[f"![{name}]({file})" for name, file in plots.items()]] if plots else []


def _evaluation(evaluation: list[str] | None) -> list[str]:
    return ["", "## Behaviour and personalization (`fedpdpo evaluate`)", "", *evaluation] if evaluation else []


def _validation_lines(summary: dict[str, Any]) -> list[str]:
    """The validation curve and where it peaked (nothing for runs without validation pairs or older summaries)."""
    curve = summary.get("mean_val_accuracy_by_round") or {}
    if not curve:
        return []
    best, last = summary["best_val_round"], max(int(r) for r in curve)
    by_round = ", ".join(f"round {r}: {_pct(v)} %" for r, v in sorted(curve.items(), key=lambda kv: int(kv[0])))
    kept = {c["id"]: c["selected_round"] for c in summary["clients"] if "selected_round" in c}
    verdict = "the last round" if best == last else f"round {best} of {last}: later rounds overfit the clients' pairs"
    if kept:
        verdict += (
            "; each client kept the model of the round that did best on its own validation pairs as scorer and "
            "policy (mean of its score's and the implicit reward's accuracy) "
            f'(`select_round = "best_val"`; {", ".join(f"client {c}: round {r}" for c, r in kept.items())}), and '
            "the results above are those rounds'"
        )
    elif best != last:
        verdict += ", so fewer rounds or local steps would do (the results above are those of the last round)"
    return [
        "",
        f"Validation accuracy (the clients' own held-out training pairs, by their score) by round: {by_round}; "
        f"it peaked at {verdict}.",
    ]


def render_run_report(comparison: dict[str, Any], summary: dict[str, Any], evaluation: list[str] | None = None) -> str:
    """The report of one run: its clients' results and curves (no seeds to average, nothing to compare)."""
    run = comparison["run"]
    (name,) = comparison["ranking"]
    algo = comparison["algorithms"][name]
    loss = run["curves"]["train_loss"]
    last = str(summary.get("rounds"))
    lines = [f"# Run report: {run['label']}", "", *_setup_lines(comparison["setup"]), ""]
    lines += [
        "Accuracy = held-out pairwise preference accuracy (chosen ranked above rejected) after the last round (or "
        "the round each client kept, below), by "
        'the score named in the next column (with `eval_score = "auto"` each client\'s own validation pairs chose '
        "it). Implicit, explicit and combined rank by the personalized model's DPO implicit reward, its explicit "
        "reward head and both; global ranks by the global policy (shared LoRA, original head, no local module) on "
        "the same client's pairs: personalized against global. Train loss = mean loss of the client's local steps "
        "in the last round.",
        "",
        "| client | preferences | domains | train / val / test pairs | accuracy % | by | implicit % | explicit % | "
        "combined % | global % | train loss |",
        "|---:|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for c in summary["clients"]:
        client_loss = loss.get(str(c["id"]), {}).get(last)
        lines.append(
            f"| {c['id']} | {'swapped (conflict)' if c.get('conflict') else 'as in the data'} | "
            f"{', '.join(c.get('domains') or []) or '-'} | "
            f"{c.get('n_train', '-')} / {c.get('n_val', '-')} / {c.get('n_test', '-')} | "
            f"{_pct(c['accuracy'])} | {c.get('selected_score', summary.get('eval_score'))} | "
            f"{_pct(c.get('accuracy_implicit'))} | {_pct(c.get('accuracy_explicit'))} | "
            f"{_pct(c.get('accuracy_combined'))} | {_pct(c.get('accuracy_global'))} | "
            f"{'-' if client_loss is None else f'{client_loss:.4f}'} |"
        )
    means = [_pct(_mean(summary["clients"], k)) for k in ("explicit", "combined", "global")]
    lines.append(
        f"| **mean** | | | | **{_pct(algo['mean_accuracy'])}** | | {_pct(algo['mean_accuracy_implicit'])} | "
        + " | ".join(means)
        + " | |"
    )
    by_round = ", ".join(
        f"round {r}: {_pct(v)} %" for r, v in sorted(algo["accuracy_by_round"].items(), key=lambda kv: int(kv[0]))
    )
    lines += [
        "",
        f"Mean accuracy by round: {by_round} (round 0 is before training: every margin is 0 and ties count half).",
        *_validation_lines(summary),
        "",
        f"Sent per client and round: {_bytes(algo['uplink_bytes_per_client_round'])} "
        f"({algo['shared_tensors']} shared tensors), {_bytes(algo['communication_bytes_total'])} in all; "
        f"{algo['time_s_mean']:.0f} s of training and evaluation.",
    ]
    lines += _plots(comparison) + _evaluation(evaluation)
    lines += ["", "## Run", "", f"- `{run['path']}`"]
    return "\n".join(lines) + "\n"


def render_report(comparison: dict[str, Any], evaluation: list[str] | None = None) -> str:
    """The report of a comparison; ``evaluation`` holds the sections of ``fedpdpo evaluate`` (judge, cross-client)
    when run."""
    algos = comparison["algorithms"]
    lines = ["# Comparison report", "", *_setup_lines(comparison["setup"]), ""]
    lines += [
        "Accuracy = held-out pairwise preference accuracy (chosen ranked above rejected, by each algorithm's own "
        "score), averaged over clients after the last round, then mean ± std over seeds. The implicit column ranks "
        "by the DPO implicit reward for every algorithm.",
        "",
        "| rank | algorithm | accuracy % | implicit-reward acc. % | round 0 % | conflict clients % | "
        "other clients % | per-client % | seeds | sent per client-round | total traffic | time per run (s) |",
        "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for rank, name in enumerate(comparison["ranking"], 1):
        a = algos[name]

        def std(value: float, seeds: int = len(a["seeds"])) -> float | None:
            return value if seeds > 1 else None  # one seed has no spread to show

        per_client = " / ".join(
            f"{100 * v:.1f}" + _conflict_mark(c, len(a["seeds"]))
            for v, c in zip(a["per_client_accuracy"], a["clients"], strict=True)
        )
        lines.append(
            f"| {rank} | {name} | {_pct(a['mean_accuracy'], std(a['std_accuracy']))} | "
            f"{_pct(a['mean_accuracy_implicit'], std(a['std_accuracy_implicit']))} | "
            f"{_pct(a['mean_accuracy_round0'])} | "
            f"{_pct(a['accuracy_conflict_clients'])} | {_pct(a['accuracy_other_clients'])} | "
            f"{per_client} | {len(a['seeds'])} | {_bytes(a['uplink_bytes_per_client_round'])} | "
            f"{_bytes(a['communication_bytes_total'])} | {a['time_s_mean']:.0f} |"
        )
    lines += [
        "",
        "Per-client values are means over seeds by client id; `*` marks a client with swapped (conflicting) "
        "preferences in every seed, `~` in some seeds only (the partition, and so the conflicting client, depends "
        "on the seed; the conflict/other columns group clients by their role in each seed). ± is the std over "
        "seeds, shown where an algorithm ran with several.",
        "",
    ]
    problems = comparison["fairness_differences"]
    lines += ["## Fairness check", ""]
    if problems:
        lines += ["These settings differ between runs, so the comparison is NOT like for like:", ""]
        lines += [f"- {p}" for p in problems]
    else:
        lines.append(
            "All runs share model, data, partition, LoRA, optimizer settings and the total number of local "
            "gradient steps."
        )
    lines += _plots(comparison) + _evaluation(evaluation)
    lines += ["", "## Runs", ""]
    for name in comparison["ranking"]:
        lines += [f"- {name}: " + ", ".join(f"`{p}`" for p in algos[name]["runs"])]
    return "\n".join(lines) + "\n"
