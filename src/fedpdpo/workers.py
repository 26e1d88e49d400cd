"""The start of each worker process that runs whole runs several at a time (``fedpdpo compare/tune --jobs``).

Kept apart from :mod:`fedpdpo.sweep` on purpose: a spawned worker imports this module to run its initializer, and
nothing here imports torch at module level, so the worker's GPU can still be chosen (``CUDA_VISIBLE_DEVICES`` is
read when CUDA starts, and must be set before anything in the process asks for a device).
"""

from __future__ import annotations

import os
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


def init_worker(counter: Any, devices: Sequence[str], threads: int) -> None:
    """Runs first in each worker: take the next worker number, pin the process to its GPU, set its CPU threads
    (a run's own ``threads`` setting, where given, still applies when the run starts)."""
    with counter.get_lock():
        worker = counter.value
        counter.value += 1
    device = device_for(worker, devices)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    import torch

    torch.set_num_threads(threads)
