"""The Python API: what the CLI does, callable from a script or a notebook (see docs/api.md).

``fedpdpo.run`` and ``fedpdpo.compare`` take the config as a TOML path, a TOML-shaped dict or a
:class:`~fedpdpo.config.RunConfig`, and the data as the config names it or in memory: a ``datasets.Dataset``
(``DatasetDict``: its splits become the records' ``split``), or a list of dict records, in any format of
:mod:`fedpdpo.data.formats`. In-memory records are checked exactly as a file's (the same validation, the same
``data.on_bad_record`` and ``data.fields``), with their position as location (``data[3]: missing field 'chosen'``),
and then written as JSONL to ``$FEDPDPO_CACHE/data/<digest>.jsonl``, named by a digest of their content: the run's
``config.toml`` points there, as for any data file, so that ``fedpdpo run --resume`` and ``fedpdpo evaluate`` find
them again (a comment in ``config.toml`` says where they came from).

User errors raise :class:`~fedpdpo.errors.FedPDPOError` subclasses with the CLI's one-line messages.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedpdpo.config import RunConfig, config_from_dict, config_to_dict, load_config
from fedpdpo.data.formats import FormatError, normalize
from fedpdpo.errors import DataError, FedPDPOError

#: In-memory data: a datasets.Dataset or DatasetDict, or records (dicts).
Data = Any
Config = str | os.PathLike | Mapping[str, Any] | RunConfig


def _rows(data: Data, name: str) -> Iterable[tuple[str, Any]]:
    """(location, row) of in-memory data; a DatasetDict's split names become the rows' ``split``."""
    if isinstance(data, str | os.PathLike):
        raise FedPDPOError(f"{name}= takes records or a datasets.Dataset; give a file in the config's data.path")
    try:
        import datasets
    except ImportError:  # pragma: no cover (a dependency of fedpdpo)
        datasets = None
    if datasets is not None and isinstance(data, datasets.DatasetDict):
        for split in data:
            for i, row in enumerate(data[split]):
                yield f"{name}[{split!r}][{i}]", {**row, "split": row.get("split") or split}
        return
    if isinstance(data, Mapping) or not isinstance(data, Iterable):
        raise FedPDPOError(
            f"{name}= must be a datasets.Dataset or a list of records (dicts), got {type(data).__name__}"
        )
    yield from ((f"{name}[{i}]", row) for i, row in enumerate(data))


def save_records(data: Data, cfg: RunConfig, name: str = "data") -> tuple[Path, int]:
    """Check in-memory records as a data file would be checked and write them as JSONL under the cache; returns
    the file and the number of records kept."""
    from fedpdpo.client.state import atomic_write
    from fedpdpo.model.backbone import cache_dir

    lines, skipped, first_problem = [], 0, ""
    for where, row in _rows(data, name):
        try:
            normalize(row, cfg.data.fields)
            line = json.dumps(row, ensure_ascii=False, allow_nan=False, sort_keys=True)
        except (FormatError, TypeError, ValueError) as exc:
            problem = f"{where}: {exc}"
            if cfg.data.on_bad_record == "error":
                raise DataError(f'{problem} (use data.on_bad_record = "skip" to drop bad records)') from None
            skipped, first_problem = skipped + 1, first_problem or problem
            continue
        lines.append(line)
    if not lines:
        raise DataError(f"{name}= holds no valid preference records ({skipped} skipped; first: {first_problem})")
    text = "\n".join(lines) + "\n"
    path = cache_dir() / "data" / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    return path, len(lines)


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def resolve_config(
    config: Config, overrides: Sequence[str] = (), data: Data = None, test_data: Data = None
) -> RunConfig:
    """The run config from a TOML path, a dict or a RunConfig, with ``overrides`` (``key=value`` as ``--set``) and
    in-memory ``data`` / ``test_data`` in place of ``data.path`` / ``data.test_path``."""

    def build(extra: Sequence[str]) -> RunConfig:
        sets = [*overrides, *extra]
        if isinstance(config, RunConfig):
            cfg = config_from_dict(config_to_dict(config), sets)
            cfg.given_paths = config.given_paths | cfg.given_paths
            return cfg
        if isinstance(config, Mapping):
            return config_from_dict(dict(config), sets)
        if isinstance(config, str | os.PathLike):
            return load_config(Path(config), sets)
        raise FedPDPOError(f"config must be a TOML file path, a dict or a RunConfig, got {type(config).__name__}")

    sources = (("data.path", "data", data), ("data.test_path", "test_data", test_data))
    given = {key: (name, value) for key, name, value in sources if value is not None}
    if not given:
        return build([])
    draft = build([f"{key}={_toml_string('in-memory')}" for key in given])  # its data.fields and on_bad_record
    saved = {key: save_records(value, draft, name) for key, (name, value) in given.items()}
    cfg = build([f"{key}={_toml_string(str(path))}" for key, (path, _) in saved.items()])
    for key, (_, n) in saved.items():
        cfg.given_paths[key] = f"in-memory data ({n} records) passed to the Python API, saved at this path"
    return cfg


def run(
    config: Config,
    out: str | Path,
    *,
    data: Data = None,
    test_data: Data = None,
    overrides: Sequence[str] = (),
    overwrite: bool = False,
    quiet: bool = False,
) -> dict[str, Any]:
    """Train one federated job in this process, as ``fedpdpo run --config CONFIG --out OUT``; returns the run's
    summary (``summary.json``). ``overrides``: ``key=value`` strings as ``--set``; ``data`` / ``test_data``:
    in-memory data instead of the config's files (see the module doc)."""
    from fedpdpo.cli import offline_env
    from fedpdpo.engines.inprocess import run_inprocess
    from fedpdpo.engines.setup import check_device

    offline_env()
    cfg = resolve_config(config, overrides, data, test_data)
    check_device(cfg.device)
    if cfg.privacy.clipping_norm > 0 or cfg.privacy.secagg:
        raise FedPDPOError("[privacy] (DP clipping and noise, SecAgg+) needs the Flower engines: use the CLI")
    return run_inprocess(cfg, out, quiet=quiet, overwrite=overwrite)


def resume(out: str | Path, *, rounds: int | None = None, quiet: bool = False) -> dict[str, Any]:
    """Continue the run in ``out`` after its last checkpoint (``fedpdpo run --resume OUT [--rounds N]``)."""
    from fedpdpo.cli import offline_env
    from fedpdpo.engines.inprocess import run_inprocess
    from fedpdpo.rundir import resume_source

    offline_env()
    saved = resume_source(Path(out)) / "config.toml"
    if not saved.is_file():
        raise FedPDPOError(f"{out}: no run to resume there (no config.toml)")
    return run_inprocess(load_config(saved), out, quiet=quiet, resume=True, rounds=rounds)


def compare(
    config: Config,
    algorithms: Sequence[str],
    out: str | Path,
    *,
    seeds: Sequence[int] = (0,),
    data: Data = None,
    test_data: Data = None,
    overrides: Sequence[str] = (),
    quiet: bool = False,
    jobs: int = 1,
) -> dict[str, Any]:
    """Run every algorithm x seed on one config and write the comparison report, as ``fedpdpo compare``; returns
    ``comparison.json``'s content (``ranking``, per-algorithm means and stds, ``fairness_differences``). ``jobs``:
    runs at a time, each in its own process (``--jobs``)."""
    from fedpdpo.cli import offline_env
    from fedpdpo.rundir import locked_dir
    from fedpdpo.sweep import run_comparison

    offline_env()
    if isinstance(algorithms, str):
        algorithms = [a.strip() for a in algorithms.split(",") if a.strip()]
    if not algorithms or not seeds:
        raise FedPDPOError("compare needs at least one algorithm and one seed")
    cfg = resolve_config(config, overrides, data, test_data)
    with locked_dir(Path(out)):
        return run_comparison(cfg, list(algorithms), list(seeds), out, quiet=quiet, workers=jobs)
