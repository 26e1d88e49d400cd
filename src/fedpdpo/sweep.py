"""The jobs of ``fedpdpo compare``: every algorithm x seed on one config, each an ordinary in-process run.

Every run starts from the same config file and overrides and differs only in ``algorithm`` and ``seed``; each
strategy derives its own modules and instructions from that config, so the saved ``config.toml`` of every run is
the comparison's config with those two keys changed. The report (:mod:`fedpdpo.report.compare`) then reads the
finished runs.

Layout: ``OUT/<algorithm>/seed<k>/`` holds one ordinary run (config.toml, metrics.jsonl, summary.json);
``OUT/comparison.json``, ``OUT/report.md`` and ``OUT/*.png`` are the aggregate. A run whose ``summary.json``
exists is finished and skipped; an interrupted one continues from its last round checkpoint (or starts again when
it has none), so an interrupted comparison is resumed by running the same command again. A run whose saved
config differs from the comparison's is never reused or deleted: that is an error naming the differing keys.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedpdpo.config import RunConfig, config_to_dict, load_config
from fedpdpo.engines.checkpoint import CHECKPOINT_FILE
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.errors import FedPDPOError
from fedpdpo.report.compare import load_run, write_report
from fedpdpo.strategies import get_strategy

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


def run_comparison(
    config: str | Path | RunConfig,
    algorithms: Sequence[str],
    seeds: Sequence[int],
    out: str | Path,
    overrides: Sequence[str] = (),
    quiet: bool = False,
) -> dict[str, Any]:
    """Run (or skip, when finished) every algorithm x seed, then write comparison.json, report.md and plots.

    ``config``: a TOML file (with ``overrides`` applied) or a resolved config (the Python API's)."""
    out = Path(out).resolve()
    base = config if isinstance(config, RunConfig) else load_config(config, list(overrides))
    for algo in algorithms:
        get_strategy(algo)  # unknown names fail before anything runs
    jobs = [(a, s) for a in algorithms for s in seeds]
    for i, (algo, seed) in enumerate(jobs, 1):
        path, run_cfg = run_dir(out, algo, seed), with_run(base, algo, seed)
        if (path / "summary.json").is_file():
            check_stale(path, run_cfg)
            log.info("[%d/%d] %s seed %d: finished earlier, skipped", i, len(jobs), algo, seed)
            continue
        start = time.perf_counter()
        summary = resume_run(path, run_cfg, quiet)
        if summary is None:
            summary = run_inprocess(run_cfg, path, quiet=quiet, overwrite=True)
        log.info(
            "[%d/%d] %s seed %d: mean accuracy %.4f (%.0f s)",
            i,
            len(jobs),
            algo,
            seed,
            summary["mean_accuracy"],
            time.perf_counter() - start,
        )
    runs = [load_run(run_dir(out, a, s)) for a, s in jobs]
    return write_report(runs, out)
