"""Where the time of a whole run goes: ``fedpdpo run`` + ``fedpdpo report`` (with ``--evaluate`` also the judge and
the matrix, as ``make demo`` runs them), by phase.

Each command runs in its own subprocess, as ``make demo`` runs them, with ``fedpdpo.timing.CLOCK`` switched on
(it always is; the child prints it at exit). Reported per phase: wall and CPU seconds (exclusive, see
:mod:`fedpdpo.timing`); "startup and imports" is the rest of each process's life (interpreter start, imports,
argument parsing, the progress display). The CPU may be shared with other jobs: wall time is stretched by them,
CPU time much less, so both are printed, and ``--src`` lets two checkouts run side by side in one invocation
(alternating order, medians over ``--repeats``) so that they see the same machine conditions.

    python benchmarks/bench_run_phases.py                                  # configs/demo.toml, this checkout
    python benchmarks/bench_run_phases.py --src before=/tmp/old/src --src after=src --repeats 2 --json out.json
    python benchmarks/bench_run_phases.py --set precision=\\"fp32\\" --set rounds=2
    python benchmarks/bench_run_phases.py --evaluate --src before=/tmp/old/src --src after=src --config old_demo.toml

With ``--evaluate`` a source tree whose ``fedpdpo run`` has ``--evaluate`` evaluates in the run's process (as its
``make demo`` does); an older one runs ``fedpdpo evaluate --run`` as a process of its own (as its ``make demo`` did).

A source tree without ``fedpdpo/timing.py`` (older code) still gets its total time, CPU time and accuracies.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Phases in the order of a run (names as the code marks them; "round N: ..." are grouped per round).
ORDER = ("startup and imports", "data", "model load", "tokenization", "reference pass")


def child(args: argparse.Namespace) -> None:
    """Run one command in this process (``--child run|report``) and write its phase totals to ``--result``."""
    started = float(os.environ["BENCH_T0"])  # the parent's clock just before it started this process
    from fedpdpo.cli import main

    if args.child == "run":
        argv = ["run", "--config", args.config, "--out", args.out, "--overwrite"]
        argv += [x for s in args.set for x in ("--set", s)] + (["--evaluate"] if args.evaluate else [])
    elif args.child == "evaluate":
        argv = ["evaluate", "--run", args.out]
    else:
        argv = ["report", args.out]
    rc = main(argv)
    try:
        from fedpdpo.timing import CLOCK

        phases = CLOCK.as_dict()
    except ImportError:  # older source tree
        phases = {}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {
        "rc": rc,
        "wall_s": time.time() - started,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "phases": phases,
    }
    Path(args.result).write_text(json.dumps(result), encoding="utf-8")


def evaluates_in_run(src: str) -> bool:
    """Whether the source tree's ``fedpdpo run`` takes ``--evaluate`` (added on 29 November 2026)."""
    return '"--evaluate"' in (Path(src) / "fedpdpo" / "commands" / "run.py").read_text(encoding="utf-8")


def run_child(src: str, command: str, args: argparse.Namespace, out: Path, evaluate: bool = False) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        result_path = Path(fh.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", command, "--config", args.config]
    cmd += ["--out", str(out), "--result", str(result_path)] + (["--evaluate"] if evaluate else [])
    for item in args.set:
        cmd += ["--set", item]
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join([src, str(ROOT)]),
        "HF_HUB_OFFLINE": "1",
        "BENCH_T0": repr(time.time()),
    }
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{command} with {src} failed (exit {proc.returncode})")
    result = json.loads(result_path.read_text(encoding="utf-8"))
    result_path.unlink()
    accounted = sum(p["wall_s"] for p in result["phases"].values())
    accounted_cpu = sum(p["cpu_s"] for p in result["phases"].values())
    result["phases"]["startup and imports"] = {
        "wall_s": result["wall_s"] - accounted,
        "cpu_s": result["cpu_s"] - accounted_cpu,
        "calls": 1,
    }
    return result


def one_run(label: str, src: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "demo"
        load0 = os.getloadavg()[0]
        in_run = args.evaluate and evaluates_in_run(src)
        run = run_child(src, "run", args, out, evaluate=in_run)
        parts = {"run": run}
        if args.evaluate and not in_run:
            parts["evaluate"] = run_child(src, "evaluate", args, out)
        report = parts["report"] = run_child(src, "report", args, out)
        summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
        disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    phases: dict[str, dict[str, float]] = {}
    for command, part in parts.items():
        for name, p in part["phases"].items():
            name = f"{command}: {name}" if command != "run" and name == "startup and imports" else name
            slot = phases.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0})
            slot["wall_s"] += p["wall_s"]
            slot["cpu_s"] += p["cpu_s"]
    return {
        "label": label,
        "src": src,
        "wall_s": sum(part["wall_s"] for part in parts.values()),
        "cpu_s": sum(part["cpu_s"] for part in parts.values()),
        "run_wall_s": run["wall_s"],
        "report_wall_s": report["wall_s"],
        "evaluate_in_run": in_run,
        "peak_rss_bytes": run["peak_rss_bytes"],
        "load_before": load0,
        "load_after": os.getloadavg()[0],
        "phases": phases,
        "run_dir_bytes": disk,
        "mean_accuracy": summary["mean_accuracy"],
        "mean_accuracy_by_round": summary["mean_accuracy_by_round"],
        "client_accuracy": [c["accuracy"] for c in summary["clients"]],
        "precision": summary.get("precision_used", summary.get("precision")),
    }


def phase_key(name: str) -> tuple[int, int, str]:
    """Sort phases as a run meets them: setup, then rounds in order, then the end of the run."""
    if name in ORDER:
        return (0, ORDER.index(name), name)
    if name.startswith("round "):
        return (1, int(name.split(":")[0].split()[1]), name)
    return (2, 0, name)


def table(labels: list[str], runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    names = sorted({n for rs in runs.values() for r in rs for n in r["phases"]}, key=phase_key)
    head = "| phase | " + " | ".join(f"{lab} wall s | {lab} CPU s" for lab in labels) + " |"
    lines = [head, "|---|" + "---:|---:|" * len(labels)]

    def med(label: str, name: str, key: str) -> float:
        return statistics.median(r["phases"].get(name, {}).get(key, 0.0) for r in runs[label])

    for name in names:
        cells = " | ".join(f"{med(lab, name, 'wall_s'):.1f} | {med(lab, name, 'cpu_s'):.1f}" for lab in labels)
        lines.append(f"| {name} | {cells} |")
    totals = " | ".join(
        f"**{statistics.median(r['wall_s'] for r in runs[lab]):.1f}** | "
        f"**{statistics.median(r['cpu_s'] for r in runs[lab]):.1f}**"
        for lab in labels
    )
    lines.append(f"| **total** (every process: `fedpdpo run`, `evaluate` when separate, `report`) | {totals} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.toml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (both sides)")
    p.add_argument(
        "--src",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="a source tree to run (its src/ directory); repeat to compare checkouts side by side (default: this one)",
    )
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--evaluate", action="store_true", help="also the judge and the matrix, as `make demo` runs them")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--child", choices=["run", "evaluate", "report"], help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    sources = [s.split("=", 1) for s in args.src] or [["this", str(ROOT / "src")]]
    labels = [label for label, _ in sources]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for rep in range(args.repeats):
        order = sources if rep % 2 == 0 else sources[::-1]
        for label, src in order:
            r = one_run(label, str(Path(src).resolve()), args)
            runs[label].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {label}: total {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU, "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, load {r['load_before']:.1f} -> "
                f"{r['load_after']:.1f}, accuracy by round {r['mean_accuracy_by_round']}, precision {r['precision']}",
                flush=True,
            )
    print()
    print("\n".join(table(labels, runs)))
    if len(labels) == 2:
        a, b = labels
        ratios = [x["wall_s"] / y["wall_s"] for x, y in zip(runs[a], runs[b], strict=True)]
        cpu = [x["cpu_s"] / y["cpu_s"] for x, y in zip(runs[a], runs[b], strict=True)]
        print(f"per-repeat total wall ratios ({a}/{b}): {', '.join(f'{x:.2f}' for x in ratios)}")
        print(f"per-repeat total CPU ratios ({a}/{b}): {', '.join(f'{x:.2f}' for x in cpu)}")
        print(f"ratio_wall={statistics.median(ratios):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": runs}, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
