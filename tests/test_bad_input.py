"""Bad input: every case gives one readable line naming the file and line (or key), exit code 2, no traceback, and
no half-written output (a new --out directory is not even created; an existing run is left untouched)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedpdpo.cli import main
from fedpdpo.data import ClientData, PreferenceRecord, load_records
from fedpdpo.data.lengths import check_prompt_lengths
from fedpdpo.errors import DataError
from fedpdpo.model.backbone import tiny_tokenizer
from tests.conftest import PYTHONPATH, TINY_CONFIG, TINY_DATA

GOOD_LINES = TINY_DATA.read_bytes().splitlines()
BAD_LINE = len(GOOD_LINES) + 1  # every bad record is appended after the good ones


def _record(**fields) -> bytes:
    base = {"prompt": "Write a short review.", "chosen": "Great film.", "rejected": "Dull film."}
    return json.dumps({k: v for k, v in (base | fields).items() if v is not None}).encode()


BAD_RECORDS = {
    "malformed JSON": (b'{"prompt": "p", "chosen": ', "malformed JSON at column 27"),
    "not an object": (b'["p", "a", "b"]', "expected a JSON object, got list"),
    "missing field": (_record(rejected=None), "missing field 'rejected'"),
    "wrong type": (_record(prompt=3), "field 'prompt' must be a string, got int"),
    "wrong type domain": (_record(domain=["a"]), "field 'domain' must be a string, got list"),
    "empty prompt": (_record(prompt="   "), "field 'prompt' is empty"),
    "empty response": (_record(chosen=""), "field 'chosen' is empty"),
    "chosen == rejected": (_record(chosen="Same.", rejected="Same."), "'chosen' and 'rejected' are identical"),
    "non-UTF-8 bytes": (b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}', "not valid UTF-8"),
    "lone surrogate": (b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}', "invalid Unicode escape"),
    "prompt longer than max_length": (_record(prompt="word " * 100), "prompt is 500 tokens, longer than max_length=64"),
}


def _data_file(tmp_path: Path, bad: bytes) -> Path:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join([*GOOD_LINES, bad]) + b"\n")
    return path


def _run(args: list[str], capsys) -> tuple[int, str]:
    rc = main(["run", "--quiet", *args])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fedpdpo: error:")]
    assert len(errors) == 1, errors
    return rc, errors[0]


def _assert_refused(args: list[str], expected: str, out: Path, capsys) -> str:
    rc, message = _run([*args, "--out", str(out)], capsys)
    assert rc == 2
    assert expected in message
    assert not out.exists(), "a failed run must not leave an output directory"
    return message


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_names_file_and_line(case, tmp_path, capsys):
    bad, expected = BAD_RECORDS[case]
    path = _data_file(tmp_path, bad)
    message = _assert_refused(
        ["--config", str(TINY_CONFIG), "--set", f'data.path="{path}"'], expected, tmp_path / "out", capsys
    )
    assert f"{path}:{BAD_LINE}:" in message
    assert "--on-bad-record skip" in message  # and what to do


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["num_clients=100"], "got no"),  # an empty client after partitioning
        (["lr_=0.1"], "unknown config key 'lr_'"),
        (["method.alpha=1"], "unknown config key 'method.alpha'"),
        (["lr=-1"], "config key 'lr' must be > 0"),
        (['rounds="three"'], "config key 'rounds' must be int"),
        (['partition.method="random"'], "config key 'partition.method' must be one of"),
        (['model="/no/such/model"'], "config key 'model'"),
        (['data.path="/no/such/file.jsonl"'], "/no/such/file.jsonl does not exist"),
    ],
)
def test_bad_config_names_the_key(overrides, expected, tmp_path, capsys):
    args = ["--config", str(TINY_CONFIG)]
    for o in overrides:
        args += ["--set", o]
    _assert_refused(args, expected, tmp_path / "out", capsys)


def test_bad_config_file(tmp_path, capsys):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(TINY_CONFIG.read_text() + "\n[lora]\nr = 4\n")  # duplicate table
    _assert_refused(["--config", str(cfg)], "not valid TOML", tmp_path / "out", capsys)
    cfg.write_text(TINY_CONFIG.read_text().replace("[method]", "[method]\nreward_wieght = 2.0"))
    _assert_refused(["--config", str(cfg)], "unknown config key 'method.reward_wieght'", tmp_path / "out", capsys)
    _assert_refused(["--config", str(tmp_path / "missing.toml")], "does not exist", tmp_path / "out", capsys)


def _fake_run(out: Path) -> dict[str, bytes]:
    out.mkdir()
    files = {"config.toml": b"seed = 1\n", "metrics.jsonl": b'{"round": 0}\n', "summary.json": b"{}\n"}
    for name, content in files.items():
        (out / name).write_bytes(content)
    return files


def test_output_directory_holding_another_run_is_kept(tmp_path, capsys):
    out = tmp_path / "out"
    files = _fake_run(out)
    rc, message = _run(["--config", str(TINY_CONFIG), "--out", str(out)], capsys)
    assert rc == 2 and "already holds a run" in message and "--resume" in message
    assert {f: (out / f).read_bytes() for f in files} == files


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(tmp_path, capsys):
    out = tmp_path / "out"
    files = _fake_run(out)
    path = _data_file(tmp_path, BAD_RECORDS["missing field"][0])
    rc, _ = _run(
        ["--config", str(TINY_CONFIG), "--set", f'data.path="{path}"', "--out", str(out), "--overwrite"], capsys
    )
    assert rc == 2
    assert {f: (out / f).read_bytes() for f in files} == files


def test_skip_drops_bad_records_and_logs_a_count(tmp_path, caplog):
    path = tmp_path / "pairs.jsonl"
    bad = [BAD_RECORDS[c][0] for c in ("malformed JSON", "empty prompt", "non-UTF-8 bytes")]
    path.write_bytes(b"\n".join([*GOOD_LINES, *bad]) + b"\n")
    records, report = load_records(path, "skip")
    assert len(records) == len(GOOD_LINES) and report.n_skipped == 3
    assert [p.split(": ")[0] for p in report.problems] == [f"{path}:{BAD_LINE + i}" for i in range(3)]
    out = tmp_path / "out"
    args = ["run", "--quiet", "--config", str(TINY_CONFIG), "--out", str(out), "--on-bad-record", "skip"]
    assert main([*args, "--set", f'data.path="{path}"', "--set", "rounds=1", "--set", "local_steps=1"]) == 0
    assert f"skipped 3 bad record(s) of {len(GOOD_LINES) + 3}" in caplog.text
    assert f"{path}:{BAD_LINE}: malformed JSON" in caplog.text
    assert (out / "summary.json").exists()


def test_skip_drops_overlong_prompts():
    tok = tiny_tokenizer()
    records, _ = load_records(TINY_DATA)
    long = PreferenceRecord("x" * 80, "a", "b", source="f.jsonl:99")
    clients = [ClientData(0, [*records[:4], long], records[4:6]), ClientData(1, records[6:10], records[10:12])]
    with pytest.raises(DataError, match=r"f\.jsonl:99: prompt is 80 tokens"):
        check_prompt_lengths(clients, tok, max_length=64)
    kept = check_prompt_lengths(clients, tok, max_length=64, on_bad_record="skip")
    assert kept[0].train == records[:4] and kept[1] == clients[1]
    alone = [ClientData(0, [long], records[:2])]
    with pytest.raises(DataError, match="client 0 has no training pairs left"):
        check_prompt_lengths(alone, tok, max_length=64, on_bad_record="skip")


def test_data_validate(tmp_path, capsys):
    assert main(["data", "validate", str(TINY_DATA)]) == 0
    path = tmp_path / "pairs.jsonl"
    bad = [BAD_RECORDS[c][0] for c in ("missing field", "chosen == rejected")]
    path.write_bytes(b"\n".join([*GOOD_LINES[:3], *bad]) + b"\n")
    assert main(["data", "validate", str(path)]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"{path}:4: missing field 'rejected'",
        f"{path}:5: fields 'chosen' and 'rejected' are identical (no preference to learn)",
    ]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "fedpdpo.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_cli_malformed_jsonl_is_one_line_without_traceback(tmp_path):
    path = _data_file(tmp_path, BAD_RECORDS["malformed JSON"][0])
    out = tmp_path / "out"
    args = ["run", "--config", str(TINY_CONFIG), "--set", f'data.path="{path}"', "--out", str(out), "--quiet"]
    done = _cli(*args)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"fedpdpo: error: {path}:{BAD_LINE}: malformed JSON at column 27: Expecting value "
        "(use --on-bad-record skip to drop bad records)"
    ]
    assert not out.exists()
    debug = _cli("--debug", *args)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
