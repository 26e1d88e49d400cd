"""A client's private state on disk: local modules, optimizer state, cached reference log-probs.

One directory per client. Files are written to a temporary name and renamed into place, so a crash at any moment
leaves either the previous or the new version, never half of one. Only the engine that runs the client (the
in-process loop or the Flower ClientApp on the client's node) reads or writes this directory; nothing in it is
sent to the server.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path`` (same directory, so the rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class ClientState:
    """What a client keeps between rounds."""

    local: dict[str, torch.Tensor] = field(default_factory=dict)  # non-shared trainable tensors
    optimizer: dict | None = None  # torch optimizer state_dict
    reference: dict[str, torch.Tensor] = field(default_factory=dict)  # "train"/"test" -> [n, 2] ref logps
    rounds_trained: int = 0


class ClientStore:
    """Reads and writes :class:`ClientState` under ``root/client_<id>/``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, client_id: int) -> Path:
        return self.root / f"client_{client_id}"

    def load(self, client_id: int) -> ClientState:
        d = self.path(client_id)
        state = ClientState()
        if (d / "local.safetensors").is_file():
            state.local = load_file(d / "local.safetensors")
        if (d / "reference.safetensors").is_file():
            state.reference = load_file(d / "reference.safetensors")
        if (d / "optimizer.pt").is_file():
            blob = torch.load(d / "optimizer.pt", weights_only=True)
            state.optimizer = blob["optimizer"]
            state.rounds_trained = int(blob["rounds_trained"])
        return state

    def save(self, client_id: int, state: ClientState) -> None:
        d = self.path(client_id)
        if state.reference:
            atomic_write(d / "reference.safetensors", lambda p: save_file(state.reference, p))
        if state.local:
            local = {k: v.contiguous() for k, v in state.local.items()}
            atomic_write(d / "local.safetensors", lambda p: save_file(local, p))
        if state.optimizer is not None:
            blob = {"optimizer": state.optimizer, "rounds_trained": state.rounds_trained}
            atomic_write(d / "optimizer.pt", lambda p: torch.save(blob, p))
