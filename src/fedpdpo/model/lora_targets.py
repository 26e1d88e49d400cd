"""Check ``lora.target_modules`` against the backbone before PEFT sees it.

PEFT answers a name that matches nothing with a long traceback, and says nothing when only some names match
(``["q_proj", "foo_proj"]`` silently trains q_proj alone). Both are typos the user should hear about, once, naming
the module and the layer names the model has.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from fedpdpo.errors import ConfigError

#: Module types PEFT's LoRA can wrap.
LORA_TYPES = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D)


def check_target_modules(model: nn.Module, targets: Sequence[str]) -> None:
    """Every name in ``targets`` must match a LoRA-able module as PEFT matches list entries (full name or suffix)."""
    names = [name for name, module in model.named_modules() if isinstance(module, LORA_TYPES)]
    for target in targets:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            known = sorted({name.rsplit(".", 1)[-1] for name in names})
            raise ConfigError(
                f"config key 'lora.target_modules': {target!r} matches no layer of the model that LoRA can adapt; "
                f"those are named {', '.join(known)}"
            )
