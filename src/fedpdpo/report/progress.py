"""Terminal progress: a rich bar over all client steps of the run (with ETA) and a table per round.

``fedpdpo run --json-logs`` (:func:`use_json_logs`) replaces both with JSON lines on stderr, one object per event
(``phase``, ``step`` with loss and ETA, ``round`` with every client's metrics, ``log`` for log records), for
log collectors and scripts; stdout keeps the single JSON result line.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from fedpdpo.jsonio import dumps

#: Where JSON event lines go when :func:`use_json_logs` is on (process-wide: the engines create RunProgress).
_json_stream: TextIO | None = None


def emit_json(event: str, **fields: Any) -> None:
    if _json_stream is not None:
        _json_stream.write(dumps({"event": event, "time": round(time.time(), 3), **fields}) + "\n")
        _json_stream.flush()


class JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"event": "log", "time": round(record.created, 3), "level": record.levelname.lower()}
        entry |= {"logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return dumps(entry)


def use_json_logs(stream: TextIO | None = None) -> None:
    """Switch progress, round tables and log records of this process to JSON lines on ``stream`` (stderr)."""
    global _json_stream
    _json_stream = stream or sys.stderr
    handler = logging.StreamHandler(_json_stream)
    handler.setFormatter(JsonLogFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)


class RunProgress:
    """Progress bar and per-round table; ``quiet`` turns both off; :func:`use_json_logs` turns them into JSON."""

    def __init__(self, total_steps: int, quiet: bool = False) -> None:
        self.json = _json_stream is not None
        quiet = quiet or self.json
        self.total_steps = total_steps
        self.done = 0
        self.start = time.perf_counter()
        self.console = Console(stderr=True, quiet=quiet)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            disable=quiet,
        )
        self.task = self.progress.add_task("setup", total=total_steps, loss="-")

    def __enter__(self) -> RunProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def describe(self, text: str) -> None:
        self.progress.update(self.task, description=text)
        emit_json("phase", text=text)

    def step(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")
        self.done += 1
        if self.json:
            task = self.progress.tasks[0]  # rich's own speed estimate, the same as the bar's ETA column
            eta = task.time_remaining
            emit_json(
                "step",
                step=self.done,
                total=self.total_steps,
                loss=loss,
                elapsed_s=round(time.perf_counter() - self.start, 2),
                eta_s=None if eta is None else round(eta, 1),
            )

    def round_table(self, server_round: int, rows: list[dict]) -> None:
        if self.json:
            mean = sum(r["accuracy"] for r in rows) / len(rows)
            emit_json("round", round=server_round, mean_accuracy=mean, clients=rows)
            return
        table = Table(title=f"round {server_round}", show_edge=False)
        for col in ("client", "conflict", "train loss", "accuracy", "acc implicit", "acc explicit", "margin"):
            table.add_column(col, justify="right")
        for r in rows:
            table.add_row(
                str(r["client"]),
                "yes" if r.get("conflict") else "",
                f"{r['train/loss']:.4f}" if "train/loss" in r else "-",
                f"{r['accuracy']:.3f}",
                f"{r['accuracy_implicit']:.3f}",
                f"{r['accuracy_explicit']:.3f}" if "accuracy_explicit" in r else "-",
                f"{r['reward_margin']:+.4f}",
            )
        mean = sum(r["accuracy"] for r in rows) / len(rows)
        table.caption = f"mean accuracy {mean:.3f}"
        self.console.print(table)
