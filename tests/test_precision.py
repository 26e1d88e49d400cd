"""Mixed precision (``precision = "auto" | "fp32" | "bf16"``) and the round-0 evaluation from the reference.

bf16 autocast runs the forward passes; weights, optimizer, log-softmax, sequence sums and the DPO margin stay fp32,
and the reference is computed in the policy's precision, so round 0 is exactly 0.5 in either precision. The tiny
model checks the mechanics in the default suite (bf16 is forced there, so it runs on any CPU); the real-model bounds
are a smoke test (seconds) and a slow test (a short run in each precision).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from fedpdpo.client import ClientState, evaluate, fit, trainer
from fedpdpo.client.trainer import autocast, compute_dtype, precision_used, reference_logps
from fedpdpo.config import load_config
from fedpdpo.data.tokenize import collate
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.engines.setup import build_setup
from tests.conftest import IMDB, ROOT, TINY_CONFIG


@pytest.mark.parametrize("hardware", [True, False])
def test_auto_takes_bf16_only_where_the_hardware_has_it(tiny_cfg, monkeypatch, hardware):
    monkeypatch.setattr(trainer, "has_bf16", lambda device: hardware)
    tiny_cfg.precision = "auto"
    assert compute_dtype(tiny_cfg) == (torch.bfloat16 if hardware else None)
    assert precision_used(tiny_cfg) == ("bf16" if hardware else "fp32")
    tiny_cfg.precision = "fp32"
    assert compute_dtype(tiny_cfg) is None and precision_used(tiny_cfg) == "fp32"
    tiny_cfg.precision = "bf16"  # forced, even where it would be emulated
    assert compute_dtype(tiny_cfg) == torch.bfloat16 and precision_used(tiny_cfg) == "bf16"


def _full_eval(cfg):
    """``cfg`` with the round-0 shortcut off: every policy is run."""
    return dataclasses.replace(cfg, perf=dataclasses.replace(cfg.perf, skip_reference_eval=False))


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algorithm", ["fedpdpo", "fedavg", "ditto", "fedrep", "fedsa-lora", "local"])
def test_round0_from_the_reference_gives_the_full_evaluation(tiny_cfg, monkeypatch, algorithm, precision):
    """At round 0 the policy is the reference bit for bit: the metrics computed from the cached reference alone are
    exactly those of running the policy, in both precisions, and accuracies are exactly 0.5."""
    tiny_cfg.algorithm, tiny_cfg.precision = algorithm, precision
    tiny_cfg.lora.last_n_layers = 1  # the frozen prefix and its cache are on the path
    setup = build_setup(tiny_cfg)
    model, task = setup.model, setup.tasks[0]
    assert task.val, "the validation pairs are scored too"
    args = (setup.initial_global(), setup.initial)
    full = evaluate(model, task, ClientState(), *args, _full_eval(setup.cfg))
    calls = []
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(a))
    monkeypatch.setattr(model, "global_logps", lambda *a, **k: calls.append(a))
    fast = evaluate(model, task, ClientState(), *args, setup.cfg)
    assert not calls, "the shortcut ran a policy"
    assert fast == full
    assert all(v == 0.5 for k, v in full.items() if k.startswith(("accuracy", "val/accuracy")) and k != "accuracy_logp")
    assert full["rewards/margins"] == 0.0


def test_shortcut_only_while_the_policy_is_the_reference(tiny_cfg):
    setup = build_setup(tiny_cfg)
    model = setup.model
    assert model.at_reference() and model.lora_is_zero()
    task, state = setup.tasks[0], ClientState()
    result = fit(model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    trainer.load_client(model, result.shared, state, setup.initial)
    assert not model.at_reference() and not model.lora_is_zero()
    after = evaluate(model, task, state, result.shared, setup.initial, setup.cfg)
    assert after == evaluate(model, task, state, result.shared, setup.initial, _full_eval(setup.cfg))
    assert after["rewards/margins"] != 0.0
    # each local module alone breaks the identity
    for name in ("local.head.weight", "local.adapter.up.bias", "local.reward_head.score.bias"):
        trainer.load_client(model, setup.initial_global(), ClientState(), setup.initial)
        assert model.at_reference()
        model.set_tensors({name: setup.initial[name] + 1e-3})
        assert not model.at_reference() and model.lora_is_zero(), name


def test_bf16_run_records_its_precision_and_starts_at_one_half(tiny_cfg, tmp_path):
    tiny_cfg.precision, tiny_cfg.rounds = "bf16", 1
    summary = run_inprocess(tiny_cfg, tmp_path / "run", quiet=True)
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["precision"] == "bf16" and saved["precision_used"] == "bf16"
    assert summary["mean_accuracy_round0"] == 0.5
    assert all(torch.isfinite(torch.tensor(c["accuracy"])) for c in summary["clients"])


def test_master_weights_and_optimizer_stay_fp32_in_bf16(tiny_cfg):
    tiny_cfg.precision = "bf16"
    setup = build_setup(tiny_cfg)
    task, state = setup.tasks[0], ClientState()
    result = fit(setup.model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    assert all(t.dtype == torch.float32 for t in result.shared.values())
    assert all(t.dtype == torch.float32 for t in state.local.values())
    moments = [v for s in state.optimizer["state"].values() for k, v in s.items() if k.startswith("exp_avg")]
    assert moments and all(m.dtype == torch.float32 for m in moments)
    assert state.reference["train"].dtype == torch.float32


# -- the real model -----------------------------------------------------------------------------------------------

SMOLLM2 = [
    'model="smollm2"',
    "num_clients=1",
    "max_length=64",
    "data.max_prompt_length=0",
    "lora.last_n_layers=2",
    "method.adapter_dim=16",
    "data.max_train_per_client=4",
    "data.max_test_per_client=4",
    "data.validation_fraction=0.0",
    "partition.conflict_fraction=0.0",
]


@pytest.mark.smoke
def test_smollm2_bf16_logps_close_to_fp32():
    """The error bf16 autocast puts into a sequence's log-prob and into DPO's policy-minus-reference margin, on the
    real model (measured: about 0.005 nats per token on average; the margin's error is smaller, because policy and
    reference share the same rounding of the frozen prefix)."""
    setup = build_setup(load_config(TINY_CONFIG, SMOLLM2))
    model, task = setup.model, setup.tasks[0]
    pairs = task.test
    fp32 = dataclasses.replace(setup.cfg, precision="fp32")
    bf16 = dataclasses.replace(setup.cfg, precision="bf16")
    ref = {c.precision: reference_logps(model, pairs, c, task.pad_id) for c in (fp32, bf16)}
    tokens = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in pairs], dtype=torch.float32)
    per_token = (ref["bf16"] - ref["fp32"]).abs() / tokens
    assert per_token.mean() < 0.02 and per_token.max() < 0.05
    # a policy away from the reference: the DPO margin h = (pi - ref)_chosen - (pi - ref)_rejected
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable().values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    batch = collate(pairs, task.pad_id)
    margins = {}
    for c in (fp32, bf16):
        with torch.no_grad(), autocast(c, model):
            out = model(batch, with_reference=True)
        h = out.logps.float() - out.ref_logps.float()
        margins[c.precision] = h[: len(pairs)] - h[len(pairs) :]
    error = (margins["bf16"] - margins["fp32"]).abs()
    assert error.mean() < 0.25 * margins["fp32"].abs().mean() + 0.05


@pytest.mark.slow
@pytest.mark.skipif(not IMDB.is_file(), reason="shared IMDB data not present")
def test_bf16_and_fp32_short_runs_reach_the_same_accuracy(tmp_path: Path):
    """A short demo-config run in each precision: the held-out accuracies agree within noise (3 clients x 24 test
    pairs: one standard error of a mean accuracy near 0.7 is about 0.05)."""
    from fedpdpo.cli import main

    summaries = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = ["run", "--config", str(ROOT / "configs" / "demo.toml"), "--out", str(out), "--quiet"]
        for item in ("rounds=2", "data.max_train_per_client=32", "data.max_test_per_client=24"):
            args += ["--set", item]
        args += ["--set", f'precision="{precision}"']
        assert main(args) == 0
        summaries[precision] = json.loads((out / "summary.json").read_text())
    assert summaries["bf16"]["precision_used"] == "bf16"
    for s in summaries.values():
        assert s["mean_accuracy_round0"] == 0.5
    assert abs(summaries["bf16"]["mean_accuracy"] - summaries["fp32"]["mean_accuracy"]) <= 0.1


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algorithm", ["fedpdpo", "fedrep"])
def test_global_margins_from_the_personalized_pass_are_the_separate_pass(tiny_cfg, algorithm, precision):
    """Evaluation takes the global policy's log-probs from the client's own decoder pass (before its adapter, with the
    original head): the same bits as running the global policy separately."""
    tiny_cfg.algorithm, tiny_cfg.precision = algorithm, precision
    tiny_cfg.lora.last_n_layers = 1
    setup = build_setup(tiny_cfg)
    model, task, state = setup.model, setup.tasks[0], ClientState()
    result = fit(model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    trainer.ensure_reference(model, task, state, setup.cfg, ("test", "val"))
    trainer.load_client(model, result.shared, state, setup.initial, personal=True)
    assert len(model.local) and not model.lora_is_zero()
    for split in ("test", "val"):
        ref = state.reference[split]
        scores = trainer._score_split(model, task.split(split), ref, setup.cfg, task.pad_id, with_global=True)
        separate = trainer._global_margins(model, task.split(split), ref, setup.cfg, task.pad_id)
        assert torch.equal(scores.margins["global"], separate)
        assert not torch.equal(scores.margins["global"], scores.margins["implicit"])


@pytest.mark.parametrize("with_copy", [True, False])
def test_frozen_bf16_copies_give_the_same_bits_and_are_put_back(tiny_cfg, with_copy):
    """Under bf16 autocast the frozen Linear weights are swapped for bf16 copies (perf.frozen_low_precision_copy):
    the log-probs, rewards and gradients equal those of autocast casting the fp32 weights itself, and the fp32
    weights are back in place afterwards."""
    tiny_cfg.precision = "bf16"
    tiny_cfg.lora.last_n_layers = 1
    setup = build_setup(tiny_cfg)
    model, task = setup.model, setup.tasks[0]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.trainable().values():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    batch = collate(task.train[:4], task.pad_id)
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}

    def run(copy: bool) -> tuple[torch.Tensor, ...]:
        model.low_precision_copy = copy
        with autocast(setup.cfg, model):
            out = model(batch, with_reference=True)
        loss = out.logps.float().sum() + out.rewards.float().sum()
        grads = torch.autograd.grad(loss, list(model.trainable().values()))
        return (out.logps, out.ref_logps, out.rewards, *grads)

    plain, copied = run(False), run(with_copy)
    assert all(torch.equal(a, b) for a, b in zip(plain, copied, strict=True))
    after = dict(model.named_parameters())
    assert all(after[n] is p and p.dtype == torch.float32 for n, p in frozen.items())
