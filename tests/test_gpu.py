"""GPU readiness: device selection, bf16 autocast, export and a 2-client real-model run on CUDA, 4-bit backbones.

Every test marked ``gpu`` skips on a machine without a CUDA device (and the 4-bit ones without bitsandbytes), so
the default suite collects them and they cost nothing there; ``benchmarks/gpu_check.sh`` runs them where there is a
GPU (``pytest -m gpu``). The unmarked tests at the end are the CPU side: what a CPU-only machine must say about the
GPU-only settings, and the check script itself.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fedpdpo.client import ClientState, evaluate, fit
from fedpdpo.client.trainer import compute_dtype, device_of, reference_logps
from fedpdpo.config import load_config
from fedpdpo.engines.setup import build_setup
from fedpdpo.errors import ConfigError
from tests.conftest import IMDB, ROOT, SMOLLM2_SMALL, TINY_CONFIG, subprocess_env

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA device")
needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


@pytest.mark.gpu
@needs_cuda
def test_auto_device_is_cuda_and_training_stays_there(tiny_cfg):
    tiny_cfg.device = "auto"
    setup = build_setup(tiny_cfg)
    assert device_of(setup.cfg).type == "cuda"
    task, state = setup.tasks[0], ClientState()
    # the reference pass may come first (the benchmark asks for it before fit): it moves the model there too
    assert torch.isfinite(reference_logps(setup.model, task.test, setup.cfg, task.pad_id)).all()
    result = fit(setup.model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    assert all(p.device.type == "cuda" for p in setup.model.trainable().values())
    assert all(t.device.type == "cpu" for t in result.shared.values())  # what travels is on the CPU
    assert all(torch.isfinite(t).all() for t in result.shared.values())
    # the frozen prefix ran batched on the GPU: nothing went through the per-sequence cache (FrozenPrefix.caches)
    assert len(setup.model.prefix.cache) == 0 and setup.model.prefix.cache.misses == 0


@pytest.mark.gpu
@needs_cuda
def test_bf16_autocast_on_cuda_keeps_round0_exact_and_logps_close():
    cfg = load_config(TINY_CONFIG, [*SMOLLM2_SMALL, 'device="cuda"', 'precision="auto"'])
    setup = build_setup(cfg)
    if not torch.cuda.is_bf16_supported():
        assert compute_dtype(setup.cfg) is None
        pytest.skip("this GPU has no bf16: auto is fp32")
    assert compute_dtype(setup.cfg) == torch.bfloat16
    task = setup.tasks[0]
    full = dataclasses.replace(setup.cfg, perf=dataclasses.replace(setup.cfg.perf, skip_reference_eval=False))
    metrics = evaluate(setup.model, task, ClientState(), setup.initial_global(), setup.initial, full)
    assert metrics["accuracy_implicit"] == 0.5 and metrics["rewards/margins"] == 0.0  # policy == reference
    bf16 = reference_logps(setup.model, task.test, setup.cfg, task.pad_id)
    fp32 = reference_logps(setup.model, task.test, dataclasses.replace(setup.cfg, precision="fp32"), task.pad_id)
    tokens = torch.tensor([[len(p.chosen_ids), len(p.rejected_ids)] for p in task.test], dtype=torch.float32)
    assert ((bf16 - fp32).abs() / tokens).max() < 0.05  # nats per token


@pytest.mark.gpu
@needs_cuda
def test_export_of_a_gpu_run_scores_the_same_on_gpu_and_cpu(tmp_path):
    from fedpdpo.engines.inprocess import run_inprocess
    from fedpdpo.export import export_client, load_personalized
    from fedpdpo.generate import score

    cfg = load_config(TINY_CONFIG, ["rounds=1", "local_steps=3", 'device="cuda"'])
    run_inprocess(cfg, tmp_path / "run", quiet=True)
    export_client(tmp_path / "run", 0, tmp_path / "adapter")
    cm = load_personalized(tmp_path / "adapter")
    on_cpu = score(cm, "a prompt", ["a response", "another response"])
    cm.model.to("cuda")
    on_gpu = score(cm, "a prompt", ["a response", "another response"])
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert a.logp == pytest.approx(b.logp, rel=1e-4, abs=1e-3)
        assert a.implicit == pytest.approx(b.implicit, rel=1e-3, abs=1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(not IMDB.is_file(), reason="shared IMDB data not present")
def test_two_client_real_model_run_on_cuda(tmp_path):
    out = tmp_path / "run"
    args = ["run", "--config", str(ROOT / "configs" / "demo.toml"), "--out", str(out), "--quiet"]
    for item in ("num_clients=2", "rounds=2", "data.max_train_per_client=32", "data.max_test_per_client=24"):
        args += ["--set", item]
    args += ["--set", 'device="cuda"']
    proc = subprocess.run(
        [sys.executable, "-m", "fedpdpo.cli", *args], capture_output=True, text=True, env=subprocess_env(), check=False
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mean_accuracy_round0"] == 0.5
    assert summary["precision_used"] == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert len(summary["clients"]) == 2 and all(0 <= c["accuracy"] <= 1 for c in summary["clients"])


@pytest.mark.gpu
@needs_cuda
@needs_bnb
def test_4bit_backbone_trains_lora_and_heads():
    cfg = load_config(TINY_CONFIG, [*SMOLLM2_SMALL, 'device="cuda"', 'model_quantization="4bit"'])
    setup = build_setup(cfg)
    backbone = setup.model.peft.get_base_model()
    assert getattr(backbone, "is_loaded_in_4bit", False)
    assert setup.model.ref_head_weight.dtype == torch.float32  # the head is never quantized
    task, state = setup.tasks[0], ClientState()
    shared = setup.initial_global()
    before = evaluate(setup.model, task, state, shared, setup.initial, setup.cfg)
    assert before["accuracy"] == 0.5
    result = fit(setup.model, task, state, shared, setup.initial, setup.cfg, server_round=1)
    assert any(not torch.equal(result.shared[n], shared[n]) for n in shared)
    assert all(torch.isfinite(t).all() for t in result.shared.values())
    after = evaluate(setup.model, task, state, result.shared, setup.initial, setup.cfg)
    assert after["reward_margin"] != 0.0
    # 4-bit linear layers: the backbone takes far less GPU memory than fp32 would (135M parameters = 540 MB)
    assert backbone.get_memory_footprint() < 0.6 * 135e6 * 4


# -- the CPU side ------------------------------------------------------------------------------------------------


@pytest.mark.skipif(CUDA, reason="checks what a machine without CUDA says")
def test_4bit_without_cuda_is_a_one_line_config_error(tiny_cfg, tmp_path, capsys):
    tiny_cfg.model_quantization = "4bit"
    with pytest.raises(ConfigError, match=r"model_quantization.*CUDA"):
        build_setup(tiny_cfg)
    from fedpdpo.cli import main

    code = main(
        ["run", "--config", str(TINY_CONFIG), "--out", str(tmp_path / "r"), "--set", 'model_quantization="4bit"']
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model_quantization" in err
    assert not (tmp_path / "r").exists()


def test_gpu_check_script_parses_and_stops_cleanly_without_a_gpu(tmp_path):
    script = ROOT / "benchmarks" / "gpu_check.sh"
    assert os.access(script, os.X_OK)
    bash = shutil.which("bash")
    assert bash is not None
    assert subprocess.run([bash, "-n", str(script)], check=False).returncode == 0
    if CUDA:
        pytest.skip("this machine has a GPU: the script would run for real")
    env = subprocess_env(GPU_CHECK_OUT=str(tmp_path / "out"), PATH=f"{tmp_path}:{os.environ['PATH']}")
    # no nvidia-smi on PATH, or one that finds no GPU: the script says so and exits 0 without installing anything
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'No devices were found' >&2\nexit 6\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    proc = subprocess.run([bash, str(script)], capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_tests_are_marked():
    """Every test of this file that needs CUDA carries the ``gpu`` marker (registered in pyproject.toml), so that
    ``pytest -m gpu`` runs them all."""
    assert '"gpu:' in (ROOT / "pyproject.toml").read_text()
    tests = {name: fn for name, fn in globals().items() if name.startswith("test_") and callable(fn)}
    cuda_tests = [fn for fn in tests.values() if needs_cuda.mark in getattr(fn, "pytestmark", [])]
    assert len(cuda_tests) == 5
    assert all(any(m.name == "gpu" for m in fn.pytestmark) for fn in cuda_tests)
