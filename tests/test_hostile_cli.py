"""The guard: every CLI command, driven with hostile input, answers with one line and exit code 2, and nothing else.

For each case: exit code 2, exactly one ``fedpdpo: error:`` line on stderr naming the problem, no traceback, and no
file created, changed or deleted anywhere in the test's world (a finished run, an export, and files of every kind
that a user might point a command at by mistake). Each defect found by hand once gets a case here, so that it stays
fixed. Cases run in-process (``fedpdpo.cli.main``); one runs in a subprocess, to see the interpreter's own stderr.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.rundir import LOCK_FILE
from tests.conftest import TINY_CONFIG, TINY_DATA, subprocess_env

RUN = ["run", "--quiet"]
CONFIG = ["--config", str(TINY_CONFIG)]


def _make_world(w: Path) -> None:
    """A finished tiny run and an export of it, copies of the run damaged in the ways users damage runs, and files
    of every kind: what the hostile commands below point at."""
    run = w / "run"
    assert main([*RUN, *CONFIG, "--out", str(run), "--set", "rounds=1", "--set", "local_steps=1"]) == 0
    assert main(["export", "--run", str(run), "--client", "0", "--out", str(w / "export")]) == 0
    damage = {
        "run_lr": lambda d: _edit(d / "config.toml", "lr = 0.005", "lr = 0.002"),
        "run_seed": lambda d: _edit(d / "config.toml", "seed = 0", "seed = 1"),
        "run_rounds": lambda d: _edit(d / "config.toml", "rounds = 1", "rounds = 2"),
        "run_no_client": lambda d: shutil.rmtree(d / "clients" / "client_1"),
        "run_bad_reference": lambda d: (d / "clients" / "client_0" / "reference.safetensors").write_bytes(b"\0" * 9),
        "run_bad_summary": lambda d: (d / "summary.json").write_text("{bad"),
        "run_empty_summary": lambda d: (d / "summary.json").write_text("{}"),
        "run_bad_global": lambda d: (d / "global.safetensors").write_bytes(b"junk"),
        # the newest version and the best_val snapshot (a hard link to it in a run, two files after copytree)
        "run_bad_local": lambda d: [
            f.write_bytes(b"\0" * 16) for f in (d / "clients" / "client_0").rglob("local_compact.safetensors")
        ],
    }
    for name, spoil in damage.items():
        shutil.copytree(run, w / name)
        spoil(w / name)
    shutil.copytree(w / "export", w / "export_bad")
    (w / "export_bad" / "fedpdpo_client.json").write_text("{bad")
    (w / "afile").write_text("a file, not a directory\n")
    (w / "emptydir").mkdir()
    (w / "notes").mkdir()
    (w / "notes" / "todo.txt").write_text("not an export\n")
    (w / "empty.jsonl").write_text("")
    (w / "blank.jsonl").write_text("\n   \n\n")
    (w / "latin1.txt").write_bytes("Écris une critique.\n".encode("latin-1"))
    (w / "bad.gguf").write_bytes(b"not a gguf file")
    (w / "bad_pairs.jsonl").write_bytes(TINY_DATA.read_bytes() + b'{"prompt": "p", "chosen": \n')


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, (path, old)
    path.write_text(text.replace(old, new))


def _snapshot(w: Path) -> dict[str, str]:
    """Every path under ``w`` with a digest of its content (a lock file's content is its holder's pid: ignored)."""
    snap = {}
    for p in sorted(w.rglob("*")):
        rel = str(p.relative_to(w))
        if p.is_dir():
            snap[rel] = "dir"
        else:
            snap[rel] = "lock" if p.name == LOCK_FILE else hashlib.sha256(p.read_bytes()).hexdigest()
    return snap


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("world")
    _make_world(w)
    return w


def _set(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


R = "{w}/run"
#: (id, arguments with {w} for the world, a piece of the expected error line)
CASES = [
    # run: config values (item 3)
    ("run lr=nan", [*RUN, *CONFIG, *_set("lr=nan"), "--out", "{w}/new"], "config key 'lr' must be a finite number"),
    ("run weight_decay=nan", [*RUN, *CONFIG, *_set("weight_decay=nan"), "--out", "{w}/new"], "'weight_decay'"),
    ("run lr=inf", [*RUN, *CONFIG, *_set("lr=inf"), "--out", "{w}/new"], "config key 'lr' must be a finite number"),
    ("run beta=nan", [*RUN, *CONFIG, *_set("beta=nan"), "--out", "{w}/new"], "config key 'beta'"),
    ("run max_grad_norm=-1", [*RUN, *CONFIG, *_set("max_grad_norm=-1"), "--out", "{w}/new"], "must be > 0"),
    ("run weight_decay<0", [*RUN, *CONFIG, *_set("weight_decay=-0.1"), "--out", "{w}/new"], "must be >= 0"),
    ("run seed<0", [*RUN, *CONFIG, *_set("seed=-1"), "--out", "{w}/new"], "config key 'seed' must be in"),
    ("run dropout=1", [*RUN, *CONFIG, *_set("lora.dropout=1.0"), "--out", "{w}/new"], "'lora.dropout'"),
    ("run label_smoothing", [*RUN, *CONFIG, *_set("method.label_smoothing=0.5"), "--out", "{w}/new"], "smoothing"),
    ("run no targets", [*RUN, *CONFIG, *_set("lora.target_modules=[]"), "--out", "{w}/new"], "target_modules"),
    ("run unknown key", [*RUN, *CONFIG, *_set("lr_=0.1"), "--out", "{w}/new"], "unknown config key 'lr_'"),
    ("run wrong type", [*RUN, *CONFIG, *_set("rounds='three'"), "--out", "{w}/new"], "'rounds' must be int"),
    ("run empty client", [*RUN, *CONFIG, *_set("num_clients=100"), "--out", "{w}/new"], "got no"),
    ("run missing config", [*RUN, "--config", "{w}/missing.toml", "--out", "{w}/new"], "does not exist"),
    # run: the environment and the model (item 6)
    ("run corrupt gguf", [*RUN, *CONFIG, *_set('model="{w}/bad.gguf"'), "--out", "{w}/new"], "cannot load"),
    ("run missing model", [*RUN, *CONFIG, *_set('model="{w}/nope"'), "--out", "{w}/new"], "config key 'model'"),
    ("run cuda:99", [*RUN, *CONFIG, *_set('device="cuda:99"'), "--out", "{w}/new"], "config key 'device'"),
    ("run bad device", [*RUN, *CONFIG, *_set('device="gpu"'), "--out", "{w}/new"], "config key 'device'"),
    ("run typo target", [*RUN, *CONFIG, *_set('lora.target_modules=["qproj"]'), "--out", "{w}/new"], "'qproj'"),
    (
        "run one typo target",
        [*RUN, *CONFIG, *_set('lora.target_modules=["q_proj","foo_proj"]'), "--out", "{w}/new"],
        "'foo_proj' matches no layer",
    ),
    ("run --out afile/sub", [*RUN, *CONFIG, "--out", "{w}/afile/sub"], "afile is a file"),
    ("run --out afile", [*RUN, *CONFIG, "--out", "{w}/afile"], "it is a file"),
    ("run bad record", [*RUN, *CONFIG, *_set('data.path="{w}/bad_pairs.jsonl"'), "--out", "{w}/new"], "malformed"),
    ("run empty data", [*RUN, *CONFIG, *_set('data.path="{w}/blank.jsonl"'), "--out", "{w}/new"], "no valid"),
    ("run unknown tracker", [*RUN, *CONFIG, *_set('report_to=["mlflow"]'), "--out", "{w}/new"], "'report_to'"),
    ("run tracker as text", [*RUN, *CONFIG, *_set('report_to="wandb"'), "--out", "{w}/new"], "must be a list"),
    # run: existing runs, overwrite and resume (items 2 and 5)
    ("run into a run", [*RUN, *CONFIG, "--out", R], "already holds a run"),
    ("overwrite lr=nan", [*RUN, *CONFIG, *_set("lr=nan"), "--out", R, "--overwrite"], "finite"),
    ("overwrite bad model", [*RUN, *CONFIG, *_set('model="{w}/bad.gguf"'), "--out", R, "--overwrite"], "cannot load"),
    ("resume nothing", [*RUN, "--resume", "{w}/emptydir"], "no run to resume"),
    ("resume with --set", [*RUN, "--resume", R, *_set("rounds=9")], "drop --set"),
    ("resume lower rounds", [*RUN, "--resume", R, "--rounds", "0"], "--rounds can only raise it"),
    ("--rounds without resume", [*RUN, *CONFIG, "--out", "{w}/new", "--rounds", "3"], "works with --resume only"),
    ("resume edited lr", [*RUN, "--resume", "{w}/run_lr"], "config key 'lr' changed from 0.005 to 0.002"),
    ("resume edited seed", [*RUN, "--resume", "{w}/run_seed"], "config key 'seed' changed from 0 to 1"),
    ("resume edited rounds", [*RUN, "--resume", "{w}/run_rounds"], "pass --rounds N"),
    ("resume lost client", [*RUN, "--resume", "{w}/run_no_client"], "clients/client_1 is missing or changed"),
    ("resume bad reference", [*RUN, "--resume", "{w}/run_bad_reference"], "reference.safetensors is unreadable"),
    # data (items 6 and 7)
    ("validate empty", ["data", "validate", "{w}/empty.jsonl"], "problem(s) in the data"),
    ("validate blank", ["data", "validate", "{w}/blank.jsonl"], "problem(s) in the data"),
    ("validate missing", ["data", "validate", "{w}/missing.jsonl"], "problem(s) in the data"),
    ("validate bad record", ["data", "validate", "{w}/bad_pairs.jsonl"], "1 problem(s)"),
    ("inspect --json dir", ["data", "inspect", str(TINY_DATA), "--model", "tiny", "--json", "{w}/emptydir"], "dir"),
    ("inspect --json nodir", ["data", "inspect", str(TINY_DATA), "--json", "{w}/no/r.json"], "does not exist"),
    ("inspect missing", ["data", "inspect", "{w}/missing.jsonl", "--model", "tiny"], "does not exist"),
    ("inspect --set alone", ["data", "inspect", str(TINY_DATA), *_set("lr=1")], "--set needs --partition"),
    # config show
    ("config show missing", ["config", "show", "--config", "{w}/missing.toml"], "does not exist"),
    ("config show not toml", ["config", "show", "--config", "{w}/latin1.txt"], "not valid TOML"),
    ("config show --set alone", ["config", "show", *_set("rounds=2")], "--set needs --config"),
    ("config show lr=nan", ["config", "show", *CONFIG, *_set("lr=nan")], "config key 'lr' must be a finite number"),
    # export (item 6)
    ("export --out afile", ["export", "--run", R, "--client", "0", "--out", "{w}/afile"], "it is a file"),
    ("export no run", ["export", "--run", "{w}/emptydir", "--client", "0", "--out", "{w}/new"], "no config.toml"),
    ("export bad client", ["export", "--run", R, "--client", "7", "--out", "{w}/new"], "clients 0..1"),
    ("export onto export", ["export", "--run", R, "--client", "0", "--out", "{w}/export"], "not empty"),
    (
        "export over a dir",
        ["export", "--run", R, "--client", "0", "--out", "{w}/notes", "--overwrite"],
        "not a fedpdpo",
    ),
    ("export bad global", ["export", "--run", "{w}/run_bad_global", "--client", "0", "--out", "{w}/new"], "unreadable"),
    (
        "export bad local state",
        ["export", "--run", "{w}/run_bad_local", "--client", "0", "--out", "{w}/new"],
        "local_compact.safetensors is unreadable",
    ),
    ("evaluate bad local state", ["evaluate", "--run", "{w}/run_bad_local", "--samples", "0"], "is unreadable"),
    ("evaluate no run", ["evaluate", "--run", "{w}/emptydir"], "no config.toml"),
    ("evaluate top-p", ["evaluate", "--run", R, "--top-p", "0"], "--top-p"),
    # generate and score (items 6 and 7)
    ("generate empty prompt", ["generate", "--run", R, "--client", "0", "--prompt", ""], "--prompt is empty"),
    ("generate latin-1", ["generate", "--run", R, "--client", "0", "--prompts", "{w}/latin1.txt"], "UTF-8"),
    ("generate no prompts", ["generate", "--run", R, "--client", "0", "--prompts", "{w}/blank.jsonl"], "no prompts"),
    ("generate nan temp", ["generate", "--from", "{w}/export", "--prompt", "x", "--temperature", "nan"], "finite"),
    ("generate no model", ["generate", "--prompt", "x"], "which model?"),
    ("generate bad export", ["generate", "--from", "{w}/export_bad", "--prompt", "x"], "fedpdpo_client.json"),
    ("generate not export", ["generate", "--from", "{w}/emptydir", "--prompt", "x"], "fedpdpo_client.json"),
    ("score limit<0", ["score", "--run", R, "--client", "0", "--pairs", str(TINY_DATA), "--limit", "-3"], "--limit"),
    (
        "score bad pairs",
        ["score", "--run", R, "--client", "0", "--pairs", "{w}/bad_pairs.jsonl"],
        "use --on-bad-record skip",
    ),
    ("score empty response", ["score", "--run", R, "--client", "0", "--prompt", "p", "--response", ""], "empty"),
    ("score no response", ["score", "--run", R, "--client", "0", "--prompt", "p"], "at least one --response"),
    # compare and report (item 6)
    ("compare bad algo", ["compare", *CONFIG, "--algorithms", "nosuch", "--out", "{w}/new"], "unknown algorithm"),
    ("compare bad seeds", ["compare", *CONFIG, "--algorithms", "fedavg", "--seeds", "a", "--out", "{w}/new"], "seeds"),
    ("compare lr=nan", ["compare", *CONFIG, "--algorithms", "fedavg", *_set("lr=nan"), "--out", "{w}/new"], "'lr'"),
    ("compare --out afile", ["compare", *CONFIG, "--algorithms", "fedavg", "--out", "{w}/afile"], "it is a file"),
    ("report corrupt summary", ["report", "{w}/run_bad_summary"], "summary.json is unreadable"),
    ("report {} summary", ["report", "{w}/run_empty_summary"], "not a fedpdpo run summary"),
    ("report --out afile", ["report", R, "--out", "{w}/afile"], "it is a file"),
    ("report no runs", ["report", "{w}/emptydir"], "no finished runs"),
    ("report two runs", ["report", R, "{w}/run_lr"], "--out"),
    # deploy
    ("deploy app afile", ["deploy", "app", "{w}/afile"], "it is a file"),
    ("deploy certs days", ["deploy", "certs", "{w}/certs", "--host", "127.0.0.1", "--days", "-1"], "--days"),
    ("deploy certs host", ["deploy", "certs", "{w}/certs", "--host", ""], "--host"),
]


def test_there_are_enough_cases_for_every_command():
    commands = {args[0] if args[0] != "data" else f"data {args[1]}" for _, args, _ in CASES}
    assert len(CASES) >= 40
    expected = {"run", "data validate", "data inspect", "config", "export", "generate", "score", "compare", "report"}
    assert commands >= expected


@pytest.mark.parametrize(("args", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_changes_nothing(world, args, expected, capsys):
    before = _snapshot(world)
    capsys.readouterr()
    rc = main([a.replace("{w}", str(world)) for a in args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fedpdpo: error:")]
    assert rc == 2, err[-2000:]
    assert len(errors) == 1, err[-2000:]
    assert expected in errors[0]
    assert "Traceback" not in err
    assert _snapshot(world) == before


def test_cli_corrupt_gguf_prints_one_line_at_interpreter_level(tmp_path):
    """In a real process: nothing else reaches stderr (no warning, no traceback from library code)."""
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\x00" * 8)
    args = [*RUN, *CONFIG, *_set(f'model="{tmp_path / "bad.gguf"}"'), "--out", str(tmp_path / "out")]
    done = subprocess.run(
        [sys.executable, "-m", "fedpdpo.cli", *args], capture_output=True, text=True, timeout=300, env=subprocess_env()
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if not line.startswith("INFO ")]
    assert len(lines) == 1 and lines[0].startswith("fedpdpo: error: config key 'model': cannot load"), done.stderr
    assert not (tmp_path / "out").exists()
