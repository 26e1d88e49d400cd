"""Checkpoints and exact resume: a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fedpdpo.cli import main
from fedpdpo.client.state import ClientState, ClientStore, atomic_write
from fedpdpo.engines.checkpoint import (
    ServerCheckpoint,
    capture_rng,
    load_checkpoint,
    restore_rng,
    rewind_metrics,
    save_checkpoint,
)
from fedpdpo.errors import FedPDPOError
from fedpdpo.strategies import STRATEGIES, get_strategy
from fedpdpo.strategies.base import ClientUpdate
from tests.conftest import ROOT, TINY_CONFIG, interrupt_at_checkpoint, subprocess_env

ROUNDS = 3
RUN = [sys.executable, "-m", "fedpdpo.cli", "run", "--quiet"]
FRESH = [*RUN, "--config", str(TINY_CONFIG), "--set", f"rounds={ROUNDS}"]


def _state(value: float, rounds_trained: int) -> ClientState:
    return ClientState(
        local={"local.head.weight": torch.full((2, 3), value)},
        optimizer={"state": {0: {"step": torch.tensor(float(rounds_trained))}}, "param_groups": []},
        reference={"train": torch.zeros(4, 2)},
        rounds_trained=rounds_trained,
    )


# -- client store --------------------------------------------------------------------------------------------------


def test_client_state_is_versioned_by_round(tmp_path):
    store = ClientStore(tmp_path)
    assert store.load(0).local == {} and store.latest_version(0) is None
    for r in (1, 2, 3):
        store.save(0, _state(float(r), r), server_round=r)
    # a client training in round 3 started from round 2; older versions are no longer needed
    assert store.versions(0) == [2, 3]
    assert store.load(0, as_of_round=2).local["local.head.weight"][0, 0].item() == 2.0
    assert store.load(0).rounds_trained == 3
    assert store.load(0, as_of_round=1).local == {}  # pruned: no checkpoint can need it any more
    assert store.local_file(0) == store.version_dir(0, 3) / "local.safetensors"
    assert "train" in store.load(0).reference


def test_rerunning_a_round_replaces_its_version(tmp_path):
    store = ClientStore(tmp_path)
    store.save(0, _state(1.0, 1), server_round=1)
    store.save(0, _state(2.0, 2), server_round=2)  # written, then the run is killed before the checkpoint
    store.save(0, _state(5.0, 2), server_round=2)  # the resumed round 2
    assert store.versions(0) == [1, 2]
    assert store.load(0, as_of_round=2).local["local.head.weight"][0, 0].item() == 5.0


def test_a_failed_version_write_leaves_the_previous_version(tmp_path, monkeypatch):
    store = ClientStore(tmp_path)
    store.save(0, _state(1.0, 1), server_round=1)

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        store.save(0, _state(2.0, 2), server_round=2)
    monkeypatch.undo()
    assert store.versions(0) == [1]
    assert not list((store.path(0) / "rounds").glob(".tmp_*"))
    assert store.load(0).local["local.head.weight"][0, 0].item() == 1.0


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    atomic_write(path, lambda p: Path(p).write_text("old"))

    def half_write(p: str) -> None:
        Path(p).write_text("ne")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(path, half_write)
    assert path.read_text() == "old"
    assert [f.name for f in tmp_path.iterdir()] == ["f.txt"]


# -- server checkpoint ---------------------------------------------------------------------------------------------


def test_checkpoint_round_trip_restores_strategy_state_and_rng(tmp_path):
    strategy = get_strategy("fedadam")
    current = {"x.lora_A.weight": torch.zeros(3)}
    update = ClientUpdate(0, 4, {"x.lora_A.weight": torch.ones(3)})
    strategy.aggregate(1, current, [update])  # fills the server optimizer moments
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    rng = capture_rng()
    expected = (torch.rand(3), np.random.rand(), random.random())
    save_checkpoint(
        tmp_path,
        ServerCheckpoint(
            server_round=1,
            global_shared=current,
            strategy_state=strategy.state_dict(),
            client_info={0: {"id": 0, "domains": ["a"], "conflict": True}},
            metrics_lines=4,
            elapsed_s=1.5,
            rejected=[{"round": 1, "client": 1, "reason": "nan"}],
            rng=rng,
        ),
    )
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.server_round == 1 and ckpt.metrics_lines == 4 and ckpt.client_info[0]["domains"] == ["a"]
    assert ckpt.rejected == [{"round": 1, "client": 1, "reason": "nan"}]
    resumed = get_strategy("fedadam")
    resumed.load_state_dict(ckpt.strategy_state)
    a = strategy.aggregate(2, current, [update])
    b = resumed.aggregate(2, current, [update])
    assert torch.equal(a["x.lora_A.weight"], b["x.lora_A.weight"])
    torch.manual_seed(0)
    restore_rng(ckpt.rng)
    again = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]


@pytest.fixture(scope="module")
def tiny_trainable() -> dict[str, torch.Tensor]:
    from fedpdpo.config import load_config
    from fedpdpo.engines.setup import build_model

    model, _ = build_model(load_config(TINY_CONFIG))
    return model.initial_tensors()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("private", [False, True])
def test_every_strategy_state_survives_a_checkpoint(name, private, tiny_trainable, tmp_path):
    """A strategy's ``state_dict()`` loads back with ``weights_only=True`` and a strategy restored from it
    aggregates the next round exactly like the one that kept running (with and without the DP wrapper)."""
    from fedpdpo.engines.flower.privacy import DifferentialPrivacy

    def make():
        strategy = get_strategy(name)
        strategy.shared_names(list(tiny_trainable))  # lg-fedavg fixes its split here, as every engine does
        return DifferentialPrivacy(strategy, 0.01, seed=3) if private else strategy

    strategy = make()
    shared = {n: tiny_trainable[n] for n in strategy.shared_names(list(tiny_trainable))}
    updates = [ClientUpdate(0, 3, {k: v + 0.1 for k, v in shared.items()})]
    if shared:
        strategy.aggregate(1, shared, updates)
    save_checkpoint(tmp_path, ServerCheckpoint(1, shared, strategy.state_dict(), {}, 0, 0.0, [], capture_rng()))
    resumed = make()
    resumed.load_state_dict(load_checkpoint(tmp_path).strategy_state)
    if shared:
        expected, got = strategy.aggregate(2, shared, updates), resumed.aggregate(2, shared, updates)
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_stateless_strategy_refuses_foreign_state():
    with pytest.raises(FedPDPOError, match="keeps none"):
        get_strategy("fedavg").load_state_dict({"m": {}})


def test_rewind_metrics_drops_rows_after_the_checkpoint(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n{"round": 2')  # killed mid-line
    rewind_metrics(tmp_path, 2)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0}\n{"round": 1}\n'
    with pytest.raises(FedPDPOError, match="covers 3"):
        rewind_metrics(tmp_path, 3)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(FedPDPOError, match="cannot be read"):
        load_checkpoint(tmp_path)


# -- kill and resume, end to end -----------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return subprocess_env(OMP_NUM_THREADS="1")


def _metrics_lines(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _kill_when(cmd: list[str], ready: Callable[[], bool], timeout: float = 180.0) -> None:
    """Start ``cmd``, SIGKILL it as soon as ``ready()`` holds, and check it was really interrupted."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"run ended before the kill point: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _resume(out: Path) -> None:
    done = subprocess.run([*RUN, "--resume", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    sa.pop("time_s"), sb.pop("time_s")
    assert [c["accuracy"] for c in sa["clients"]] == [c["accuracy"] for c in sb["clients"]]
    assert sa == sb
    # stronger than accuracies: every metric of every round and the final global tensors, bit for bit
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert (a / "global.safetensors").read_bytes() == (b / "global.safetensors").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> subprocess.Popen:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    proc = subprocess.Popen([*FRESH, "--out", str(out)], env=_env(), stderr=subprocess.PIPE)
    proc.out = out  # type: ignore[attr-defined]
    return proc


def _baseline(proc: subprocess.Popen) -> Path:
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    return proc.out  # type: ignore[attr-defined]


def test_killed_at_several_points_and_resumed_matches_uninterrupted(uninterrupted, tmp_path):
    out = tmp_path / "run"
    client0 = ClientStore(out / "clients")
    # 1) during round 0's evaluation: first rows written, maybe no checkpoint yet
    _kill_when([*FRESH, "--out", str(out)], lambda: _metrics_lines(out) >= 1)
    # 2) mid-round 2: client 0 has saved its round-2 state, the server has not checkpointed round 2
    _kill_when([*RUN, "--resume", str(out)], lambda: 2 in client0.versions(0))
    ckpt = load_checkpoint(out)
    assert ckpt is not None and ckpt.server_round <= 2 and _metrics_lines(out) >= ckpt.metrics_lines
    # 3) during round 3's evaluation: metrics rows of an unfinished round are on disk
    _kill_when([*RUN, "--resume", str(out)], lambda: _metrics_lines(out) >= 2 * 3 + 1)
    _resume(out)
    _assert_same_run(_baseline(uninterrupted), out)
    # resuming a finished run changes nothing
    _resume(out)
    _assert_same_run(_baseline(uninterrupted), out)


def test_killed_centralized_run_resumes(tmp_path):
    """``centralized`` used to rewrite ``local_steps`` in its saved config, so applying it again on resume changed
    the run and ``--resume`` refused it; now the config is the user's and the step count an instruction."""
    central = [*FRESH, "--set", 'algorithm="centralized"']
    baseline = tmp_path / "uninterrupted"
    subprocess.run([*central, "--out", str(baseline)], env=_env(), check=True, timeout=300, capture_output=True)
    out = tmp_path / "run"
    _kill_when([*central, "--out", str(out)], lambda: 2 in ClientStore(out / "clients").versions(0))
    assert load_checkpoint(out).server_round < ROUNDS
    _resume(out)
    _assert_same_run(baseline, out)
    saved = (out / "config.toml").read_text()
    assert "local_steps = 4\n" in saved and "client_fraction = 1.0\n" in saved  # as the user asked
    steps = [c["local_steps"] for c in json.loads((out / "summary.json").read_text())["clients"]]
    assert steps == [ROUNDS * 4 * 2, 0]  # the pooled client ran every client's share; the other none


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_at_random_times_and_resumed_matches_uninterrupted(uninterrupted, tmp_path, seed):
    out = tmp_path / "run"
    rng = random.Random(seed)
    cmd = [*FRESH, "--out", str(out)]
    for _ in range(3):
        start, delay = time.monotonic(), rng.uniform(4.0, 12.0)  # python + torch import takes ~4 s
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and time.monotonic() - start < delay:
            time.sleep(0.01)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        cmd = [*RUN, "--resume", str(out)]
        if not (out / "config.toml").exists():  # killed before the run started: start it again
            cmd = [*FRESH, "--out", str(out)]
    if (out / "config.toml").exists():
        _resume(out)
    else:
        subprocess.run([*FRESH, "--out", str(out)], env=_env(), check=True, timeout=300)
    _assert_same_run(_baseline(uninterrupted), out)


# -- resume errors -------------------------------------------------------------------------------------------------


def test_resume_of_a_directory_without_a_run(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_resume_refuses_config_changes(tmp_path, capsys):
    assert main(["run", "--resume", str(tmp_path), "--set", "rounds=9"]) == 2
    assert "drop --set" in capsys.readouterr().err


# -- resume checks the checkpoint's fingerprint ---------------------------------------------------------------------


@pytest.fixture
def killed(tmp_path, monkeypatch) -> Path:
    """A tiny run of 2 rounds stopped before its round-2 checkpoint (like a kill): resumable from round 1."""
    out = tmp_path / "run"
    interrupt_at_checkpoint(monkeypatch, server_round=2)
    assert main(["run", "--quiet", "--config", str(TINY_CONFIG), "--out", str(out)]) == 130
    assert load_checkpoint(out).server_round == 1
    return out


def _edit(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return text


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("lr = 0.005", "lr = 0.002", "config key 'lr' changed from 0.005 to 0.002 since the checkpoint"),
        ("seed = 0", "seed = 3", "config key 'seed' changed from 0 to 3"),
        ("rounds = 2", "rounds = 4", "to run more rounds, pass --rounds N"),
    ],
)
def test_resume_refuses_an_edited_config(killed, old, new, expected, capsys):
    text = _edit(killed / "config.toml", old, new)
    assert main(["run", "--quiet", "--resume", str(killed)]) == 2
    assert expected in capsys.readouterr().err
    (killed / "config.toml").write_text(text)
    assert main(["run", "--quiet", "--resume", str(killed)]) == 0


def test_resume_refuses_lost_or_replaced_client_state(killed, tmp_path, capsys):
    client = killed / "clients" / "client_1"
    shutil.move(client, tmp_path / "saved")
    assert main(["run", "--quiet", "--resume", str(killed)]) == 2
    assert "cannot resume" in (err := capsys.readouterr().err) and "clients/client_1 is missing or changed" in err
    shutil.copytree(tmp_path / "saved", client)
    local = ClientStore(killed / "clients").local_file(1, as_of_round=1)  # what round 2 starts from
    local.write_bytes(local.read_bytes()[:-8] + b"\0" * 8)  # same size, other values
    assert main(["run", "--quiet", "--resume", str(killed)]) == 2
    assert "clients/client_1 is missing or changed" in capsys.readouterr().err


def test_corrupt_client_files_are_named(tmp_path):
    store = ClientStore(tmp_path)
    store.save(0, _state(1.0, 1), server_round=1)
    (store.path(0) / "reference.safetensors").write_bytes(b"\0\0\0")
    with pytest.raises(FedPDPOError, match=r"reference\.safetensors is unreadable .*delete it"):
        store.load(0)


def test_rounds_extends_a_killed_run_to_the_same_result_as_a_longer_run(killed, uninterrupted):
    """--rounds is the one change a resume accepts; the run then ends as if started with that many rounds."""
    assert main(["run", "--quiet", "--resume", str(killed), "--rounds", str(ROUNDS)]) == 0
    assert "rounds = 3" in (killed / "config.toml").read_text()
    _assert_same_run(_baseline(uninterrupted), killed)


def test_a_relative_data_path_resumes_from_another_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    interrupt_at_checkpoint(monkeypatch, server_round=1)
    args = ["run", "--quiet", "--config", str(TINY_CONFIG), "--out", str(out)]
    assert main([*args, "--set", 'data.path="data/tiny_pairs.jsonl"']) == 130
    saved = (out / "config.toml").read_text()
    assert f'path = "{ROOT / "data" / "tiny_pairs.jsonl"}"' in saved
    assert "#   data.path = 'data/tiny_pairs.jsonl' relative to the working directory" in saved
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--quiet", "--resume", "run"]) == 0


def test_finalize_keeps_the_head_as_an_fp16_delta_from_its_base(tmp_path):
    """Half the bytes; read back to within fp16 rounding of the (small) change; the fingerprint still sees the file
    it was made from; another base is refused rather than silently giving another head."""
    from fedpdpo.client.state import COMPACT_FILE, LOCAL_FILE, file_sha256
    from fedpdpo.engines.fingerprint import clients_fingerprint
    from fedpdpo.model.naming import HEAD_WEIGHT

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(512, 64, generator=gen) * 0.05
    head = base + torch.randn(512, 64, generator=gen) * 1e-3  # what training does to it: a small change
    other = {"local.reward_head.score.weight": torch.randn(1, 64, generator=gen)}
    store = ClientStore(tmp_path, bases={HEAD_WEIGHT: base})
    store.save(0, ClientState(local={HEAD_WEIGHT: head} | other), server_round=1)
    version = store.version_dir(0, 1)
    full_size, digest = (version / LOCAL_FILE).stat().st_size, file_sha256(version / LOCAL_FILE)
    before = clients_fingerprint(store, [0], 1)
    assert store.finalize([0]) > 0.45 * full_size
    assert sorted(p.name for p in version.iterdir()) == [COMPACT_FILE]
    local = store.load(0).local
    assert torch.equal(local["local.reward_head.score.weight"], other["local.reward_head.score.weight"])
    err = (local[HEAD_WEIGHT] - head).abs().max().item()
    assert 0 < err <= 1e-3 * 2**-10 * 4  # fp16 keeps ~11 bits of the change, not of the weight
    assert before["0"]["files"] == {LOCAL_FILE: digest} == clients_fingerprint(store, [0], 1)["0"]["files"]
    with pytest.raises(FedPDPOError, match="another backbone"):
        ClientStore(tmp_path, bases={HEAD_WEIGHT: base + 1}).load(0)
