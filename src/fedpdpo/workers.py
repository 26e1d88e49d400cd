"""The start of each worker process that runs whole runs several at a time (``fedpdpo compare/tune --jobs``).

Kept apart from :mod:`fedpdpo.sweep` on purpose: a spawned worker imports this module to run its initializer, and
nothing here imports torch at module level, so the worker's GPU can still be chosen (``CUDA_VISIBLE_DEVICES`` is
read when CUDA starts, and must be set before anything in the process asks for a device).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from typing import Any


def device_for(worker: int, devices: Sequence[str]) -> str | None:
    """The ``CUDA_VISIBLE_DEVICES`` of worker ``worker``: one of several GPUs, round robin (None: leave as is)."""
    return devices[worker % len(devices)] if len(devices) > 1 else None


def cuda_devices() -> list[str]:
    """The GPUs the workers share: those ``CUDA_VISIBLE_DEVICES`` names, else every one torch sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def die_with_parent(parent: int) -> None:
    """Linux: have the kernel end this worker (SIGTERM) when the parent process dies. A killed ``compare`` must not
    leave runs going on unseen, which would also hold their directories' locks against the resumed command; the
    interrupted runs continue from their last checkpoint when the command is run again."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def init_worker(counter: Any, devices: Sequence[str], threads: int, parent: int) -> None:
    """Runs first in each worker: tie its life to the parent's (and to Ctrl-C), take the next worker number, pin
    the process to its GPU, set its CPU threads (a run's own ``threads`` setting, where given, still applies when
    the run starts), and quiet it as the CLI is (library deprecation notices hidden; the parent reports each run's
    end, so only warnings are logged here)."""
    die_with_parent(parent)
    # Ctrl-C ends the worker at once, like a kill (the run resumes from its checkpoint): caught as an exception
    # instead, it would end only the current run and the worker would take the next one from the queue
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    warnings.filterwarnings("ignore", category=FutureWarning)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with counter.get_lock():
        worker = counter.value
        counter.value += 1
    device = device_for(worker, devices)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(threads)
