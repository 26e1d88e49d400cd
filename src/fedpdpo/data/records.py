"""Load and validate preference pairs from JSONL, parquet or a local Hugging Face ``datasets`` directory.

Every record is checked before any training starts. A bad record raises :class:`DataError` naming the file and
the line (JSONL) or row (parquet / datasets), unless ``on_bad_record="skip"``, in which case bad records are
counted and the first few problems are kept for the log.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fedpdpo.data.formats import STANDARD_FIELDS, FormatError, Text, normalize
from fedpdpo.errors import DataError


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair. ``extras`` keeps any other fields (provenance, labels) unchanged.

    ``prompt`` is text or a conversation (a tuple of ``(role, content)`` messages, see :mod:`fedpdpo.data.formats`);
    the responses are text.
    """

    prompt: Text
    chosen: str
    rejected: str
    domain: str = ""
    split: str = ""
    extras: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    source: str = field(default="", compare=False, hash=False)  # "file:line", for messages

    def swapped(self) -> PreferenceRecord:
        """The same pair seen by a client with the opposite taste (it prefers the rejected side)."""
        return PreferenceRecord(
            self.prompt, self.rejected, self.chosen, self.domain, self.split, self.extras, self.source
        )


@dataclass
class LoadReport:
    """What loading found: how many records were read, kept and skipped, and the first problems."""

    path: str
    n_read: int = 0
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)


def validate_record(obj: Any, fields: Mapping[str, str] | None = None) -> str | None:
    """Return a description of what is wrong with ``obj`` as a preference record, or None if it is valid."""
    try:
        normalize(obj, fields)
    except FormatError as exc:
        return str(exc)
    return None


def _to_record(row: dict[str, Any], source: str) -> PreferenceRecord:
    extras = {k: v for k, v in row.items() if k not in STANDARD_FIELDS}
    return PreferenceRecord(row["prompt"], row["chosen"], row["rejected"], row["domain"], row["split"], extras, source)


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, parsed object or an exception) for each non-blank line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # tolerate a byte-order mark
            except UnicodeDecodeError as exc:
                yield (
                    where,
                    DataError(f"{where}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8"),
                )
                continue
            if not text.strip():
                continue
            try:
                yield where, json.loads(text.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                yield where, DataError(f"{where}: malformed JSON at column {exc.colno}: {exc.msg}")
            except RecursionError:
                yield where, DataError(f"{where}: JSON nested too deeply to be a preference record")


def _iter_table(path: Path) -> Iterator[tuple[str, Any]]:
    """Rows of a parquet file or a ``datasets.save_to_disk`` directory, with 1-based row numbers."""
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise DataError(f"{path}: not a Hugging Face datasets directory ({exc})") from None
        if isinstance(ds, datasets.DatasetDict):
            rows: Iterable[tuple[str, dict[str, Any]]] = (
                (f"{path}[{split}] row {i + 1}", {**row, "split": row.get("split") or split})
                for split in ds
                for i, row in enumerate(ds[split])
            )
        else:
            rows = ((f"{path} row {i + 1}", row) for i, row in enumerate(ds))
        yield from rows
        return
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:
        raise DataError(f"{path}: cannot read parquet file ({exc})") from None
    for i, row in enumerate(table.to_pylist()):
        yield f"{path} row {i + 1}", row


def load_records(
    path: str | Path,
    on_bad_record: Literal["error", "skip"] = "error",
    max_problems: int = 5,
    fields: Mapping[str, str] | None = None,
) -> tuple[list[PreferenceRecord], LoadReport]:
    """Load all valid records from ``path`` (``.jsonl``/``.json`` lines, ``.parquet``, or a datasets directory),
    in any of the formats of :mod:`fedpdpo.data.formats` (``fields`` renames columns first)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    report = LoadReport(path=str(path))
    rows = _iter_jsonl(path) if path.is_file() and path.suffix != ".parquet" else _iter_table(path)
    records: list[PreferenceRecord] = []
    for where, obj in rows:
        report.n_read += 1
        row, problem = None, str(obj) if isinstance(obj, DataError) else ""
        if not problem:
            try:
                row = normalize(obj, fields)
            except FormatError as exc:
                problem = f"{where}: {exc}"
        if row is None:
            if on_bad_record == "error":
                raise DataError(problem + " (use --on-bad-record skip to drop bad records)")
            report.n_skipped += 1
            if len(report.problems) < max_problems:
                report.problems.append(problem)
            continue
        records.append(_to_record(row, where))
    if not records:
        raise DataError(f"{path}: no valid preference records found ({report.n_skipped} skipped)")
    return records, report


def check_file(path: str | Path, fields: Mapping[str, str] | None = None) -> list[str]:
    """Every problem in a data file as ``FILE:LINE: problem`` lines (empty when the file is clean)."""
    path = Path(path)
    if not path.exists():
        return [f"{path}: does not exist"]
    rows = _iter_jsonl(path) if path.is_file() and path.suffix != ".parquet" else _iter_table(path)
    problems = []
    n_rows = 0
    try:
        for where, obj in rows:
            n_rows += 1
            if isinstance(obj, DataError):
                problems.append(str(obj))
            elif reason := validate_record(obj, fields):
                problems.append(f"{where}: {reason}")
    except DataError as exc:
        return [*problems, str(exc)]
    if not n_rows:  # load_records, and so every run, refuses such a file
        problems.append(f"{path}: no preference records (the file is empty or holds only blank lines)")
    return problems
