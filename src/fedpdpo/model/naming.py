"""Which trainable tensor is what, by name: the one place that knows the parameter naming rules.

``FedPDPOModel`` names its trainable tensors after where they live: PEFT's LoRA matrices carry ``.lora_A.`` /
``.lora_B.`` (PEFT's own ``prefix``), the per-client modules live under ``local.`` (the model's ``local``
ModuleDict). Strategies ask this module which tensors may be shared, the trainer which optimizer group a tensor
belongs to (as nanoGPT's ``configure_optimizers`` splits its parameters by name), export which keys must load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

from fedpdpo.config import RunConfig

#: Attribute of ``FedPDPOModel`` holding the client's local modules; their tensor names start with ``"local."``.
LOCAL = "local"
LORA_MARK = ".lora_"  # PEFT's tuner prefix "lora_", as it appears inside a parameter name
LORA_A_MARK = ".lora_A."
REWARD_HEAD = f"{LOCAL}.reward_head"
LORA_GATE = f"{LOCAL}.lora_gate"
#: The personalized head's weight: initialised as a copy of the backbone's output head, so a finished run stores it
#: as a small delta from that head (``ClientStore.finalize``).
HEAD_WEIGHT = f"{LOCAL}.head.weight"
#: Ditto's personal copy of shared tensor ``n`` is kept in the client's local state under ``PERSONAL + n``.
PERSONAL = "personal/"

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def is_lora(name: str) -> bool:
    """A LoRA matrix of the backbone: the only tensors a strategy may share (never a local tensor, even one whose
    name holds the mark, such as the client's ``local.lora_gate``)."""
    return LORA_MARK in name and not is_local(name)


def is_lora_a(name: str) -> bool:
    """LoRA's down-projection ``A`` (FedSA-LoRA shares only these)."""
    return LORA_A_MARK in name


def is_local(name: str) -> bool:
    """A tensor of the client's local modules (personalized head, reward head, adapter): never shared."""
    return name.startswith(LOCAL + ".")


def is_head(name: str) -> bool:
    """The personalized LM head's weight (FedPer's and FedRep's local head too)."""
    return name == HEAD_WEIGHT


def is_reward_head(name: str) -> bool:
    return name.startswith(REWARD_HEAD)


def is_lora_gate(name: str) -> bool:
    """The client's scales of the shared LoRA updates (``method.lora_gate``)."""
    return name.startswith(LORA_GATE)


def layer_of(name: str) -> int | None:
    """The decoder layer index in a backbone tensor's name (None for tensors outside the layers)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def lora_names(names: Iterable[str]) -> list[str]:
    """The LoRA tensors among ``names``: what strategies choose their shared tensors from."""
    return [n for n in names if is_lora(n)]


def personal_copies(local: dict) -> dict:
    """The personal copies of shared tensors in a client's local state, by the shared tensor's name (Ditto)."""
    return {n[len(PERSONAL) :]: v for n, v in local.items() if n.startswith(PERSONAL)}


def without_personal_copies(local: dict) -> dict:
    """A client's local state without Ditto's personal copies: what loads into the model's own parameters."""
    return {n: v for n, v in local.items() if not n.startswith(PERSONAL)}


def optimizer_groups(params: dict[str, nn.Parameter], cfg: RunConfig) -> list[dict]:
    """AdamW parameter groups: LoRA at ``lr`` (shared or kept local: local, fedsa-lora, lg-fedavg) and the local
    modules at their own scale: the 28M-parameter personalized head needs a smaller step than LoRA, the reward head
    (a linear probe) a larger one; with ``method.head_lr_scale`` the head gets its own group apart from the adapter,
    and the LoRA gate (a few scalars) its own, at ``method.gate_lr_scale``. Within a group the parameters keep the
    model's order (the optimizer state of a resumed client is matched by position)."""
    method = cfg.method
    own_head = method.head_lr_scale > 0

    def own_group(n: str) -> bool:
        return is_reward_head(n) or is_lora_gate(n) or (own_head and is_head(n))

    modules = [p for n, p in params.items() if is_local(n) and not own_group(n)]
    head = [p for n, p in params.items() if own_head and is_head(n)]
    reward = [p for n, p in params.items() if is_reward_head(n)]
    gate = [p for n, p in params.items() if is_lora_gate(n)]
    groups: list[dict] = [{"params": [p for n, p in params.items() if not is_local(n)], "lr": cfg.lr}]
    for members, scale in (
        (modules, method.local_lr_scale),
        (head, method.head_lr_scale),
        (reward, method.reward_lr_scale),
        (gate, method.gate_lr_scale),
    ):
        if members:
            groups.append({"params": members, "lr": cfg.lr * scale})
    return groups
