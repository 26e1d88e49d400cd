"""Terminal progress: a rich bar over all client steps of the run (with ETA) and a table per round."""

from __future__ import annotations

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


class RunProgress:
    """Progress bar and per-round table; ``quiet`` turns both off."""

    def __init__(self, total_steps: int, quiet: bool = False) -> None:
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

    def step(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def round_table(self, server_round: int, rows: list[dict]) -> None:
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
