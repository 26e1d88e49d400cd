"""Hidden states of the frozen prefix (the layers below the lowest LoRA layer), kept across steps and rounds.

The prefix is frozen and LoRA-free, so the hidden state it gives a sequence never changes: a client that sees its
pairs again in later steps or rounds (and every evaluation of the same held-out pairs) can skip those layers.

Each sequence's prefix is computed *on its own* (batch of one, no padding) rather than inside whatever batch first
needs it: first its prompt (whose hidden states and key/value cache are kept too, so chosen and rejected, and every
pair with the same prompt, share that work: all IMDB pairs have one prompt), then its response as a continuation
of the prompt's key/value cache. That makes a cached value a function of the token ids alone, bit for bit: a run
gives the same result whether a value came from the cache or was recomputed (after a restart, in another process,
or because the cache was full), so caching never breaks the "same seed, same result in every engine" guarantee.

Keys are the token ids themselves, and a cache belongs to one frozen prefix (``shared_prefix_cache`` hands the
same cache to every model built on identical prefix weights in a process), so a stale entry is impossible. That
sharing is what lets ``fedpdpo compare`` compute each sequence's prefix once for all its algorithms.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn


def nbytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (a tensor, or a tuple/list/dict/cache object containing tensors)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dict__"):
        return sum(nbytes(v) for v in vars(value).values())
    return 0


class PrefixCache:
    """A byte-bounded map from a sequence's token ids to its ``[length, hidden]`` prefix hidden states, plus the
    prefix's state after each prompt (hidden states and key/value cache), shared by every response to that prompt.

    When the budget is reached new entries are no longer stored (they are recomputed each time they are needed,
    with identical values), so memory is bounded by ``budget_bytes`` whatever the number of clients.
    """

    def __init__(self) -> None:
        self._store: dict[tuple[str, str, bytes], Any] = {}
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(ids: torch.Tensor, kind: str = "sequence") -> tuple[str, str, bytes]:
        """``(kind, precision, token ids)``: a value computed under bf16 autocast is a different value."""
        device = ids.device.type
        precision = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else "fp32"
        return kind, precision, ids.detach().to("cpu", torch.int64).numpy().tobytes()

    def get(self, key: tuple[str, str, bytes]) -> Any:
        value = self._store.get(key)
        if key[0] == "sequence":  # hits and misses count whole sequences
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
        return value

    def put(self, key: tuple[str, str, bytes], value: Any, budget_bytes: int) -> bool:
        size = nbytes(value)
        if self.nbytes + size > budget_bytes:
            return False
        self._store[key] = value
        self.nbytes += size
        return True

    def clear(self) -> None:
        self._store.clear()
        self.nbytes = 0

    def count(self, kind: str = "sequence") -> int:
        return sum(1 for key in self._store if key[0] == kind)

    def __len__(self) -> int:
        return self.count("sequence")


_latest: tuple[tuple, PrefixCache] | None = None


@torch.no_grad()
def prefix_fingerprint(decoder: nn.Module, split_layer: int) -> tuple:
    """What a prefix hidden state depends on: the model config, the attention kernel and the frozen weights below
    ``split_layer`` (by float64 sums of each tensor: cheap, and different for any two checkpoints in practice)."""
    config = decoder.config
    modules = [decoder.embed_tokens, *list(decoder.layers)[:split_layer]]
    sums = tuple(float(p.sum(dtype=torch.float64)) for m in modules for p in m.parameters())
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return (type(decoder).__name__, split_layer, getattr(config, "_attn_implementation", None), settings, sums)


def shared_prefix_cache(decoder: nn.Module, split_layer: int) -> PrefixCache:
    """The process's cache for this frozen prefix: the latest one is kept, so consecutive runs on the same backbone
    (the runs of a comparison, every client of an in-process run) share it; another backbone starts a new one."""
    global _latest
    fingerprint = prefix_fingerprint(decoder, split_layer)
    if _latest is None or _latest[0] != fingerprint:
        _latest = (fingerprint, PrefixCache())
    return _latest[1]
