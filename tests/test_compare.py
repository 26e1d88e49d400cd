"""``fedpdpo compare`` and ``fedpdpo report``: runs, resume, stale runs, aggregation and the written report."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.errors import FedPDPOError
from fedpdpo.report.compare import Run, build_comparison, load_run
from fedpdpo.sweep import run_comparison
from tests.conftest import TINY_CONFIG

FAST = ["rounds=1", "local_steps=2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compared(tmp_path_factory) -> Path:
    """One real comparison on the tiny config: two algorithms x one seed, through the CLI."""
    out = tmp_path_factory.mktemp("cmp") / "out"
    argv = ["compare", "--config", str(TINY_CONFIG), "--algorithms", "fedpdpo,fedavg", "--seeds", "0", "--out"]
    assert main([*argv, str(out), "--quiet", *[a for s in FAST for a in ("--set", s)]]) == 0
    return out


def test_compare_writes_runs_comparison_report_and_plots(compared: Path):
    for algo in ("fedpdpo", "fedavg"):
        assert (compared / algo / "seed0" / "summary.json").is_file()
    comparison = json.loads((compared / "comparison.json").read_text())
    assert set(comparison["ranking"]) == {"fedpdpo", "fedavg"}
    accs = [comparison["algorithms"][a]["mean_accuracy"] for a in comparison["ranking"]]
    assert accs == sorted(accs, reverse=True)
    assert comparison["fairness_differences"] == []
    fedavg = comparison["algorithms"]["fedavg"]
    summary = json.loads((compared / "fedavg" / "seed0" / "summary.json").read_text())
    assert fedavg["mean_accuracy"] == summary["mean_accuracy"]
    assert fedavg["per_client_accuracy"] == [c["accuracy"] for c in summary["clients"]]
    assert fedavg["communication_bytes_total"] == 2 * summary["communication"]["uplink_bytes_per_client_round"] * 2
    for name in ("accuracy_by_round.png", "per_client_accuracy.png"):
        assert (compared / name).read_bytes()[:8] == PNG_MAGIC
    report = (compared / "report.md").read_text()
    assert "| 1 | " in report and "| 2 | " in report
    assert "![accuracy_by_round](accuracy_by_round.png)" in report


def test_compare_skips_finished_runs_and_refuses_stale_ones(compared: Path):
    summary = compared / "fedavg" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    run_comparison(TINY_CONFIG, ["fedavg"], [0], compared, FAST, quiet=True)
    assert summary.stat().st_mtime_ns == before
    with pytest.raises(FedPDPOError, match=r"different config .*lr"):
        run_comparison(TINY_CONFIG, ["fedavg"], [0], compared, [*FAST, "lr=0.5"], quiet=True)


def test_compare_reruns_an_interrupted_run(tmp_path: Path):
    broken = tmp_path / "local" / "seed0"
    broken.mkdir(parents=True)
    (broken / "metrics.jsonl").write_text('{"round": 0, "client": 0, "accuracy": 0.1}\n')
    comparison = run_comparison(TINY_CONFIG, ["local"], [0], tmp_path, FAST, quiet=True)
    rows = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows].count(0) == 2  # the partial run's rows were replaced, not appended to
    assert comparison["algorithms"]["local"]["uplink_bytes_per_client_round"] == 0


def test_compare_resumes_an_interrupted_run_from_its_checkpoint(compared: Path):
    run = compared / "fedpdpo" / "seed0"
    before = json.loads((run / "summary.json").read_text())
    rows = (run / "metrics.jsonl").read_text()
    (run / "summary.json").unlink()  # as if killed after the last round's checkpoint
    run_comparison(TINY_CONFIG, ["fedpdpo"], [0], compared, FAST, quiet=True)
    after = json.loads((run / "summary.json").read_text())
    assert (run / "metrics.jsonl").read_text() == rows
    assert after["mean_accuracy"] == before["mean_accuracy"]


def test_interrupted_compare_resumes(tmp_path: Path):
    """Killed while running ``centralized`` (whose strategy used to rewrite its saved config, so resuming aborted),
    the same command again continues that run and ends like an uninterrupted comparison."""
    import sys

    from tests.test_resume import _kill_when

    algorithms, overrides = ["centralized", "fedrep"], ["rounds=3", "local_steps=2"]
    cmd = [sys.executable, "-m", "fedpdpo.cli", "compare", "--quiet", "--config", str(TINY_CONFIG)]
    cmd += ["--algorithms", ",".join(algorithms), *[a for s in overrides for a in ("--set", s)], "--out"]
    run = tmp_path / "killed" / "centralized" / "seed0"
    _kill_when(
        [*cmd, str(tmp_path / "killed")],
        lambda: (run / "checkpoint.pt").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 4,
    )
    assert not (run / "summary.json").exists()
    resumed = run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "killed", overrides, quiet=True)
    fresh = run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "fresh", overrides, quiet=True)
    for algo in algorithms:
        a, b = (tmp_path / d / algo / "seed0" for d in ("killed", "fresh"))
        assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    for comparison in (resumed, fresh):
        for algo in algorithms:
            comparison["algorithms"][algo].pop("runs")
            for key in ("time_s_mean", "time_s_total"):
                comparison["algorithms"][algo].pop(key)
    assert resumed == fresh
    assert resumed["fairness_differences"] == []  # centralized ran every client's steps on its one client
    assert load_run(tmp_path / "fresh" / "centralized" / "seed0").step_budget == 3 * 2 * 2


def test_compare_never_deletes_an_interrupted_run_of_another_config(compared: Path, tmp_path: Path):
    import shutil

    run = tmp_path / "fedavg" / "seed0"
    shutil.copytree(compared / "fedavg" / "seed0", run)
    (run / "summary.json").unlink()
    with pytest.raises(FedPDPOError, match=r"different config .*lr"):
        run_comparison(TINY_CONFIG, ["fedavg"], [0], tmp_path, [*FAST, "lr=0.5"], quiet=True)
    assert (run / "checkpoint.pt").is_file() and (run / "metrics.jsonl").is_file()


def test_compare_rejects_unknown_algorithm_before_running(tmp_path: Path, capsys):
    argv = ["compare", "--config", str(TINY_CONFIG), "--algorithms", "fedavg,nope", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "unknown algorithm 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "o" / "fedavg").exists()


def test_report_rebuilds_from_run_dirs(compared: Path, tmp_path: Path):
    out = tmp_path / "rebuilt"
    assert main(["report", str(compared / "fedpdpo"), str(compared / "fedavg" / "seed0"), "--out", str(out)]) == 0
    rebuilt = json.loads((out / "comparison.json").read_text())
    summary = json.loads((compared / "fedavg" / "seed0" / "summary.json").read_text())
    assert set(rebuilt["ranking"]) == {"fedpdpo", "fedavg"}
    assert rebuilt["algorithms"]["fedavg"]["mean_accuracy"] == summary["mean_accuracy"]
    assert (out / "report.md").is_file() and (out / "per_client_accuracy.png").is_file()
    assert main(["report", str(compared / "fedpdpo"), str(compared / "fedavg")]) == 2  # where to? ask for --out
    assert main(["report", str(tmp_path / "missing")]) == 2


def _run(algo: str, seed: int, accs: list[float], conflict: int, lr: float = 0.01, steps: int = 4) -> Run:
    clients = [
        {"id": i, "accuracy": a, "accuracy_implicit": a, "conflict": i == conflict, "local_steps": steps}
        | {"rounds_trained": 1}
        for i, a in enumerate(accs)
    ]
    summary = {
        "algorithm": algo,
        "seed": seed,
        "eval_score": "implicit",
        "mean_accuracy": statistics.fmean(accs),
        "mean_accuracy_round0": 0.5,
        "mean_accuracy_by_round": {"0": 0.5, "1": statistics.fmean(accs)},
        "clients": clients,
        "communication": {
            "shared_parameters": ["x"],
            "uplink_bytes_per_client_round": 10,
            "downlink_bytes_per_client_round": 10,
        },
        "time_s": 3.0,
    }
    config = {"num_clients": 3, "client_fraction": 1.0, "rounds": 1, "local_steps": 4, "lr": lr}
    return Run(Path(f"/x/{algo}/seed{seed}"), summary, config)


def test_aggregation_over_seeds_and_fairness_check():
    runs = [_run("a", 0, [0.9, 0.6, 0.6], conflict=0), _run("a", 1, [0.6, 0.9, 0.6], conflict=1)]
    runs += [_run("b", 0, [0.7, 0.7, 0.7], conflict=0), _run("b", 1, [0.8, 0.8, 0.8], conflict=2)]
    c = build_comparison(runs)
    assert c["ranking"] == ["b", "a"]
    a = c["algorithms"]["a"]
    assert a["mean_accuracy"] == pytest.approx(0.7)
    assert a["std_accuracy"] == pytest.approx(0.0)
    assert a["per_client_accuracy"] == pytest.approx([0.75, 0.75, 0.6])
    assert a["accuracy_conflict_clients"] == pytest.approx(0.9)  # the conflicting client moves with the seed
    assert a["accuracy_other_clients"] == pytest.approx(0.6)
    assert [cl["conflict_in_seeds"] for cl in a["clients"]] == [[0], [1], []]
    assert c["algorithms"]["b"]["std_accuracy"] == pytest.approx(statistics.stdev([0.7, 0.8]))
    assert c["fairness_differences"] == []
    assert c["algorithms"]["a"]["step_budget"] == 12 and c["algorithms"]["a"]["communication_bytes_total"] == 60
    unfair = build_comparison([*runs, _run("c", 0, [0.5] * 3, 0, lr=0.1, steps=8)])
    assert [p.split(" ")[0] for p in unfair["fairness_differences"]] == ["lr", "step_budget"]


def test_report_refuses_runs_that_do_not_say_their_steps(tmp_path: Path):
    summary = {
        "algorithm": "fedavg",
        "seed": 0,
        "mean_accuracy": 0.5,
        "mean_accuracy_by_round": {"0": 0.5},
        "clients": [{"id": 0, "accuracy": 0.5, "accuracy_implicit": 0.5}],
        "communication": {"shared_parameters": [], "uplink_bytes_per_client_round": 0},
        "time_s": 1.0,
    }
    summary["communication"]["downlink_bytes_per_client_round"] = 0
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    (tmp_path / "config.toml").write_text("")
    with pytest.raises(FedPDPOError, match="local steps"):
        load_run(tmp_path)


def test_plot_colours_stay_distinct_for_every_algorithm():
    """tab10 repeats after ten lines; a full comparison (baselines + ablations) has 15 algorithms."""
    from fedpdpo.report.plots import _colors
    from fedpdpo.strategies import STRATEGIES

    assert len(set(_colors(len(STRATEGIES)))) == len(STRATEGIES)


def _figures(monkeypatch) -> list:
    """Keep the figures the plot functions close, to read their titles and legends."""
    from fedpdpo.report import plots

    kept: list = []
    monkeypatch.setattr(plots.plt, "close", kept.append)  # pyplot itself: every plot module's figures
    return kept


def _texts(fig) -> tuple[str, list[str], str]:
    ax = fig.axes[0]
    legend = ax.get_legend()
    return ax.get_title(), [t.get_text() for t in legend.get_texts()] if legend else [], ax.get_ylabel()


def test_report_of_one_run_is_titled_for_that_run(compared: Path, tmp_path: Path, monkeypatch):
    """One run: no 'Comparison report', no fairness check, no ± over a single seed; plots name run and metric."""
    figures = _figures(monkeypatch)
    out = tmp_path / "one"
    assert main(["report", str(compared / "fedpdpo" / "seed0"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# Run report: fedpdpo seed 0 (seed0)\n")
    assert "Comparison" not in report and "Fairness" not in report and "±" not in report
    summary = json.loads((compared / "fedpdpo" / "seed0" / "summary.json").read_text())
    for client in summary["clients"]:
        assert f"| {client['id']} | " in report and f"{100 * client['accuracy']:.2f}" in report
    # personalized against global, per client, with the score each client ranks by (issue 14: report both)
    assert "| accuracy % | by | implicit % | explicit % | combined % | global % |" in report
    assert "Validation accuracy (the clients' own held-out training pairs, by their score) by round: round 1:" in report
    for client in summary["clients"]:
        row = next(line for line in report.splitlines() if line.startswith(f"| {client['id']} | "))
        assert f"| {client['selected_score']} |" in row and f"{100 * client['accuracy_global']:.2f}" in row
    for name in ("accuracy_by_round", "train_loss_by_round", "per_client_accuracy"):
        assert f"![{name}]({name}.png)" in report and (out / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    titles = {_texts(fig)[0]: _texts(fig) for fig in figures}
    accuracy = titles["fedpdpo seed 0 (seed0): held-out accuracy by round"]
    assert "chance (0.5)" in accuracy[1] and "client 0 (conflict)" in accuracy[1]
    assert "validation-chosen score" in accuracy[2]
    loss = titles["fedpdpo seed 0 (seed0): training loss by round"]
    assert "training loss" in loss[2] and "chance (0.5)" not in loss[1]
    assert "chance (0.5)" in titles["fedpdpo seed 0 (seed0): final held-out accuracy per client"][1]


def test_comparison_plots_are_titled_and_show_training_loss(compared: Path, tmp_path: Path, monkeypatch):
    figures = _figures(monkeypatch)
    out = tmp_path / "cmp-report"
    assert main(["report", str(compared / "fedpdpo"), str(compared / "fedavg"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert report.startswith("# Comparison report") and "## Fairness check" in report
    rows = [line for line in report.splitlines() if line.startswith(("| 1 | ", "| 2 | "))]
    assert len(rows) == 2 and not any("±" in row for row in rows)  # one seed each: no spread to show
    comparison = json.loads((out / "comparison.json").read_text())
    assert sorted(comparison["algorithms"]["fedavg"]["train_loss_by_round"]) == ["1"]
    titles = [_texts(fig) for fig in figures]
    assert [t[0] for t in titles] == [
        "cmp-report: held-out accuracy by round (band: std over seeds)",
        "cmp-report: training loss by round (mean over seeds)",
        "cmp-report: final held-out accuracy per client",
    ]
    assert all("chance (0.5)" in t[1] for t in (titles[0], titles[2]))
    assert any(label.startswith("fedpdpo (validation-chosen score") for label in titles[0][1])


def test_validation_curve_and_where_it_peaks():
    """The summary's validation curve reads each client's selected score on its own validation pairs; the run
    report says where it peaked (the earliest of equal rounds) and whether later rounds overfit."""
    from fedpdpo.report.markdown import _validation_lines
    from fedpdpo.report.writer import build_summary, validation_by_round

    def row(rnd: int, client: int, selected: int, val: dict[str, float]) -> dict:
        return {"round": rnd, "client": client, "accuracy": 0.6, "selected_score": float(selected)} | {
            f"val/accuracy_{k}": v for k, v in val.items()
        }

    rows = [{"round": 0, "client": c, "accuracy": 0.5, "selected_score": 0.0} for c in (0, 1)]
    for rnd, (a, b) in enumerate([(0.6, 0.7), (0.8, 0.9), (0.8, 0.9)], start=1):
        rows += [row(rnd, 0, 0, {"implicit": a, "combined": 0.1}), row(rnd, 1, 1, {"implicit": 0.1, "combined": b})]
    assert validation_by_round(rows) == pytest.approx({1: 0.65, 2: 0.85, 3: 0.85})
    summary = build_summary(rows, {"rounds": 3}, [{"id": 0}, {"id": 1}], {})
    assert summary["best_val_round"] == 2
    assert summary["mean_val_accuracy_by_round"] == pytest.approx({"1": 0.65, "2": 0.85, "3": 0.85})
    (line,) = [s for s in _validation_lines(summary) if s]
    assert "round 1: 65.00 %" in line and "peaked at round 2 of 3: later rounds overfit" in line
    summary["best_val_round"] = 3
    assert "peaked at the last round." in _validation_lines(summary)[1]
    without_val = [r for r in rows if r["round"] == 0] + [
        {"round": 1, "client": 0, "accuracy": 0.6, "selected_score": 0.0}
    ]
    summary = build_summary(without_val, {"rounds": 1}, [{"id": 0}], {})
    assert summary["mean_val_accuracy_by_round"] == {} and "best_val_round" not in summary
    assert _validation_lines(summary) == []


def test_run_report_has_the_validation_curve(compared: Path):
    summary = json.loads((compared / "fedpdpo" / "seed0" / "summary.json").read_text())
    assert sorted(summary["mean_val_accuracy_by_round"]) == ["1"] and summary["best_val_round"] == 1


def _untimed_rows(out: Path, algo: str) -> list[dict]:
    lines = (out / algo / "seed0" / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "time" not in k} for line in lines]


def test_parallel_jobs_give_the_runs_of_one_after_another(tmp_path: Path):
    """--jobs runs each run in a worker process of its own; every run's metrics are those of the sequential
    comparison (same thread count), and a second call skips them all."""
    algorithms, overrides = ["fedpdpo", "fedavg", "local"], [*FAST, "threads=1"]
    sequential = run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "seq", overrides, quiet=True)
    argv = ["compare", "--config", str(TINY_CONFIG), "--algorithms", ",".join(algorithms), "--jobs", "3"]
    argv += ["--out", str(tmp_path / "par"), "--quiet", *[a for s in overrides for a in ("--set", s)]]
    assert main(argv) == 0
    for algo in algorithms:
        assert _untimed_rows(tmp_path / "seq", algo) == _untimed_rows(tmp_path / "par", algo)
    parallel = json.loads((tmp_path / "par" / "comparison.json").read_text())
    assert parallel["ranking"] == sequential["ranking"]
    summary = tmp_path / "par" / "fedavg" / "seed0" / "summary.json"
    before = summary.stat().st_mtime_ns
    run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "par", overrides, quiet=True, workers=3)
    assert summary.stat().st_mtime_ns == before


def test_jobs_below_one_is_a_one_line_error(tmp_path: Path, capsys):
    argv = ["compare", "--config", str(TINY_CONFIG), "--algorithms", "fedavg", "--jobs", "0"]
    assert main([*argv, "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip() == "fedpdpo: error: --jobs must be at least 1, got 0"
    assert not (tmp_path / "o").exists()


def test_each_worker_takes_one_gpu_round_robin():
    from fedpdpo.workers import device_for

    assert [device_for(w, ["0", "1", "2"]) for w in range(4)] == ["0", "1", "2", "0"]
    assert device_for(5, ["3"]) is None and device_for(0, []) is None  # one GPU or none: nothing to pin


def test_killed_parallel_compare_leaves_no_run_going_and_resumes(tmp_path: Path):
    """SIGKILL of `compare --jobs 2`: its workers end with it (their runs stop growing), and the same command
    again finishes every run as an uninterrupted comparison would."""
    import sys
    import time

    from tests.test_resume import _kill_when

    algorithms, overrides = ["fedpdpo", "fedavg"], ["rounds=12", "local_steps=2", "threads=1"]
    cmd = [sys.executable, "-m", "fedpdpo.cli", "compare", "--quiet", "--config", str(TINY_CONFIG), "--jobs", "2"]
    cmd += ["--algorithms", ",".join(algorithms), *[a for s in overrides for a in ("--set", s)], "--out"]
    runs = [tmp_path / "killed" / algo / "seed0" for algo in algorithms]
    _kill_when(
        [*cmd, str(tmp_path / "killed")],
        lambda: all(
            (r / "checkpoint.pt").is_file() and (r / "metrics.jsonl").read_text().count("\n") >= 4 for r in runs
        ),
    )
    time.sleep(3)  # the workers' SIGTERM has landed
    sizes = [(r / "metrics.jsonl").stat().st_size for r in runs]
    time.sleep(3)
    assert [(r / "metrics.jsonl").stat().st_size for r in runs] == sizes
    assert not any((r / "summary.json").exists() for r in runs)
    run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "killed", overrides, quiet=True, workers=2)
    run_comparison(TINY_CONFIG, algorithms, [0], tmp_path / "fresh", overrides, quiet=True)
    for algo in algorithms:
        assert _untimed_rows(tmp_path / "killed", algo) == _untimed_rows(tmp_path / "fresh", algo)
