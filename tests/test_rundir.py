"""One writer per run directory, and --overwrite that replaces a run only with a finished one (fedpdpo.rundir)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.engines import server
from fedpdpo.rundir import LOCK_FILE, DirectoryBusy, DirLock, ensure_free, locked_dir, pending_dir
from tests.conftest import TINY_CONFIG, interrupt_at_checkpoint, subprocess_env

CONFIG = ["--config", str(TINY_CONFIG)]
QUICK = ["--set", "rounds=1", "--set", "local_steps=1"]


def _run(*args: str) -> int:
    return main(["run", "--quiet", *args])


def _files(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    assert _run(*CONFIG, *QUICK, "--out", str(out)) == 0
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedpdpo: error:")]
    assert len(lines) == 1, lines
    return lines[0]


# -- the lock ---------------------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_pid(run_copy, capsys):
    before = _files(run_copy)
    lock = DirLock(run_copy)
    try:
        for args in (
            ["--resume", str(run_copy)],
            [*CONFIG, *QUICK, "--out", str(run_copy), "--overwrite"],
            [*CONFIG, *QUICK, "--out", str(run_copy)],
        ):
            assert _run(*args) == 2
            message = _error(capsys)
            assert "in use by another fedpdpo process" in message or "already holds a run" in message
        assert main(["report", str(run_copy)]) == 2
        assert f"pid {os.getpid()}" in _error(capsys)
    finally:
        lock.release()
    assert _files(run_copy) == before
    assert _run("--resume", str(run_copy)) == 0  # free again


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
    hold = "import sys, time; from pathlib import Path; from fedpdpo.rundir import DirLock; "
    hold += "DirLock(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen(
        [sys.executable, "-c", hold, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=subprocess_env()
    )
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(DirectoryBusy, match=f"pid {proc.pid}"):
            ensure_free(tmp_path)
        with pytest.raises(DirectoryBusy, match=f"pid {proc.pid}"):
            DirLock(tmp_path)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    ensure_free(tmp_path)  # the kernel dropped the lock with the process
    DirLock(tmp_path).release()


def test_a_run_in_progress_is_not_resumed_or_overwritten_by_another_process(tmp_path, capsys):
    """The issue's reproduction: a second `run --resume` or `--overwrite` while a run writes the directory."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fedpdpo.cli", "run", "--quiet", *CONFIG, "--out", str(out)]
    cmd += ["--set", "rounds=6", "--set", "local_steps=8"]
    proc = subprocess.Popen(cmd, env=subprocess_env(OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    lock = out / ".lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == str(proc.pid)):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _run("--resume", str(out)) == 2
    assert f"in use by another fedpdpo process (pid {proc.pid}" in _error(capsys)
    assert _run(*CONFIG, "--out", str(out), "--overwrite") == 2
    assert f"pid {proc.pid}" in _error(capsys)
    assert proc.poll() is None, "the first run must still be running for this test to mean anything"
    assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["round"], r["client"]) for r in rows]
    assert sorted(keys) == sorted({(r, c) for r in range(7) for c in range(2)})


# -- overwrite ------------------------------------------------------------------------------------------------------


def test_overwrite_that_cannot_start_leaves_the_run_untouched(run_copy, capsys):
    before = _files(run_copy)
    assert _run(*CONFIG, "--set", "lr=nan", "--out", str(run_copy), "--overwrite") == 2
    assert "config key 'lr' must be a finite number" in _error(capsys)
    assert _files(run_copy) == before and not pending_dir(run_copy).exists()
    assert main(["export", "--run", str(run_copy), "--client", "0", "--out", str(run_copy.parent / "x")]) == 0


def test_a_finished_overwrite_replaces_the_whole_directory(run_copy):
    for name in ("report.md", "comparison.json", "accuracy_by_round.png"):
        (run_copy / name).write_text("from the old run")
    assert _run(*CONFIG, *QUICK, "--set", "seed=1", "--out", str(run_copy), "--overwrite") == 0
    assert sorted(p.name for p in run_copy.iterdir()) == sorted(
        [".lock", "checkpoint.pt", "clients", "config.toml", "global.safetensors", "metrics.jsonl", "summary.json"]
    )
    assert json.loads((run_copy / "summary.json").read_text())["seed"] == 1
    assert sorted(p.name for p in run_copy.parent.iterdir()) == ["run"]  # no OUT.overwrite, no OUT.replaced


def test_an_interrupted_overwrite_keeps_the_old_run_and_resume_finishes_it(run_copy, tmp_path, monkeypatch, capsys):
    before = _files(run_copy)
    interrupt_at_checkpoint(monkeypatch, server_round=2)
    new = [*CONFIG, "--set", "seed=1", "--set", "local_steps=1"]
    assert _run(*new, "--out", str(run_copy), "--overwrite") == 130
    assert _files(run_copy) == before  # the old run, as it was
    assert (pending_dir(run_copy) / "checkpoint.pt").is_file()
    assert _run(*CONFIG, "--out", str(run_copy)) == 2  # neither run is mixed into by a plain run
    assert "already holds a run" in _error(capsys)
    assert _run("--resume", str(run_copy)) == 0  # continues the newer command: the overwrite
    assert not pending_dir(run_copy).exists()
    assert _run(*new, "--out", str(tmp_path / "uninterrupted")) == 0
    assert (run_copy / "metrics.jsonl").read_bytes() == (tmp_path / "uninterrupted" / "metrics.jsonl").read_bytes()


def test_a_new_overwrite_discards_an_unfinished_one(run_copy, monkeypatch):
    interrupt_at_checkpoint(monkeypatch, server_round=1)
    assert _run(*CONFIG, *QUICK, "--set", "seed=1", "--out", str(run_copy), "--overwrite") == 130
    assert pending_dir(run_copy).is_dir()
    assert _run(*CONFIG, *QUICK, "--set", "seed=2", "--out", str(run_copy), "--overwrite") == 0
    assert json.loads((run_copy / "summary.json").read_text())["seed"] == 2
    assert not pending_dir(run_copy).exists()


# -- the environment ------------------------------------------------------------------------------------------------


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    real = server.append_metrics

    def full(path, rows):
        if rows and rows[0]["round"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "metrics.jsonl"))
        real(path, rows)

    monkeypatch.setattr(server, "append_metrics", full)
    assert _run(*CONFIG, "--out", str(out)) == 2
    message = _error(capsys)
    assert "No space left on device" in message and f"fedpdpo run --resume {out}" in message
    monkeypatch.setattr(server, "append_metrics", real)
    assert _run("--resume", str(out)) == 0


def test_cuda_without_cuda_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _run(*CONFIG, "--set", 'device="cuda"', "--out", str(tmp_path / "out")) == 2
    assert "config key 'device' is 'cuda', but" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_command_that_fails_leaves_an_existing_directory_as_it_was(tmp_path):
    """A failed start in an existing --out directory removes the lock file it made; one that was there stays."""
    for existing_lock in (False, True):
        out = tmp_path / f"out{existing_lock}"
        out.mkdir()
        if existing_lock:
            (out / LOCK_FILE).write_text("")
        with pytest.raises(RuntimeError), locked_dir(out):
            raise RuntimeError("bad algorithm")
        assert sorted(p.name for p in out.iterdir()) == ([LOCK_FILE] if existing_lock else [])
