"""Precision of the shared tensors on the wire (config key ``transfer_dtype``).

The server keeps the global shared tensors in fp32 and aggregates in float64; only what travels is rounded:
the global tensors sent to clients and the clients' updates sent back are cast to ``transfer_dtype``. fp16 and
bf16 halve the bytes per round; fp16 keeps more mantissa bits (10 against 7) for LoRA-sized values, bf16 the fp32
exponent range. Every engine rounds at the same two points, so results stay identical across engines.
"""

from __future__ import annotations

import torch

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def wire_dtype(name: str) -> torch.dtype:
    return WIRE_DTYPES[name]


def to_wire(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """CPU copies of ``tensors`` in the transfer dtype."""
    dtype = wire_dtype(name)
    return {k: v.detach().to("cpu", dtype, copy=True) for k, v in tensors.items()}


def from_wire(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp32 values of received tensors (the server aggregates and stores fp32)."""
    return {k: v.float() for k, v in tensors.items()}


def wire_bytes(tensors: dict[str, torch.Tensor], name: str) -> int:
    size = torch.empty(0, dtype=wire_dtype(name)).element_size()
    return sum(t.numel() for t in tensors.values()) * size
