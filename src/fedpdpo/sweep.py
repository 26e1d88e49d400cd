"""The jobs of ``fedpdpo compare``: every algorithm x seed on one config, each an ordinary in-process run.

Every run starts from the same config file and overrides and differs only in ``algorithm`` and ``seed``; each
strategy derives its own modules and instructions from that config, so the saved ``config.toml`` of every run is
the comparison's config with those two keys changed. The report (:mod:`fedpdpo.report.compare`) then reads the
finished runs.

Layout: ``OUT/<algorithm>/seed<k>/`` holds one ordinary run (config.toml, metrics.jsonl, summary.json);
``OUT/comparison.json``, ``OUT/report.md`` and ``OUT/*.png`` are the aggregate. A run whose ``summary.json``
exists is finished and skipped; an interrupted one continues from its last round checkpoint (or starts again when
it has none), so an interrupted comparison is resumed by running the same command again. Runs go one after another
in this process, or several at a time in worker processes (``workers``, :func:`execute`). A run whose saved
config differs from the comparison's is never reused or deleted: that is an error naming the differing keys.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpdpo.config import RunConfig, config_to_dict, load_config
from fedpdpo.engines.checkpoint import CHECKPOINT_FILE
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.errors import FedPDPOError
from fedpdpo.report.compare import load_run, write_report
from fedpdpo.strategies import get_strategy
from fedpdpo.workers import cuda_devices, init_worker

log = logging.getLogger(__name__)


def run_dir(out: Path, algorithm: str, seed: int) -> Path:
    return out / algorithm / f"seed{seed}"


def with_run(cfg: RunConfig, algorithm: str, seed: int) -> RunConfig:
    """The comparison's config for one run: only ``algorithm`` and ``seed`` change."""
    run_cfg = copy.deepcopy(cfg)
    run_cfg.algorithm, run_cfg.seed = algorithm, seed
    return run_cfg


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_stale(path: Path, expected: RunConfig) -> None:
    """Refuse to reuse a run whose saved config differs from what this comparison would run."""
    # read through load_config so that keys added to the config since the run started count with their default
    saved = _flatten(config_to_dict(load_config(path / "config.toml")))
    want = _flatten(config_to_dict(expected))
    diff = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
    if diff:
        raise FedPDPOError(
            f"{path} holds a run with a different config ({', '.join(diff[:5])}); "
            "use a new --out directory or delete that run"
        )


def resume_run(path: Path, expected: RunConfig, quiet: bool) -> dict[str, Any] | None:
    """Continue an interrupted run of the same config after its last checkpoint; None when there is nothing to
    continue (no config or no checkpoint yet), in which case the caller starts it again.

    An interrupted run with a *different* config is an error, never deleted: it may hold hours of training.
    """
    if not (path / "config.toml").is_file() or not (path / CHECKPOINT_FILE).is_file():
        return None
    check_stale(path, expected)
    return run_inprocess(load_config(path / "config.toml"), path, quiet=quiet, resume=True)


@dataclass(frozen=True)
class Job:
    """One run of a comparison (or of a tuning grid): its directory, its config and how progress names it."""

    path: Path
    cfg: RunConfig
    label: str


def plan(base: RunConfig, algorithms: Sequence[str], seeds: Sequence[int], out: Path, prefix: str = "") -> list[Job]:
    """Every algorithm x seed of ``base`` under ``out`` (unknown algorithm names fail here, before anything runs)."""
    for algo in algorithms:
        get_strategy(algo)
    return [Job(run_dir(out, a, s), with_run(base, a, s), f"{prefix}{a} seed {s}") for a in algorithms for s in seeds]


def run_job(job: Job, quiet: bool) -> dict[str, Any]:
    """Continue the job's interrupted run after its last checkpoint, else start it afresh; returns its summary."""
    summary = resume_run(job.path, job.cfg, quiet)
    return summary if summary is not None else run_inprocess(job.cfg, job.path, quiet=quiet, overwrite=True)


def execute(jobs: Sequence[Job], quiet: bool = False, workers: int = 1) -> None:
    """Run every job whose run has not finished (a finished one is checked against its config and skipped).

    ``workers > 1`` runs that many at a time, each in a process of its own (spawned, so CUDA starts clean there),
    with the machine's cores shared between them and, where there are several GPUs, each worker on one of them.
    Why processes: a run holds one model and its CUDA context; separate runs overlap their host work and their
    GPU kernels (12 at a time on one H200 gave about 2.2x the throughput of one after another, docs/performance.md).
    Every run's result is the same as when run alone with the same thread count. A failing run does not stop the
    others; the first failure is raised once they have finished, and every finished run stays (re-run to resume).
    """
    todo = []
    for job in jobs:
        if (job.path / "summary.json").is_file():
            check_stale(job.path, job.cfg)
            log.info("%s: finished earlier, skipped", job.label)
        else:
            todo.append(job)
    if workers <= 1 or len(todo) <= 1:
        for i, job in enumerate(todo, 1):
            start = time.perf_counter()
            _finished(i, len(todo), job, run_job(job, quiet), start)
        return
    workers = min(workers, len(todo))
    ctx = multiprocessing.get_context("spawn")
    threads = max(1, (os.cpu_count() or 1) // workers)
    init = (ctx.Value("i", 0), cuda_devices(), threads, os.getpid())
    errors: list[BaseException] = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=init) as pool:
        started = {pool.submit(run_job, job, True): (job, time.perf_counter()) for job in todo}
        try:
            for i, future in enumerate(as_completed(started), 1):
                job, start = started[future]
                try:
                    _finished(i, len(todo), job, future.result(), start)
                except Exception as exc:  # reported, and the first raised, once the other runs are done
                    log.error("[%d/%d] %s failed: %s", i, len(todo), job.label, exc)
                    errors.append(exc)
        except BaseException:  # Ctrl-C: start no queued run; the workers end with this process (init_worker)
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    if errors:
        raise errors[0]


def _finished(i: int, n: int, job: Job, summary: dict[str, Any], start: float) -> None:
    log.info(
        "[%d/%d] %s: mean accuracy %.4f (%.0f s)",
        i,
        n,
        job.label,
        summary["mean_accuracy"],
        time.perf_counter() - start,
    )


def run_comparison(
    config: str | Path | RunConfig,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    workers: int = 1,
) -> dict[str, Any]:
    """Run (or skip, when finished) every algorithm x seed, then write comparison.json, report.md and plots.

    ``config``: a TOML file (with ``overrides`` applied) or a resolved config (the Python API's); ``workers``: runs
    at a time (:func:`execute`)."""
    out = Path(out).resolve()
    base = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    jobs = plan(base, algorithms, seeds, out)
    execute(jobs, quiet, workers)
    return write_report([load_run(job.path) for job in jobs], out)
