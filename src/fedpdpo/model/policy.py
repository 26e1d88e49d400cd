"""The FedPDPO model: frozen backbone + shared LoRA + a client's local modules, and the frozen reference.

Policy for client k:   h = Adapter_k(Decoder_{theta, LoRA}(x)),  log pi_k(y|x) = sum_t log softmax(W_k h_{t-1})[y_t]
Reference:             h = Decoder_theta(x) (LoRA off),           log pi_ref(y|x) with the original head W_0
Explicit reward:       r_k(x, y) = RewardHead_k(h on the response tokens)

Log-probabilities are computed only on response positions and in chunks: the output head over a 49k-262k
vocabulary dominates the cost, and prompt positions never enter the loss.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedpdpo.config import LoraSettings, MethodConfig, PerfSettings
from fedpdpo.data.tokenize import PairBatch
from fedpdpo.errors import ConfigError
from fedpdpo.model.modules import BottleneckAdapter, PersonalHead, RewardHead
from fedpdpo.model.prefix_cache import PrefixCache, shared_prefix_cache

LOGIT_CHUNK = 1024  # response tokens per chunk of the vocabulary projection
# Decoders whose forward does nothing to ``inputs_embeds`` before the layers except masks and rotary positions, so
# that a forward from a cached frozen prefix equals the full forward (a GPT-2 style learned position embedding
# would be added twice). Other models take the plain path.
PREFIX_SAFE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma2", "gemma"})


@dataclass
class PolicyOutput:
    logps: torch.Tensor  # [2B] summed response log-probs under the policy
    rewards: torch.Tensor | None  # [2B] explicit rewards, None without a reward head
    n_tokens: torch.Tensor  # [2B] response lengths
    ref_logps: torch.Tensor | None = None  # [2B] reference log-probs, when asked for


def _num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def lora_config(model: nn.Module, cfg: LoraSettings) -> LoraConfig:
    """The ``peft.LoraConfig`` of the shared adapter (also handed to TRL by the benchmark, so both train the same)."""
    layers = None
    if cfg.last_n_layers:
        n = _num_layers(model)
        layers = list(range(max(0, n - cfg.last_n_layers), n))
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def add_lora(model: nn.Module, cfg: LoraSettings):
    return get_peft_model(model, lora_config(model, cfg))


def response_logps(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    weight: torch.Tensor,
    project_mask: torch.Tensor | None = None,
):
    """Sum of log p(y_t | y_<t) over response tokens, per sequence.

    ``hidden`` [N, L, H]; the token at position t is predicted from the hidden state at t-1, so response positions
    are shifted left by one before the (chunked) vocabulary projection. ``project_mask`` (default: the response)
    selects the positions sent through the head; a wider mask (every real token, as TRL does) only costs time and
    exists to measure what projecting the response alone saves.
    """
    target_mask = response_mask[:, 1:]
    projected = target_mask if project_mask is None else project_mask[:, 1:].bool() | target_mask
    rows, cols = projected.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [T, H]
    targets = input_ids[:, 1:][rows, cols]  # [T]
    token_logps = []
    for start in range(0, states.shape[0], LOGIT_CHUNK):
        logits = states[start : start + LOGIT_CHUNK] @ weight.T
        logits = logits.float()
        tgt = targets[start : start + LOGIT_CHUNK]
        token_logps.append(logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0)
    if project_mask is not None:
        flat = flat * target_mask[rows, cols]
    out = torch.zeros(hidden.shape[0], dtype=flat.dtype, device=hidden.device)
    return out.index_add(0, rows, flat), target_mask.sum(1)


class _Done(nn.Module):
    """Stands in for a decoder layer whose output is already known: passes the hidden states through."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return hidden_states


@contextlib.contextmanager
def _run_only(decoder: nn.Module, keep: range, final_norm: bool):
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


class FedPDPOModel(nn.Module):
    """Backbone (frozen) with the shared LoRA, plus ``self.local``: this client's head, reward head and adapter.

    One instance serves every client in a process: the engine swaps a client's local tensors in and out, so memory
    does not grow with the number of clients.
    """

    def __init__(self, backbone: nn.Module, lora: LoraSettings, method: MethodConfig) -> None:
        super().__init__()
        hidden_size = int(backbone.config.hidden_size)
        self.ref_head_weight = backbone.get_output_embeddings().weight  # frozen original head W_0
        self.peft = add_lora(backbone, lora)
        self.decoder = self.peft.get_base_model().get_decoder()
        # First layer with LoRA: everything below it is frozen and identical for the policy and the reference.
        n_layers = _num_layers(backbone)
        safe = backbone.config.model_type in PREFIX_SAFE_MODEL_TYPES and hasattr(self.decoder, "norm")
        self.split_layer = max(0, n_layers - lora.last_n_layers) if lora.last_n_layers and safe else 0
        # transformers renamed ``past_key_values`` to ``cache`` during 5.x; use the decoder's own name
        params = inspect.signature(self.decoder.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.prefix_cache = shared_prefix_cache(self.decoder, self.split_layer) if self.split_layer else PrefixCache()
        self.local = nn.ModuleDict()
        if method.personal_head:
            self.local["head"] = PersonalHead(self.ref_head_weight)
        self.reward_layer = method.reward_layer if method.reward_head else 0
        if self.reward_layer > self.split_layer:  # (negative values fail in RunConfig.validate)
            raise ConfigError(
                f"config key 'method.reward_layer' is {self.reward_layer}, but only layers 1..{self.split_layer} "
                f"are frozen (below the first LoRA layer{'' if self.split_layer else '; this model has none'}); "
                "use 0 for the final hidden state or lower the layer"
            )
        if method.reward_head:
            self.local["reward_head"] = RewardHead(hidden_size, method.reward_pooling)
        if method.adapter:
            self.local["adapter"] = BottleneckAdapter(hidden_size, method.adapter_dim)

    # -- parameters -------------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter that training updates: LoRA tensors and local modules, by name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def get_tensors(self, names: list[str]) -> dict[str, torch.Tensor]:
        params = dict(self.named_parameters())
        return {n: params[n].detach().to("cpu", copy=True) for n in names}

    @torch.no_grad()
    def set_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        for name, value in tensors.items():
            if name not in params:
                raise KeyError(f"unknown parameter {name!r}")
            params[name].copy_(value.to(params[name].device, params[name].dtype))

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """A snapshot of all trainable tensors right after construction (the round-0 state of every client)."""
        return self.get_tensors(list(self.trainable()))

    # -- forward ----------------------------------------------------------------------------------------------
    def _hidden(self, batch: PairBatch) -> torch.Tensor:
        # use_cache=False: the config default would fill a KV cache that training never reads.
        return self.decoder(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
        ).last_hidden_state

    @torch.no_grad()
    def _prefix(self, batch: PairBatch, layer: int | None = None) -> torch.Tensor:
        """Hidden states after the frozen layers below ``layer`` (default: the first LoRA layer): frozen work, so
        no graph is recorded."""
        with _run_only(self.decoder, range(self.split_layer if layer is None else layer), final_norm=False):
            return self._hidden(batch)

    @torch.no_grad()
    def _per_sequence(
        self, batch: PairBatch, budget_bytes: int, kind: str, compute: Callable[[torch.Tensor, int], torch.Tensor]
    ) -> torch.Tensor:
        """A frozen ``[N, width, hidden]`` value assembled from per-sequence values (see ``PrefixCache``), kept under
        ``kind`` and computed alone as ``compute(ids, prompt_length)`` when missing; zeros in the padding, which the
        attention and response masks never read."""
        lengths = batch.attention_mask.sum(1).tolist()
        prompt_lengths = batch.response_mask.int().argmax(1).tolist()  # first response position
        rows = []
        for row, (length, prompt_length) in enumerate(zip(lengths, prompt_lengths, strict=True)):
            ids = batch.input_ids[row, :length]
            key = PrefixCache.key(torch.cat([ids, ids.new_tensor([prompt_length])]), kind=kind)
            value = self.prefix_cache.get(key)
            if value is None:
                value = compute(ids, prompt_length)
                self.prefix_cache.put(key, value, budget_bytes)
            rows.append(value.to(batch.input_ids.device))
        out = rows[0].new_zeros((len(rows), batch.input_ids.shape[1], rows[0].shape[-1]))
        for row, value in enumerate(rows):
            out[row, : value.shape[0]] = value
        return out

    def _cached_prefix(self, batch: PairBatch, budget_bytes: int) -> torch.Tensor:
        """``_prefix`` from the per-sequence cache."""
        return self._per_sequence(
            batch,
            budget_bytes,
            "sequence",
            lambda ids, prompt_length: self._sequence_prefix(ids, prompt_length, budget_bytes),
        )

    def _sequence_prefix(self, ids: torch.Tensor, prompt_length: int, budget_bytes: int) -> torch.Tensor:
        """One sequence's prefix: its prompt's (cached) hidden states and key/values, then the response on top."""
        with _run_only(self.decoder, range(self.split_layer), final_norm=False):
            key = PrefixCache.key(ids[:prompt_length], kind="prompt")
            prompt = self.prefix_cache.get(key)
            if prompt is None:
                out = self.decoder(input_ids=ids[None, :prompt_length], use_cache=True)
                past = out.cache if self._cache_kwarg == "cache" else out.past_key_values
                prompt = (out.last_hidden_state[0], past)
                self.prefix_cache.put(key, prompt, budget_bytes)
            hidden, past = prompt
            past = copy.deepcopy(past)  # the continuation appends to it
            kwargs = {self._cache_kwarg: past}
            out = self.decoder(input_ids=ids[None, prompt_length:], use_cache=True, **kwargs)
            return torch.cat([hidden.to(ids.device), out.last_hidden_state[0]])

    def _frozen_layer(self, batch: PairBatch, layer: int, perf: PerfSettings) -> torch.Tensor:
        """Output of decoder layer ``layer`` (frozen, so no graph), for the reward head when ``reward_layer > 0``.

        With the prefix cache on, each sequence's value is computed alone and kept, like the prefix itself, so it
        is computed once per sequence and is the same bits whether cached or not."""
        if not perf.prefix_cache:
            return self._prefix(batch, layer)

        def compute(ids: torch.Tensor, prompt_length: int) -> torch.Tensor:
            with _run_only(self.decoder, range(layer), final_norm=False):
                return self.decoder(input_ids=ids[None], use_cache=False).last_hidden_state[0]

        return self._per_sequence(batch, perf.prefix_cache_mb << 20, f"layer{layer}", compute)

    def _prefix_for(self, batch: PairBatch, perf: PerfSettings) -> torch.Tensor:
        if perf.prefix_cache:
            return self._cached_prefix(batch, perf.prefix_cache_mb << 20)
        return self._prefix(batch)

    def _from_prefix(self, prefix: torch.Tensor, batch: PairBatch) -> torch.Tensor:
        with _run_only(self.decoder, range(self.split_layer, len(self.decoder.layers)), final_norm=True):
            return self.decoder(
                inputs_embeds=prefix, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state

    def forward(self, batch: PairBatch, with_reference: bool = False, perf: PerfSettings | None = None) -> PolicyOutput:
        """Policy log-probs (and explicit rewards); with ``with_reference`` also the reference log-probs, which
        reuse the frozen prefix when ``perf.shared_prefix`` is on."""
        perf = perf or PerfSettings()
        project = None if perf.response_only_logits else batch.attention_mask
        ref_logps = None
        if perf.shared_prefix and self.split_layer:
            prefix = self._prefix_for(batch, perf)
            if with_reference:
                with torch.no_grad(), self.peft.disable_adapter():
                    ref_hidden = self._from_prefix(prefix, batch)
                    ref_logps = response_logps(
                        ref_hidden, batch.input_ids, batch.response_mask, self.ref_head_weight, project
                    )[0]
            hidden = self._from_prefix(prefix, batch)
        else:
            if with_reference:
                ref_logps = self.reference_logps(batch, perf)
            hidden = self._hidden(batch)
        if "adapter" in self.local:
            hidden = self.local["adapter"](hidden)
        head = self.local["head"].weight if "head" in self.local else self.ref_head_weight
        logps, n_tokens = response_logps(hidden, batch.input_ids, batch.response_mask, head, project)
        rewards = None
        if "reward_head" in self.local:
            features = self._frozen_layer(batch, self.reward_layer, perf) if self.reward_layer else hidden
            rewards = self.local["reward_head"](features, batch.response_mask)
        return PolicyOutput(logps, rewards, n_tokens, ref_logps)

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch, perf: PerfSettings | None = None) -> torch.Tensor:
        """log pi_ref: the frozen backbone with its original head, LoRA and local modules off."""
        perf = perf or PerfSettings()
        project = None if perf.response_only_logits else batch.attention_mask
        with self.peft.disable_adapter():
            if perf.shared_prefix and self.split_layer:
                hidden = self._from_prefix(self._prefix_for(batch, perf), batch)
            else:
                hidden = self._hidden(batch)
        return response_logps(hidden, batch.input_ids, batch.response_mask, self.ref_head_weight, project)[0]
