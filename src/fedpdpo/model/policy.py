"""The FedPDPO model: frozen backbone + shared LoRA + a client's local modules, and the frozen reference.

Policy for client k:   h = Adapter_k(Decoder_{theta, LoRA}(x)),  log pi_k(y|x) = sum_t log softmax(W_k h_{t-1})[y_t]
Reference:             h = Decoder_theta(x) (LoRA off),           log pi_ref(y|x) with the original head W_0
Explicit reward:       r_k(x, y) = RewardHead_k(h on the response tokens)

Log-probabilities are computed only on response positions and in chunks: the output head over a 49k-262k
vocabulary dominates the cost, and prompt positions never enter the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from fedpdpo.config import LoraSettings, MethodConfig
from fedpdpo.data.tokenize import PairBatch
from fedpdpo.model.modules import BottleneckAdapter, PersonalHead, RewardHead

LOGIT_CHUNK = 1024  # response tokens per chunk of the vocabulary projection


@dataclass
class PolicyOutput:
    logps: torch.Tensor  # [2B] summed response log-probs under the policy
    rewards: torch.Tensor | None  # [2B] explicit rewards, None without a reward head
    n_tokens: torch.Tensor  # [2B] response lengths


def _num_layers(model: nn.Module) -> int:
    return int(model.config.num_hidden_layers)


def add_lora(model: nn.Module, cfg: LoraSettings):
    layers = None
    if cfg.last_n_layers:
        n = _num_layers(model)
        layers = list(range(max(0, n - cfg.last_n_layers), n))
    lora = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def response_logps(hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor, weight: torch.Tensor):
    """Sum of log p(y_t | y_<t) over response tokens, per sequence.

    ``hidden`` [N, L, H]; the token at position t is predicted from the hidden state at t-1, so response positions
    are shifted left by one before the (chunked) vocabulary projection.
    """
    target_mask = response_mask[:, 1:]
    rows, cols = target_mask.nonzero(as_tuple=True)
    states = hidden[:, :-1][rows, cols]  # [T, H]
    targets = input_ids[:, 1:][rows, cols]  # [T]
    token_logps = []
    for start in range(0, states.shape[0], LOGIT_CHUNK):
        logits = states[start : start + LOGIT_CHUNK] @ weight.T
        logits = logits.float()
        tgt = targets[start : start + LOGIT_CHUNK]
        token_logps.append(logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    flat = torch.cat(token_logps) if token_logps else hidden.new_zeros(0)
    out = torch.zeros(hidden.shape[0], dtype=flat.dtype, device=hidden.device)
    return out.index_add(0, rows, flat), target_mask.sum(1)


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
        self.local = nn.ModuleDict()
        if method.personal_head:
            self.local["head"] = PersonalHead(self.ref_head_weight)
        if method.reward_head:
            self.local["reward_head"] = RewardHead(hidden_size, method.reward_pooling)
        if method.adapter:
            self.local["adapter"] = BottleneckAdapter(hidden_size, method.adapter_dim)

    # -- parameters -------------------------------------------------------------------------------------------
    def trainable(self) -> dict[str, nn.Parameter]:
        """Every parameter that training updates: LoRA tensors and local modules, by name."""
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def lora_names(self) -> list[str]:
        return [n for n in self.trainable() if ".lora_" in n]

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
        return self.decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state

    def forward(self, batch: PairBatch) -> PolicyOutput:
        hidden = self._hidden(batch)
        if "adapter" in self.local:
            hidden = self.local["adapter"](hidden)
        head = self.local["head"].weight if "head" in self.local else self.ref_head_weight
        logps, n_tokens = response_logps(hidden, batch.input_ids, batch.response_mask, head)
        rewards = self.local["reward_head"](hidden, batch.response_mask) if "reward_head" in self.local else None
        return PolicyOutput(logps, rewards, n_tokens)

    @torch.no_grad()
    def reference_logps(self, batch: PairBatch) -> torch.Tensor:
        """log pi_ref: the frozen backbone with its original head, LoRA and local modules off."""
        with self.peft.disable_adapter():
            hidden = self._hidden(batch)
        return response_logps(hidden, batch.input_ids, batch.response_mask, self.ref_head_weight)[0]
