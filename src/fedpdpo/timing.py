"""Where a run's time goes: wall-clock and CPU seconds per phase, summed over the process.

Code marks its phases with ``with phase("model load"):``. Phases nest, and each one is charged its *exclusive*
time (a reference pass inside an evaluation counts as reference pass, not twice), so the phases of a process add
up to the time spent inside any of them. ``benchmarks/bench_run_phases.py`` reads :data:`CLOCK` after a run and
prints the table in docs/performance.md; nothing in a run's results depends on it, and it costs two clock reads
per phase.

CPU seconds (``time.process_time``: all threads of this process) are reported next to wall seconds because other
jobs on a shared machine stretch wall time much more than the CPU time a phase needs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class PhaseTotal:
    wall_s: float = 0.0
    cpu_s: float = 0.0
    calls: int = 0


class PhaseClock:
    """Exclusive wall and CPU seconds per phase name (see the module docstring)."""

    def __init__(self) -> None:
        self.totals: dict[str, PhaseTotal] = {}
        self._local = threading.local()

    def _stack(self) -> list[list[float]]:
        stack = getattr(self._local, "stack", None)
        if stack is None:
            stack = self._local.stack = []
        return stack

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        stack = self._stack()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        stack.append([0.0, 0.0])  # time of the phases nested in this one
        try:
            yield
        finally:
            wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
            child_wall, child_cpu = stack.pop()
            total = self.totals.setdefault(name, PhaseTotal())
            total.wall_s += wall - child_wall
            total.cpu_s += cpu - child_cpu
            total.calls += 1
            if stack:
                stack[-1][0] += wall
                stack[-1][1] += cpu

    def reset(self) -> None:
        self.totals.clear()

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {
            name: {"wall_s": round(t.wall_s, 3), "cpu_s": round(t.cpu_s, 3), "calls": t.calls}
            for name, t in self.totals.items()
        }


#: The process's clock.
CLOCK = PhaseClock()


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """Charge the time of the block to ``name`` on the process's clock."""
    return CLOCK.phase(name)
