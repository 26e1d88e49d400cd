"""``method.lora_gate``: a client's own scale of each shared LoRA update, and the global policy that ignores it."""

from __future__ import annotations

import pytest
import torch

from fedpdpo.engines.setup import build_model
from fedpdpo.model.naming import LORA_GATE, optimizer_groups
from fedpdpo.sampling import SamplingConfig, sample_responses
from fedpdpo.strategies import get_strategy
from tests.test_model import tiny_batch

GATE = f"{LORA_GATE}.weight"


def _gated(tiny_cfg):
    """A gated model and the same model without the gate, both with the same random non-zero LoRA."""
    tiny_cfg.method.lora_gate = True
    gated, tokenizer = build_model(tiny_cfg)
    tiny_cfg.method.lora_gate = False
    plain, _ = build_model(tiny_cfg)
    gen = torch.Generator().manual_seed(0)
    lora = {n: 0.2 * torch.randn(p.shape, generator=gen) for n, p in plain.trainable().items() if ".lora_" in n}
    gated.set_tensors(lora)
    plain.set_tensors(lora)
    return gated, plain, tiny_batch(tiny_cfg, tokenizer)


def _set_gate(model, value: float) -> None:
    model.set_tensors({GATE: torch.full_like(model.trainable()[GATE], value)})


@torch.no_grad()
def test_gate_is_one_scalar_per_lora_module_starting_at_one(tiny_cfg):
    gated, plain, batch = _gated(tiny_cfg)
    n_lora_b = sum(".lora_B." in n for n in plain.trainable())
    assert gated.trainable()[GATE].tolist() == [1.0] * n_lora_b
    torch.testing.assert_close(gated(batch).logps, plain(batch).logps, rtol=0, atol=0)


@torch.no_grad()
def test_gate_zero_leaves_the_frozen_backbone_and_the_global_policy_keeps_the_lora(tiny_cfg):
    gated, plain, batch = _gated(tiny_cfg)
    _set_gate(gated, 0.0)
    ref = gated.reference_logps(batch)
    # local modules at their start (head = W_0, adapter = identity): with the LoRA gated off the policy is the reference
    torch.testing.assert_close(gated(batch).logps, ref)
    global_ = plain(batch).logps
    assert not torch.allclose(global_, ref)
    torch.testing.assert_close(gated.global_logps(batch), global_)
    torch.testing.assert_close(gated(batch, with_global=True).global_logps, global_)


@torch.no_grad()
def test_a_negative_gate_turns_the_shared_direction_around(tiny_cfg):
    """With g = -1 a layer's update is -B A x: the same as the plain model with B negated."""
    gated, plain, batch = _gated(tiny_cfg)
    _set_gate(gated, -1.0)
    flipped = {n: -p for n, p in plain.trainable().items() if ".lora_B." in n}
    plain.set_tensors(flipped)
    torch.testing.assert_close(gated(batch).logps, plain(batch).logps)


def test_gate_learns_at_its_own_step_and_is_never_shared(tiny_cfg):
    gated, _, batch = _gated(tiny_cfg)
    params = gated.trainable()
    assert GATE not in get_strategy("fedpdpo").shared_names(list(params))
    tiny_cfg.method.lora_gate, tiny_cfg.lr, tiny_cfg.method.gate_lr_scale = True, 1e-3, 50.0
    groups = optimizer_groups(params, tiny_cfg)
    (gate_group,) = [g for g in groups if any(p is params[GATE] for p in g["params"])]
    assert gate_group["lr"] == pytest.approx(0.05) and len(gate_group["params"]) == 1
    assert sum(len(g["params"]) for g in groups) == len(params)
    gated(batch).logps.sum().backward()
    assert params[GATE].grad is not None and params[GATE].grad.abs().sum() > 0


def test_baselines_have_no_gate(tiny_cfg):
    tiny_cfg.method.lora_gate = True
    for name in ("fedavg", "fedper", "local"):
        model, _ = build_model(get_strategy(name).configure(tiny_cfg))
        assert "lora_gate" not in model.local
    model, _ = build_model(get_strategy("fedpdpo").configure(tiny_cfg))
    assert "lora_gate" in model.local


def test_global_samples_ignore_the_gate(tiny_cfg):
    gated, plain, batch = _gated(tiny_cfg)
    _set_gate(gated, -1.0)
    prompt = batch.input_ids[0, :5].tolist()
    sampling = SamplingConfig(max_new_tokens=6, seed=3)
    global_ = sample_responses(gated, prompt, "global", 2, sampling, set())
    assert global_ == sample_responses(plain, prompt, "global", 2, sampling, set())
    assert sample_responses(gated, prompt, "personalized", 2, sampling, set()) != global_


def test_a_gated_run_reports_where_each_clients_gate_stands(tiny_cfg, tmp_path):
    import json

    from fedpdpo.engines.inprocess import run_inprocess

    tiny_cfg.method.lora_gate, tiny_cfg.rounds, tiny_cfg.local_steps = True, 1, 2
    run_inprocess(tiny_cfg, tmp_path / "run", quiet=True)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    gates = [r for r in rows if any("lora_gate/mean" in k for k in r)]
    assert gates, "no lora_gate metrics in metrics.jsonl"
    for row in gates:
        (mean,) = [v for k, v in row.items() if k.endswith("lora_gate/mean")]
        assert mean != 1.0  # two steps at lr * 50 moved it
