"""The frozen prefix (the decoder layers below the lowest LoRA layer): run once, kept across steps and rounds.

:class:`FrozenPrefix` is the one call ``FedPDPOModel`` makes for it: ``hidden(batch)`` gives the prefix's output
for a batch, computed in one batched pass without a graph or, with ``perf.prefix_cache``, assembled from per-sequence
values kept in a :class:`PrefixCache`.

The prefix is frozen and LoRA-free, so the hidden state it gives a sequence never changes: a client that sees its
pairs again in later steps or rounds (and every evaluation of the same held-out pairs) can skip those layers.

Each sequence's prefix is computed without padding, never inside whatever padded batch first needs it: first its
prompt (whose hidden states and key/value cache are kept too, so chosen and rejected, and every pair with the same
prompt, share that work: all IMDB pairs have one prompt), then its response as a continuation of the prompt's
key/value cache, together with the batch's other missing sequences of the same prompt and length where that gives
each row the bits it gets alone (checked once per shape and process, see ``FrozenPrefix._computed``), else on its
own. That makes a cached value a function of the token ids alone, bit for bit: a run gives the same result whether
a value came from the cache or was recomputed (after a restart, in another process, or because the cache was
full), so caching never breaks the "same seed, same result in every engine" guarantee.

Keys are the token ids themselves, and a cache belongs to one frozen prefix (``shared_prefix_cache`` hands the
same cache to every model built on identical prefix weights in a process), so a stale entry is impossible. That
sharing is what lets ``fedpdpo compare`` compute each sequence's prefix once for all its algorithms.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from fedpdpo.config import PerfSettings
from fedpdpo.data.tokenize import PairBatch


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
        # (device, precision, k, length) -> whether k sequences computed together get the bits of each alone
        self.batch_exact: dict[tuple[str, str, int, int], bool] = {}

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
def prefix_fingerprint(decoder: PreTrainedModel, split_layer: int) -> tuple:
    """What a prefix hidden state depends on: the model config, the attention kernel and the frozen weights below
    ``split_layer`` (by float64 sums of each tensor: cheap, and different for any two checkpoints in practice)."""
    config = decoder.config
    modules = [decoder.embed_tokens, *list(decoder.layers)[:split_layer]]
    sums = tuple(float(p.sum(dtype=torch.float64)) for m in modules for p in m.parameters())
    settings = json.dumps(config.to_dict(), sort_keys=True, default=str)
    return (type(decoder).__name__, split_layer, getattr(config, "_attn_implementation", None), settings, sums)


def shared_prefix_cache(decoder: PreTrainedModel, split_layer: int) -> PrefixCache:
    """The process's cache for this frozen prefix: the latest one is kept, so consecutive runs on the same backbone
    (the runs of a comparison, every client of an in-process run) share it; another backbone starts a new one."""
    global _latest
    fingerprint = prefix_fingerprint(decoder, split_layer)
    if _latest is None or _latest[0] != fingerprint:
        _latest = (fingerprint, PrefixCache())
    return _latest[1]


class _Done(nn.Module):
    """Stands in for a decoder layer whose output is already known: passes the hidden states through."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def run_only(decoder: PreTrainedModel, keep: range, final_norm: bool) -> Iterator[None]:
    """Within the block, ``decoder`` runs only the layers in ``keep`` (the others pass hidden states through).

    The decoder's own forward still builds the attention masks and rotary positions, and layer indices stay the
    same (Gemma 3 picks sliding or full attention by index), so no model internals are re-implemented here.
    """
    layers, norm = decoder.layers, decoder.norm
    saved = {i: layers[i] for i in range(len(layers)) if i not in keep}
    done = _Done()
    try:
        for i in saved:
            layers[i] = done
        if not final_norm:
            decoder.norm = nn.Identity()
        yield
    finally:
        for i, layer in saved.items():
            layers[i] = layer
        decoder.norm = norm


class FrozenPrefix:
    """The decoder layers below ``split_layer`` (frozen, LoRA-free): their output for a batch, never with a graph.

    With ``perf.prefix_cache`` on a CPU each sequence's value is computed without padding and kept in the process's
    :class:`PrefixCache` for this prefix (bounded by ``perf.prefix_cache_mb``), else the batch runs in one pass
    (always on a GPU: :meth:`caches`).
    """

    def __init__(self, decoder: PreTrainedModel, split_layer: int, perf: PerfSettings) -> None:
        self.decoder, self.split_layer = decoder, split_layer
        self.cached, self.budget_bytes = perf.prefix_cache, perf.prefix_cache_mb << 20
        self.cache = shared_prefix_cache(decoder, split_layer) if split_layer else PrefixCache()
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; use the decoder's own name
        params = inspect.signature(decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @torch.no_grad()
    def hidden(self, batch: PairBatch, layer: int | None = None) -> torch.Tensor:
        """``[N, L, hidden]`` output of the layers below ``layer`` (default: the prefix, up to the first LoRA
        layer; a smaller ``layer`` serves ``method.reward_layer``), without the final norm.

        Cached values of the prefix continue each prompt's kept key/values; those of another ``layer`` are whole
        sequences. Either way a value depends on the sequence's token ids alone."""
        if not self.caches(batch.input_ids.device):
            with run_only(self.decoder, range(self.split_layer if layer is None else layer), final_norm=False):
                return self._forward(batch)
        if layer is None:
            return self._per_sequence(batch, "sequence", self._sequence_prefix)

        def whole(ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
            with run_only(self.decoder, range(layer), final_norm=False):
                return self.decoder(input_ids=ids, use_cache=False).last_hidden_state

        return self._per_sequence(batch, f"layer{layer}", whole)

    def caches(self, device: torch.device) -> bool:
        """Whether batches on ``device`` go through the cache: with ``perf.prefix_cache``, on the CPU only.

        Why not on a GPU: there a step is bound by kernel launches, not arithmetic. A cached value is computed per
        sequence (one pass of every frozen layer for each new sequence, since only same-length rows can share a
        pass) and assembled row by row, which costs many times the launches of the one batched pass it replaces:
        on an H200 the benchmark's local DPO ran at 28.5 pairs/s with the cache against TRL's 112-157
        (docs/performance.md, "GPU"). On a CPU the arithmetic dominates and the cache saves it."""
        return self.cached and device.type == "cpu"

    def _forward(self, batch: PairBatch) -> torch.Tensor:
        # use_cache=False: the config default would fill a KV cache that nothing reads.
        return self.decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state

    def _per_sequence(
        self, batch: PairBatch, kind: str, compute: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """A ``[N, width, hidden]`` value assembled from per-sequence values, kept under ``kind``; zeros in the
        padding, which the attention and response masks never read.

        Missing sequences of one length and one prompt are computed together, ``compute(ids [k, L],
        prompt_length) -> [k, L, hidden]`` without padding, where :meth:`_computed` found that batching does not
        change a row's bits on this platform; one at a time otherwise."""
        lengths = batch.attention_mask.sum(1).tolist()
        prompt_lengths = batch.response_mask.int().argmax(1).tolist()  # first response position
        keys, values = [], []
        for row, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths, strict=True)):
            ids = batch.input_ids[row, :length]
            keys.append(PrefixCache.key(torch.cat([ids, ids.new_tensor([prompt_length])]), kind=kind))
            values.append(self.cache.get(keys[-1]))
        groups: dict[tuple[bytes, int], dict[tuple[str, str, bytes], list[int]]] = {}
        for row, value in enumerate(values):
            if value is None:  # rows of one sequence (a pair repeated in a batch) share one computation
                prompt = batch.input_ids[row, : prompt_lengths[row]].cpu().numpy().tobytes()
                groups.setdefault((prompt, lengths[row]), {}).setdefault(keys[row], []).append(row)
        for (_, length), members in groups.items():
            first = [rows[0] for rows in members.values()]
            ids = batch.input_ids[first, :length]
            out = self._computed(ids, prompt_lengths[first[0]], compute, keys[first[0]][1])
            for value, (key, rows) in zip(out, members.items(), strict=True):
                self.cache.put(key, value, self.budget_bytes)
                for row in rows:
                    values[row] = value
        out = values[0].new_zeros((len(values), batch.input_ids.shape[1], values[0].shape[-1]))
        for row, value in enumerate(values):
            out[row, : value.shape[0]] = value.to(out.device)
        return out

    def _computed(
        self, ids: torch.Tensor, prompt_length: int, compute: Callable[[torch.Tensor, int], torch.Tensor], dtype: str
    ) -> list[torch.Tensor]:
        """The values of the ``[k, L]`` sequences ``ids``: one batched call where that is exact, else one each.

        Whether a batched row has the bits of the same sequence computed alone depends on the platform's kernels
        (on the CPUs measured it does), so the first group of each shape in a process has its first and last row
        (a kernel's tail block) computed alone too and compared; a shape where they differ is computed one
        sequence at a time. That keeps a cached value a function of the token ids alone, wherever computed."""

        def one_by_one() -> list[torch.Tensor]:
            return [compute(ids[i : i + 1], prompt_length)[0] for i in range(len(ids))]

        shape = (ids.device.type, dtype, *ids.shape)
        exact = self.cache.batch_exact.get(shape) if len(ids) > 1 else False
        if exact is False:
            return one_by_one()
        together = [row.clone() for row in compute(ids, prompt_length)]  # a row may be kept without the rest
        if exact is None:
            ends = (0, len(ids) - 1)
            exact = all(torch.equal(together[i], compute(ids[i : i + 1], prompt_length)[0]) for i in ends)
            self.cache.batch_exact[shape] = exact
            if not exact:
                return one_by_one()
        return together

    def _sequence_prefix(self, ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
        """The prefix of ``[k, L]`` sequences sharing a prompt: the prompt's (cached) hidden states and key/values,
        then the responses on top."""
        with run_only(self.decoder, range(self.split_layer), final_norm=False):
            key = PrefixCache.key(ids[0, :prompt_length], kind="prompt")
            prompt = self.cache.get(key)
            if prompt is None:
                out = self.decoder(input_ids=ids[:1, :prompt_length], use_cache=True)
                past = out.cache if self._cache_kwarg == "cache" else out.past_key_values
                prompt = (out.last_hidden_state[0], past)
                self.cache.put(key, prompt, self.budget_bytes)
            hidden, past = prompt
            past = copy.deepcopy(past)  # the continuation appends to it
            if len(ids) > 1:
                past.batch_repeat_interleave(len(ids))
            kwargs = {self._cache_kwarg: past}
            out = self.decoder(input_ids=ids[:, prompt_length:], use_cache=True, **kwargs)
            prompt_hidden = hidden.to(ids.device).expand(len(ids), *hidden.shape)
            return torch.cat([prompt_hidden, out.last_hidden_state], dim=1)
