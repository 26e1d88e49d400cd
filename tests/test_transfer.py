"""Shared tensors on the wire in fp16/bf16 (``transfer_dtype``): fewer bytes, same results in every engine."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.errors import ConfigError
from tests.test_flower_apps import Recorder, run_on_local_grid


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_transfer_halves_bytes_and_matches_across_engines(tiny_cfg, tmp_path, dtype):
    full = run_inprocess(tiny_cfg, tmp_path / "fp32", quiet=True)
    tiny_cfg.transfer_dtype = dtype
    half = run_inprocess(tiny_cfg, tmp_path / dtype, quiet=True)
    assert (
        half["communication"]["uplink_bytes_per_client_round"] * 2
        == full["communication"]["uplink_bytes_per_client_round"]
    )
    # the server keeps fp32 globals; rounding on the wire moves them, but only by about the dtype's resolution
    g32, g16 = load_file(tmp_path / "fp32" / "global.safetensors"), load_file(tmp_path / dtype / "global.safetensors")
    assert all(g16[k].dtype == torch.float32 for k in g16)
    assert any(not torch.equal(g16[k], g32[k]) for k in g32)
    for k in g32:
        torch.testing.assert_close(g16[k], g32[k], rtol=0.05, atol=0.02)

    recorder = Recorder()
    flower = run_on_local_grid(tiny_cfg, tmp_path / "flower", app=recorder)
    assert [c["accuracy"] for c in flower["clients"]] == [c["accuracy"] for c in half["clients"]]
    gf = load_file(tmp_path / "flower" / "global.safetensors")
    assert all(torch.equal(gf[k], g16[k]) for k in g16)  # same bits as the in-process engine
    wire = torch.int16 if dtype == "bfloat16" else torch.float16  # ArrayRecord has no bf16: its bit pattern
    for msg, reply in recorder.log:
        for message in (msg, reply):
            for record in message.content.array_records.values():
                assert {a.dtype for a in record.to_torch_state_dict().values()} == {wire}
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["communication"] == half["communication"]


def test_half_precision_transfer_refuses_privacy_mods(tiny_cfg):
    tiny_cfg.transfer_dtype = "float16"
    tiny_cfg.privacy.clipping_norm = 1.0
    with pytest.raises(ConfigError, match="transfer_dtype"):
        tiny_cfg.validate()
