"""The Python API: fedpdpo.run / resume / compare / export_client / load_personalized, in-memory data, docs/api.md."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import fedpdpo
from fedpdpo.errors import ConfigError, DataError, FedPDPOError
from tests.conftest import ROOT, TINY_CONFIG, TINY_DATA, subprocess_env

FAST = ["rounds=1", "local_steps=2"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """In-memory data is saved under $FEDPDPO_CACHE/data: a fresh one per test."""
    monkeypatch.setenv("FEDPDPO_CACHE", str(tmp_path / "cache"))


def _records() -> list[dict]:
    return [json.loads(line) for line in TINY_DATA.read_text().splitlines()]


def test_docs_api_example_runs_as_written(tmp_path):
    """Every Python block of docs/api.md, run from the repository root in a fresh process (outputs under tmp)."""
    doc = (ROOT / "docs" / "api.md").read_text()
    blocks = [b.split("```", 1)[0] for b in doc.split("```python\n")[1:]]
    assert blocks, "docs/api.md has no Python example"
    code = "\n".join(blocks).replace('"runs/api/', f'"{tmp_path}/')
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=subprocess_env(FEDPDPO_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip(), "the example prints its results"
    for run in ("records", "conversational", "compare/fedavg/seed0"):
        assert (tmp_path / run / "summary.json").is_file(), run
    assert (tmp_path / "compare" / "report.md").is_file() and (tmp_path / "client0" / "README.md").is_file()


def test_run_takes_a_path_a_dict_or_a_runconfig_and_in_memory_records(tmp_path):
    records = _records()
    by_path = fedpdpo.run(TINY_CONFIG, tmp_path / "path", overrides=FAST, quiet=True)
    cfg = fedpdpo.load_config(TINY_CONFIG, FAST)
    by_config = fedpdpo.run(cfg, tmp_path / "config", quiet=True)
    in_memory = fedpdpo.run(cfg, tmp_path / "memory", data=records, quiet=True)
    as_dict = {
        "model": "tiny",
        "precision": "fp32",  # as configs/tiny.toml: "auto" would pick bf16 on a CPU with bf16 units
        "num_clients": 2,
        "batch_size": 4,
        "max_length": 64,
        "lr": cfg.lr,
        "lora": {"r": 4, "alpha": 8},
        "method": {"adapter_dim": 8},
        "data": {"path": str(TINY_DATA), "max_prompt_length": 16},
        "partition": {"conflict_fraction": 0.5},
    }
    by_dict = fedpdpo.run(as_dict, tmp_path / "dict", overrides=FAST, quiet=True)
    accuracy = [s["mean_accuracy_by_round"] for s in (by_path, by_config, in_memory, by_dict)]
    assert accuracy[1:] == accuracy[:-1]  # the same run, however the config and data were given
    saved = (tmp_path / "memory" / "config.toml").read_text()
    assert "in-memory data (80 records) passed to the Python API" in saved
    path = fedpdpo.load_config(tmp_path / "memory" / "config.toml").data.path
    assert path.startswith(str(tmp_path / "cache" / "data")) and path.endswith(".jsonl")
    assert fedpdpo.resume(tmp_path / "memory", quiet=True)["mean_accuracy"] == in_memory["mean_accuracy"]
    more = fedpdpo.resume(tmp_path / "memory", rounds=2, quiet=True)  # the saved data is found again
    assert sorted(more["mean_accuracy_by_round"]) == ["0", "1", "2"]


def test_in_memory_data_is_checked_like_a_file(tmp_path):
    import datasets

    records = _records()
    bad = [*records[:3], {"prompt": "p", "chosen": "a"}, *records[3:]]
    with pytest.raises(DataError, match=r"data\[3\]: missing field 'rejected'"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "bad", data=bad, overrides=FAST, quiet=True)
    assert not (tmp_path / "bad").exists()
    skipped = fedpdpo.run(
        TINY_CONFIG, tmp_path / "skip", data=bad, overrides=[*FAST, 'data.on_bad_record="skip"'], quiet=True
    )
    assert skipped["clients"]
    with pytest.raises(DataError, match=r"data\[0\]: .*not JSON serializable"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "x", data=[records[0] | {"when": object()}], overrides=FAST)
    with pytest.raises(FedPDPOError, match=r"give a file in the config.s data\.path"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "x", data=str(TINY_DATA), overrides=FAST)
    with pytest.raises(FedPDPOError, match=r"must be a datasets\.Dataset or a list of records"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "x", data={"prompt": "p"}, overrides=FAST)
    with pytest.raises(DataError, match="test_data= holds no valid preference records"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "x", test_data=[{"x": 1}], overrides=[*FAST, 'data.on_bad_record="skip"'])
    with pytest.raises(ConfigError, match="unknown config key 'lr_'"):
        fedpdpo.run(TINY_CONFIG, tmp_path / "x", data=records, overrides=["lr_=1"])
    # a DatasetDict: its split names say which records are held out; renamed columns are mapped by data.fields
    renamed = [{"question": r["prompt"], "good": r["chosen"], "bad": r["rejected"]} for r in records]
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(renamed[:60]), "test": datasets.Dataset.from_list(renamed[60:])}
    )
    fields = 'data.fields={prompt="question", chosen="good", rejected="bad"}'
    summary = fedpdpo.run(TINY_CONFIG, tmp_path / "dict", data=splits, overrides=[*FAST, fields], quiet=True)
    assert sum(c["n_test"] for c in summary["clients"]) == 20


def test_compare_and_export_from_python(tmp_path):
    comparison = fedpdpo.compare(TINY_CONFIG, ["fedavg", "local"], tmp_path / "cmp", overrides=FAST, quiet=True)
    assert set(comparison["ranking"]) == {"fedavg", "local"} and (tmp_path / "cmp" / "report.md").is_file()
    result = fedpdpo.export_client(tmp_path / "cmp" / "fedavg" / "seed0", 1, tmp_path / "export")
    assert fedpdpo.load_personalized(result.out).client_id == 1
    with pytest.raises(FedPDPOError, match="unknown algorithm"):
        fedpdpo.compare(TINY_CONFIG, "fedavg,nope", tmp_path / "cmp2", overrides=FAST, quiet=True)


def test_the_public_api_is_documented_and_import_is_cheap():
    doc = (ROOT / "docs" / "api.md").read_text()
    for name in fedpdpo.__all__:
        assert getattr(fedpdpo, name) is not None
        assert f"`{name}`" in doc or f"fedpdpo.{name}" in doc, name
    code = "import sys, fedpdpo; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True)
    assert done.stdout.strip() == "[]", done.stderr
