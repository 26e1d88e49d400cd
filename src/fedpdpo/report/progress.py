"""Progress of a run: one display from setup to the last evaluation, with an ETA, and a table per round.

What a person sees depends on where stderr goes:

* a terminal: one live line (phase, bar, running mean loss, elapsed time, ETA) and a table after each evaluation;
* a file or pipe: plain lines, one when a phase begins and one every :data:`PLAIN_EVERY_S` seconds within it, and
  the same tables (a live bar written to a log file is a mess of control characters);
* ``fedpdpo run --json-logs`` (:func:`use_json_logs`): JSON lines on stderr, one object per event: ``phase`` (setup
  stages, training, evaluation), ``setup`` (what was loaded, how long it took), ``step`` (loss, running mean, ETA),
  ``eval`` (one per client and evaluation), ``round`` (every client's metrics) and ``log`` (log records), for log
  collectors and scripts; stdout keeps the single JSON result line;
* ``--quiet``: nothing.

The ETA comes from :class:`EtaModel`: the work still planned (training steps, client evaluations) times the measured
cost of each kind of work.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpdpo.jsonio import dumps

#: Where JSON event lines go when :func:`use_json_logs` is on (process-wide: the engines create RunProgress).
_json_stream: TextIO | None = None
#: Seconds between two plain progress lines within a phase, when stderr is not a terminal.
PLAIN_EVERY_S = 30.0


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


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def expected_new_pairs(steps: dict[int, dict[int, int]], batch_size: int, n_train: dict[int, int]) -> dict[int, float]:
    """Per round, the expected number of training pairs visited for the first time in the run, over the clients that
    train (``steps``: round -> client -> local steps). A round visits ``steps * batch_size`` of a client's ``n``
    pairs in a fresh random order (all of them when that is more), so a pair is still unvisited after a round with
    probability ``1 - visited / n``."""
    unseen = dict.fromkeys(n_train, 1.0)  # share of each client's pairs not visited yet
    new: dict[int, float] = {}
    for r in sorted(steps):
        new[r] = 0.0
        for client, k in steps[r].items():
            n = n_train.get(client, 0)
            if n:
                visited = min(k * batch_size, n) / n
                new[r] += n * unseen[client] * visited
                unseen[client] *= 1 - visited
    return new


class EtaModel:
    """Seconds left in a run: the work still planned times the measured cost of each kind of work.

    Phases are contiguous (a phase lasts until the next one begins, so no time goes uncounted) and of two kinds:

    * **evaluation**, per client evaluated: the latest evaluation's cost per client (checkpoint included). The first
      one also computes the frozen-prefix states and reference log-probs of every held-out pair, which later ones
      read from the caches, so it is the dearest.
    * **training**, ``a`` seconds per local step (aggregation included) plus ``b`` per training pair visited for the
      first time: its frozen-prefix states and reference log-probs are computed then and cached, so the first round
      costs most and later rounds less as fewer of their pairs are new. ``b`` is that same work per pair as the
      evaluations measure it, ``(first - latest evaluation time) / held-out pairs``; ``a`` is what the latest training
      round took beyond its new pairs, per step. The expected new pairs per round come from the clients' data sizes
      (:func:`expected_new_pairs`; without them, as for remote clients, every step costs the same).

    Within a phase, its own rate so far is blended in by the share of the phase done. Before a kind was ever
    measured the ETA is unknown (None).
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self.clock = clock
        self.left: dict[str, dict[int, int]] | None = None  # kind -> round -> units still planned (None: no plan yet)
        self.new_pairs: dict[int, float] = {}  # round -> expected training pairs visited for the first time
        self.test_pairs = 0  # held-out pairs of all clients (what the first evaluation computes afresh)
        self.eval_cost: float | None = None  # seconds per client, latest evaluation
        self.first_eval: float | None = None  # seconds of the round-0 evaluation
        self.last_fit: tuple[float, int, float] | None = None  # latest training phase: seconds, steps, new pairs
        self.pair_cost = 0.0  # b: seconds per training pair visited for the first time
        self.phase: tuple[str, int] | None = None
        self.phase_start = 0.0
        self.phase_units = 0  # planned units of the current phase
        self.done = 0  # units of the current phase done

    def plan(
        self,
        fit_steps: dict[int, int],
        evals: dict[int, int],
        new_pairs: dict[int, float] | None = None,
        test_pairs: int = 0,
    ) -> None:
        """The work ahead: training steps and client evaluations by round, and (when the data sizes are known) the
        expected new training pairs by round and the number of held-out pairs."""
        self.left = {"fit": dict(fit_steps), "eval": dict(evals)}
        self.new_pairs = dict(new_pairs or {})
        self.test_pairs = test_pairs

    def begin(self, kind: str, server_round: int) -> None:
        """A phase of ``kind`` ("fit" or "eval") begins for ``server_round``; the previous phase ends."""
        self.end()
        self.phase = (kind, server_round)
        self.phase_start = self.clock()
        self.phase_units = self.left[kind].get(server_round, 0) if self.left else 0
        self.done = 0

    def advance(self, units: int = 1) -> None:
        self.done += units

    def end(self) -> None:
        """The current phase is over: it becomes the measurement of its kind."""
        if self.phase is None:
            return
        kind, server_round = self.phase
        elapsed = self.clock() - self.phase_start
        units = max(self.done, self.phase_units)  # a remote engine may report less than was planned
        if units and kind == "eval":
            self.eval_cost = elapsed / units
            if server_round == 0:
                self.first_eval = elapsed
            elif self.first_eval is not None and self.test_pairs:
                self.pair_cost = max(0.0, (self.first_eval - elapsed) / self.test_pairs)
        elif units:
            self.last_fit = (elapsed, units, self.new_pairs.get(server_round, 0.0))
        if self.left:
            self.left[kind].pop(server_round, None)
        self.phase = None

    def _step_cost(self) -> float | None:
        """``a``: seconds per step beyond the new pairs, from the latest training phase blended with the current."""
        prev = None
        if self.last_fit is not None:
            seconds, steps, new = self.last_fit
            prev = max((seconds - self.pair_cost * new) / steps, 0.25 * seconds / steps)
        if self.phase is None or self.phase[0] != "fit" or self.done == 0:
            return prev
        elapsed = self.clock() - self.phase_start
        share = min(1.0, self.done / max(1, self.phase_units))
        new_so_far = self.new_pairs.get(self.phase[1], 0.0) * share
        rate = max((elapsed - self.pair_cost * new_so_far) / self.done, 0.25 * elapsed / self.done)
        return rate if prev is None else share * rate + (1 - share) * prev

    def _eval_cost(self) -> float | None:
        if self.phase is None or self.phase[0] != "eval" or self.done == 0:
            return self.eval_cost
        rate = (self.clock() - self.phase_start) / self.done
        if self.eval_cost is None:
            return rate
        share = min(1.0, self.done / max(1, self.phase_units))
        return share * rate + (1 - share) * self.eval_cost

    def remaining(self) -> float | None:
        if self.left is None:
            return None
        total = 0.0
        for kind, rounds in self.left.items():
            for server_round, units in rounds.items():
                share_left = 1.0
                if self.phase == (kind, server_round):
                    share_left = max(0, units - self.done) / units if units else 0.0
                if share_left <= 0:
                    continue
                cost = self._step_cost() if kind == "fit" else self._eval_cost()
                if cost is None:
                    return None
                total += share_left * units * cost
                if kind == "fit":
                    total += share_left * self.pair_cost * self.new_pairs.get(server_round, 0.0)
        return total


class RunProgress:
    """The progress display of one run (see the module doc); ``quiet`` turns it off.

    Engines report what happens: :meth:`stage` during setup, :meth:`plan` once the work is known, then
    :meth:`begin_fit` / :meth:`step` and :meth:`begin_eval` / :meth:`client_done` / :meth:`evaluated` per round,
    and :meth:`finish`.
    """

    def __init__(self, quiet: bool = False, clock: Callable[[], float] = time.perf_counter) -> None:
        self.json = _json_stream is not None
        self.console = Console(stderr=True, quiet=quiet or self.json)
        shown = not (quiet or self.json)
        self.live = shown and self.console.is_terminal
        self.plain = shown and not self.console.is_terminal
        self.clock = clock
        self.start = clock()
        self.eta = EtaModel(clock)
        self.n_train: dict[int, int] = {}
        self.test_pairs = 0
        self.rounds = 0
        self.total_steps = 0
        self.steps_done = 0
        self.losses: list[float] = []  # the current round's step losses
        self.text = "setup"
        self.detail = ""
        self.last_plain = -PLAIN_EVERY_S
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            TextColumn("ETA {task.fields[eta]}"),
            console=self.console,
            disable=not self.live,
        )
        self.task = self.bar.add_task("setup", total=1.0, detail="", eta="-")

    def __enter__(self) -> RunProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    # -- what the engines report ----------------------------------------------------------------------------------
    def stage(self, text: str) -> None:
        """A setup stage begins (reading data, loading the model, tokenizing)."""
        self._phase(f"setup: {text}", "setup", None)

    def setup_done(self, **facts: Any) -> None:
        """Setup is over; ``facts`` (clients, pairs, model) go into the ``setup`` event and the plain log."""
        elapsed = self.clock() - self.start
        emit_json("setup", elapsed_s=round(elapsed, 2), **facts)
        if self.plain:
            described = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in facts.items())
            self._line(f"setup done in {format_seconds(elapsed)}: {described}")

    def data_sizes(self, n_train: dict[int, int], test_pairs: int) -> None:
        """Each client's number of training pairs and the held-out pairs of all (engines that know them): they let
        the ETA tell the first visit of a pair from later ones."""
        self.n_train, self.test_pairs = dict(n_train), test_pairs

    def plan(
        self, steps: dict[int, dict[int, int]], eval_rounds: list[int], clients: int, rounds: int, batch_size: int
    ) -> None:
        """The work ahead: local steps per round and client, the rounds still to evaluate (all ``clients`` each)."""
        fit_steps = {r: sum(by_client.values()) for r, by_client in steps.items()}
        new_pairs = expected_new_pairs(steps, batch_size, self.n_train) if self.n_train else None
        self.eta.plan(fit_steps, {r: clients for r in eval_rounds}, new_pairs, self.test_pairs)
        self.rounds = rounds
        self.total_steps = sum(fit_steps.values())

    def begin_fit(self, server_round: int) -> None:
        self.eta.begin("fit", server_round)
        self.losses = []
        self._phase(f"round {server_round}/{self.rounds} fit", "fit", server_round)

    def step(self, loss: float) -> None:
        """One local training step is done (a remote client reports its steps at once, with its mean loss)."""
        self.eta.advance()
        self.steps_done += 1
        self.losses.append(loss)
        mean = statistics.fmean(self.losses)
        self.detail = f"step {self.eta.done}/{self.eta.phase_units} · loss {mean:.4f} (round mean)"
        eta = self.eta.remaining()
        emit_json(
            "step",
            step=self.steps_done,
            total=self.total_steps,
            round_step=self.eta.done,
            round_steps=self.eta.phase_units,
            loss=loss,
            mean_loss=mean,
            elapsed_s=round(self.clock() - self.start, 2),
            eta_s=None if eta is None else round(eta, 1),
        )
        self._refresh(eta)

    def begin_eval(self, server_round: int) -> None:
        self.eta.begin("eval", server_round)
        self._phase(f"round {server_round}/{self.rounds} eval", "eval", server_round)

    def client_done(self, note: str = "") -> None:
        """One client's evaluation is done (engines that evaluate client by client report each)."""
        self.eta.advance()
        self.detail = f"client {self.eta.done}/{self.eta.phase_units}{' · ' + note if note else ''}"
        self._refresh(self.eta.remaining())

    def evaluated(self, server_round: int, rows: list[dict[str, Any]]) -> None:
        """The evaluation of ``server_round`` is over: an ``eval`` event per client, and the round's table."""
        eta = self.eta.remaining()
        for row in rows:
            metrics = {k: v for k, v in row.items() if k.startswith("accuracy") or k in ("reward_margin", "loss")}
            emit_json("eval", round=server_round, client=row["client"], **metrics)
        if rows:
            self.round_table(server_round, rows, eta)

    def finish(self) -> None:
        self.eta.end()
        elapsed = self.clock() - self.start
        self.bar.update(self.task, description="done", completed=1.0, detail="", eta="0:00:00")
        emit_json("phase", kind="done", text="done", elapsed_s=round(elapsed, 2))
        if self.plain:
            self._line(f"done in {format_seconds(elapsed)}")

    # -- display --------------------------------------------------------------------------------------------------
    def _phase(self, text: str, kind: str, server_round: int | None) -> None:
        self.text, self.detail = text, ""
        eta = self.eta.remaining()
        emit_json("phase", kind=kind, text=text, round=server_round, eta_s=None if eta is None else round(eta, 1))
        self._refresh(eta, force_line=True)

    def _refresh(self, eta: float | None, force_line: bool = False) -> None:
        elapsed = self.clock() - self.start
        done = elapsed / (elapsed + eta) if eta is not None and elapsed + eta > 0 else 0.0
        self.bar.update(self.task, description=self.text, completed=done, detail=self.detail, eta=format_seconds(eta))
        if self.plain and (force_line or self.clock() - self.last_plain >= PLAIN_EVERY_S):
            detail = f": {self.detail}" if self.detail else ""
            self._line(f"{self.text}{detail} · ETA {format_seconds(eta)}")

    def _line(self, text: str) -> None:
        self.last_plain = self.clock()
        stamp = format_seconds(self.clock() - self.start)
        self.console.print(f"[{stamp}] {text}", markup=False, highlight=False, soft_wrap=True)

    def round_table(self, server_round: int, rows: list[dict], eta: float | None = None) -> None:
        mean = sum(r["accuracy"] for r in rows) / len(rows)
        if self.json:
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
        table.caption = f"mean accuracy {mean:.3f}" + (f" · ETA {format_seconds(eta)}" if eta is not None else "")
        self.console.print(table)
