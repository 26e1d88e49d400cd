"""The FedPDPO model: frozen backbone + shared LoRA + a client's local modules, and the frozen reference.

Policy for client k:  h = Adapter_k(Decoder_{theta, g_k LoRA}(x)), log pi_k(y|x) = sum_t log softmax(W_k h_{t-1})[y_t]
Global policy:        h = Decoder_{theta, LoRA}(x) (no local modules), log pi_global(y|x) with the original head W_0
Reference:            h = Decoder_theta(x) (LoRA off),            log pi_ref(y|x) with W_0
Explicit reward:      r_k(x, y) = RewardHead_k(h on the response tokens)
(g_k: the client's LoRA gate, 1 without ``method.lora_gate``)

Log-probabilities are computed only on response positions and in chunks: the output head over a 49k-262k
vocabulary dominates the cost, and prompt positions never enter the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import PreTrainedModel

from fedpdpo.config import LoraSettings, MethodConfig, PerfSettings
from fedpdpo.data.tokenize import PairBatch
from fedpdpo.errors import ConfigError, first_line
from fedpdpo.model.head_logps import target_logps
from fedpdpo.model.lora_targets import check_target_modules
from fedpdpo.model.modules import BottleneckAdapter, LoraGate, PersonalHead, RewardHead
from fedpdpo.model.naming import HEAD_WEIGHT
from fedpdpo.model.prefix_cache import FrozenPrefix, run_only

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
    global_logps: torch.Tensor | None = None  # [2B] global policy's log-probs, when method.global_weight > 0


def _num_layers(model: PreTrainedModel) -> int:
    return int(model.config.num_hidden_layers)


def lora_config(model: PreTrainedModel, cfg: LoraSettings) -> LoraConfig:
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


def add_lora(model: PreTrainedModel, cfg: LoraSettings) -> PeftModel:
    check_target_modules(model, cfg.target_modules)
    try:
        return get_peft_model(model, lora_config(model, cfg))
    except ValueError as exc:  # PEFT's refusals of a LoRA setting the names check above does not foresee
        raise ConfigError(f"config key 'lora': {first_line(exc)}") from exc


def lora_b_modules(model: nn.Module) -> list[nn.Module]:
    """PEFT's ``lora_B`` modules of ``model`` in module order: entry m of a client's LoRA gate scales the m-th."""
    return [m.lora_B[key] for m in model.modules() if isinstance(m, LoraLayer) for key in m.lora_B]


@torch.no_grad()
def fold_lora_gate(model: nn.Module, gate: torch.Tensor) -> None:
    """Multiply each ``lora_B`` of the PEFT ``model`` by its gate entry: the plain LoRA whose updates are the gated
    ones (a merged export of a gated client)."""
    modules = lora_b_modules(model)
    if len(modules) != gate.numel():
        raise ValueError(f"the LoRA gate has {gate.numel()} entries for {len(modules)} LoRA modules")
    for module, g in zip(modules, gate.tolist(), strict=True):
        module.get_parameter("weight").mul_(g)


def cast_once_for_autocast(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in the active autocast dtype of its device (itself outside autocast). For a matrix used many times
    in one pass (the [V, H] head: per logit chunk, per sampled token), where autocast would cast it at every use and
    send each use's gradient back through its own cast."""
    device = weight.device.type
    return weight.to(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else weight


def response_logps(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    weight: torch.Tensor,
    project_mask: torch.Tensor | None = None,
    positions: tuple[torch.Tensor, torch.Tensor] | None = None,
    compiled: bool = True,
):
    """Sum of log p(y_t | y_<t) over response tokens, per sequence.

    ``hidden`` [N, L, H]; the token at position t is predicted from the hidden state at t-1, so response positions
    are shifted left by one before the (chunked) vocabulary projection. ``project_mask`` (default: the response)
    selects the positions sent through the head; a wider mask (every real token, as TRL does) only costs time and
    exists to measure what projecting the response alone saves. ``positions``: the (rows, columns) of
    ``response_mask[:, 1:]``'s true entries when the caller has them (:meth:`PairBatch.to`), used without a mask.
    ``compiled``: the head's elementwise kernels through ``torch.compile`` (:mod:`fedpdpo.model.head_logps`).
    """
    target_mask = response_mask[:, 1:]
    if project_mask is None and positions is not None:
        rows, cols = positions
    else:
        projected = target_mask if project_mask is None else project_mask[:, 1:].bool() | target_mask
        rows, cols = projected.nonzero(as_tuple=True)
    weight = cast_once_for_autocast(weight)
    states = hidden[:, :-1][rows, cols].to(weight.dtype)  # [T, H]
    targets = input_ids[:, 1:][rows, cols]  # [T]
    token_logps = [
        target_logps(states[start : start + LOGIT_CHUNK], weight, targets[start : start + LOGIT_CHUNK], compiled)
        for start in range(0, states.shape[0], LOGIT_CHUNK)
    ]
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0, dtype=torch.float32)
    if project_mask is not None:
        flat = flat * target_mask[rows, cols]
    out = torch.zeros(hidden.shape[0], dtype=flat.dtype, device=hidden.device)
    return out.index_add(0, rows, flat), target_mask.sum(1)


class FedPDPOModel(nn.Module):
    """Backbone (frozen) with the shared LoRA, plus ``self.local``: this client's head, reward head and adapter.

    One instance serves every client in a process: the engine swaps a client's local tensors in and out, so memory
    does not grow with the number of clients. ``perf`` (speed switches, results equal up to float rounding) is
    fixed here, when the model is built.
    """

    def __init__(
        self, backbone: PreTrainedModel, lora: LoraSettings, method: MethodConfig, perf: PerfSettings | None = None
    ) -> None:
        super().__init__()
        perf = perf or PerfSettings()
        hidden_size = int(backbone.config.hidden_size)
        self.ref_head_weight = backbone.get_output_embeddings().weight  # frozen original head W_0
        self.peft = add_lora(backbone, lora)
        self.decoder = self.peft.get_base_model().get_decoder()
        # First layer with LoRA: everything below it is frozen and identical for the policy and the reference.
        n_layers = _num_layers(backbone)
        safe = backbone.config.model_type in PREFIX_SAFE_MODEL_TYPES and hasattr(self.decoder, "norm")
        self.split_layer = max(0, n_layers - lora.last_n_layers) if lora.last_n_layers and safe else 0
        self.shared_prefix = perf.shared_prefix and self.split_layer > 0
        self.prefix = FrozenPrefix(self.decoder, self.split_layer, perf)
        self.project_all = not perf.response_only_logits  # send every real position through the head (as TRL)
        self.compiled_head = perf.compiled_head
        self.low_precision_copy = perf.frozen_low_precision_copy
        self._low_copies: dict[torch.dtype, list[tuple[nn.Linear, nn.Parameter]]] = {}
        self.local = nn.ModuleDict()  # named so that fedpdpo.model.naming.is_local recognises its tensors
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
        self._gate_on = True
        if method.lora_gate:
            lora_bs = lora_b_modules(self.peft)
            self.local["lora_gate"] = LoraGate(len(lora_bs))
            for index, module in enumerate(lora_bs):
                module.register_forward_hook(partial(self._gate_hook, index))
        # Train the global policy (shared LoRA, original head, no adapter) alongside the client's own, so the shared
        # tensors stay a good policy on their own (method.global_weight; only with local modules to differ from).
        self.train_global = method.global_weight > 0 and ("head" in self.local or "adapter" in self.local)

    # -- LoRA gate --------------------------------------------------------------------------------------------
    def _gate_hook(self, index: int, module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor | None:
        """Scale LoRA module ``index``'s update ``B A x`` by the client's gate (unless :meth:`gates_off`)."""
        if not self._gate_on:
            return None
        return output * self.gate_weight[index].to(output.dtype)

    @property
    def gated(self) -> bool:
        """Whether the client's policy scales the shared LoRA (``method.lora_gate``): its decoder pass then differs
        from the global policy's, which needs a pass of its own."""
        return "lora_gate" in self.local

    @property
    def gate_weight(self) -> torch.Tensor:
        """The client's gate ``g`` (one entry per LoRA module, in :func:`lora_b_modules` order); only when gated."""
        return self.local["lora_gate"].get_parameter("weight")

    @contextlib.contextmanager
    def gates_off(self) -> Iterator[None]:
        """Within the block the decoder runs the shared LoRA as aggregated (the global policy's decoder)."""
        previous, self._gate_on = self._gate_on, False
        try:
            yield
        finally:
            self._gate_on = previous

    # -- precision --------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen_weights_as(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Within the block, every frozen ``nn.Linear`` of the decoder (the LoRA layers' base weights included)
        holds a ``dtype`` copy of its weight, made once per model and dtype (``None``: no change).

        Meant for autocast to ``dtype``: autocast recasts a frozen fp32 weight at every call (it caches casts of
        trainable tensors only), and the copy holds exactly the values that cast gives, so outputs are unchanged.
        Embeddings, norms and the output head keep fp32 (they are not matmuls autocast would cast, or are cast
        once per call by :func:`response_logps`)."""
        if dtype is None or not self.low_precision_copy:
            yield
            return
        copies = self._low_copies.get(dtype)
        if copies is None:
            copies = self._low_copies[dtype] = [
                (m, nn.Parameter(m.weight.detach().to(dtype), requires_grad=False))
                for m in self.decoder.modules()
                # fp32 only: what autocast recasts (a 4-bit layer's packed uint8 weight is not a matrix to cast)
                if isinstance(m, nn.Linear) and not m.weight.requires_grad and m.weight.dtype == torch.float32
            ]
        originals = [(m, m.weight) for m, _ in copies]
        try:
            for m, low in copies:
                m.weight = low
            yield
        finally:
            for m, weight in originals:
                m.weight = weight

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

    @torch.no_grad()
    def lora_is_zero(self) -> bool:
        """Whether every LoRA update is exactly zero as loaded now (``A = 0`` or ``B = 0`` in each adapted layer):
        the global policy (shared LoRA, original head) is then the reference."""
        for module in self.peft.modules():
            if isinstance(module, LoraLayer):
                for key in module.lora_A:
                    if module.lora_A[key].weight.count_nonzero() and module.lora_B[key].weight.count_nonzero():
                        return False
        return True

    @torch.no_grad()
    def at_reference(self) -> bool:
        """Whether the client's policy is the reference bit for bit as loaded now: LoRA zero (:meth:`lora_is_zero`),
        the personal head equal to the original head, the adapter's up-projection zero (identity) and the reward
        head zero (all rewards 0). True at round 0 of every strategy whose policy starts at the reference."""
        if not self.lora_is_zero():
            return False
        if "head" in self.local and not torch.equal(self.local["head"].get_parameter("weight"), self.ref_head_weight):
            return False
        zero_linears = [m.up for m in self.local.children() if isinstance(m, BottleneckAdapter)]
        zero_linears += [m.score for m in self.local.children() if isinstance(m, RewardHead)]
        return all(not p.count_nonzero() for linear in zero_linears for p in linear.parameters())

    def delta_bases(self) -> dict[str, torch.Tensor]:
        """The frozen tensors some local tensors start as a copy of, by the local tensor's name: a finished run
        stores those as deltas from them (:class:`~fedpdpo.client.state.ClientStore`). The personalized head starts
        as the backbone's head ``W_0``."""
        return {HEAD_WEIGHT: self.ref_head_weight} if "head" in self.local else {}

    def initial_tensors(self) -> dict[str, torch.Tensor]:
        """A snapshot of all trainable tensors right after construction (the round-0 state of every client)."""
        return self.get_tensors(list(self.trainable()))

    # -- forward ----------------------------------------------------------------------------------------------
    def forward(self, batch: PairBatch, with_reference: bool = False, with_global: bool = False) -> PolicyOutput:
        """Policy log-probs and explicit rewards; with ``with_reference`` also the reference log-probs, which reuse
        the frozen prefix's output when the prefix is shared; with ``with_global`` (or while training the global
        policy) also the global policy's (the LoRA as loaded, the original head): from the same decoder pass, or for a
        gated client (``method.lora_gate``) from a second pass through the layers above the frozen prefix."""
        prefix = self.prefix.hidden(batch) if self.shared_prefix else None
        ref_logps = self.reference_logps(batch, prefix) if with_reference else None
        hidden = self._hidden(batch, prefix)
        global_logps = None
        if self.train_global or with_global:
            global_hidden = hidden
            if self.gated:  # the client's decoder is not the global one: a pass with the LoRA as aggregated
                grad = contextlib.nullcontext() if self.train_global else torch.no_grad()
                with self.gates_off(), grad:
                    global_hidden = self._hidden(batch, prefix)
            global_logps = self._logps(global_hidden, batch, self.ref_head_weight)[0]
        if "adapter" in self.local:
            hidden = self.local["adapter"](hidden)
        head = self.local["head"].get_parameter("weight") if "head" in self.local else self.ref_head_weight
        logps, n_tokens = self._logps(hidden, batch, head)
        rewards = self._rewards(batch, hidden) if "reward_head" in self.local else None
        return PolicyOutput(logps, rewards, n_tokens, ref_logps, global_logps)

    @torch.no_grad()
    def explicit_rewards(self, batch: PairBatch) -> torch.Tensor:
        """The reward head's ``r(x, y)`` alone, as :meth:`forward` gives it, without the policy's log-probs (a
        projection onto the whole vocabulary at every position) or a decoder pass for them: what best-of-N ranks
        its candidates by."""
        if self.reward_layer:
            return self._rewards(batch, None)
        hidden = self._hidden(batch, self.prefix.hidden(batch) if self.shared_prefix else None)
        if "adapter" in self.local:
            hidden = self.local["adapter"](hidden)
        return self._rewards(batch, hidden)

    @torch.no_grad()
    def own_scores(self, batch: PairBatch, beta: float) -> torch.Tensor:
        """What a client ranks its own responses by (best-of-N, on-policy pairs): the explicit reward ``r(x, y)``
        (:meth:`explicit_rewards`, one decoder pass), or without a reward head the implicit reward
        ``beta * (log pi - log pi_ref)``."""
        if "reward_head" in self.local:
            return self.explicit_rewards(batch)
        return beta * (self(batch).logps - self.reference_logps(batch))

    def _rewards(self, batch: PairBatch, hidden: torch.Tensor | None) -> torch.Tensor:
        """The reward head on ``hidden`` (the final hidden states after the adapter), or on the frozen layer
        ``method.reward_layer``'s output when that is set."""
        features = self.prefix.hidden(batch, self.reward_layer) if self.reward_layer else hidden
        return self.local["reward_head"](features, batch.response_mask)

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """log pi_ref: the frozen backbone with its original head, LoRA and local modules off (from the frozen
        prefix's output ``prefix`` when the caller has it)."""
        if prefix is None and self.shared_prefix:
            prefix = self.prefix.hidden(batch)
        with self.peft.disable_adapter():
            hidden = self._hidden(batch, prefix)
        return self._logps(hidden, batch, self.ref_head_weight)[0]

    @torch.no_grad()
    def global_logps(self, batch: PairBatch) -> torch.Tensor:
        """log pi_global: the backbone with the shared LoRA as loaded and the original head, local modules off:
        the policy every client shares (FedAvg's), against which a client judges its own modules."""
        prefix = self.prefix.hidden(batch) if self.shared_prefix else None
        with self.gates_off():
            return self._logps(self._hidden(batch, prefix), batch, self.ref_head_weight)[0]

    def _hidden(self, batch: PairBatch, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Final hidden states: the whole decoder, or only the layers above the frozen prefix on its output."""
        if prefix is None:
            return self.decoder(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
        with run_only(self.decoder, range(self.split_layer, len(self.decoder.layers)), final_norm=True):
            return self.decoder(
                inputs_embeds=prefix, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state

    def _logps(self, hidden: torch.Tensor, batch: PairBatch, head: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        project = batch.attention_mask if self.project_all else None
        return response_logps(
            hidden, batch.input_ids, batch.response_mask, head, project, batch.positions, self.compiled_head
        )
