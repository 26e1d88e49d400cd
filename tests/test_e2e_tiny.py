"""End to end: `fedpdpo run --config configs/tiny.toml` writes every output and learns."""

from __future__ import annotations

import json
import tomllib

import pytest
import torch

from fedpdpo.cli import main
from fedpdpo.errors import FedPDPOError
from tests.conftest import TINY_CONFIG


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    assert main(["run", "--config", str(TINY_CONFIG), "--out", str(out), "--quiet"]) == 0
    return out


def _not_json(constant: str):
    raise AssertionError(f"{constant} is not JSON")


def test_outputs_and_summary_schema(tiny_run):
    cfg = tomllib.loads((tiny_run / "config.toml").read_text())
    assert cfg["algorithm"] == "fedpdpo" and cfg["num_clients"] == 2
    lines = (tiny_run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line, parse_constant=_not_json) for line in lines]
    assert {(r["round"], r["client"]) for r in rows} == {(r, c) for r in range(3) for c in range(2)}
    assert not any("train_loss" in r for r in rows if r["round"] == 0)
    trained = [r for r in rows if r["round"] > 0]
    assert all({"train_loss", "accuracy", "reward_margin", "train/rewards/accuracies"} <= r.keys() for r in trained)
    summary = json.loads((tiny_run / "summary.json").read_text(), parse_constant=_not_json)  # strict: no NaN
    for key in ("algorithm", "model", "rounds", "seed", "mean_accuracy", "clients", "communication"):
        assert key in summary
    for c in summary["clients"]:
        assert {"id", "n_train", "n_test", "accuracy", "reward_margin"} <= c.keys()
    comm = summary["communication"]
    assert comm["shared_parameters"] and all(".lora_" in n for n in comm["shared_parameters"])
    assert comm["uplink_bytes_per_client_round"] > 0
    assert summary["mean_accuracy_round0"] == 0.5  # policy == reference before training: every margin ties


def test_training_improves_over_round0(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert summary["mean_accuracy"] > summary["mean_accuracy_round0"] + 0.2


def test_same_seed_same_result(tiny_run, tmp_path):
    out = tmp_path / "again"
    assert main(["run", "--config", str(TINY_CONFIG), "--out", str(out), "--quiet"]) == 0
    a = json.loads((tiny_run / "summary.json").read_text())
    b = json.loads((out / "summary.json").read_text())
    assert [c["accuracy"] for c in a["clients"]] == [c["accuracy"] for c in b["clients"]]
    assert [c["reward_margin"] for c in a["clients"]] == [c["reward_margin"] for c in b["clients"]]


def test_refuses_to_overwrite_a_run(tiny_run, capsys):
    assert main(["run", "--config", str(TINY_CONFIG), "--out", str(tiny_run), "--quiet"]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_bad_config_key_is_one_line_exit_2(tmp_path, capsys):
    code = main(["run", "--config", str(TINY_CONFIG), "--set", "roundz=1", "--out", str(tmp_path / "x"), "--quiet"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [err[0]] and "unknown config key 'roundz'" in err[0]


def test_client_sampling_fraction(tmp_path):
    out = tmp_path / "half"
    args = ["run", "--config", str(TINY_CONFIG), "--out", str(out), "--quiet", "--set", "client_fraction=0.5"]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for rnd in (1, 2):
        trained = [r["client"] for r in rows if r["round"] == rnd and "train_loss" in r]
        assert len(trained) == 1


def test_finished_run_keeps_only_final_local_tensors(tiny_run):
    """Older versions and optimizer states serve only resuming; a finished run keeps the last local tensors, the
    personalized head as an fp16 delta from the backbone's head."""
    from fedpdpo.client.state import COMPACT_FILE, ClientStore
    from fedpdpo.config import load_config
    from fedpdpo.engines.setup import build_model
    from fedpdpo.model.naming import HEAD_WEIGHT

    model = build_model(load_config(tiny_run / "config.toml"))[0]
    store = ClientStore(tiny_run / "clients", bases=model.delta_bases())
    for cid in range(2):
        assert store.versions(cid) == [2]
        files = sorted(p.name for p in store.version_dir(cid, 2).iterdir())
        assert files == [COMPACT_FILE]
        local = store.load(cid).local  # what export, generate and evaluate read is still there
        assert local[HEAD_WEIGHT].dtype == torch.float32 and not torch.equal(local[HEAD_WEIGHT], model.ref_head_weight)
    assert store.finalize(range(2)) == 0  # nothing left to drop
    with pytest.raises(FedPDPOError, match="without the backbone"):
        ClientStore(tiny_run / "clients").load(0)


def test_a_finished_run_continues_with_more_rounds(tiny_run, tmp_path):
    """--rounds on a finished run starts from its compacted state; the resumed run ends compacted again."""
    import shutil

    from fedpdpo.client.state import COMPACT_FILE

    out = tmp_path / "run"
    shutil.copytree(tiny_run, out)
    assert main(["run", "--quiet", "--resume", str(out)]) == 0  # finished: the fingerprint still matches
    assert main(["run", "--quiet", "--resume", str(out), "--rounds", "3"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and sorted(summary["mean_accuracy_by_round"]) == ["0", "1", "2", "3"]
    for cid in range(2):
        version = out / "clients" / f"client_{cid}" / "rounds" / "round_00003"
        assert sorted(p.name for p in version.iterdir()) == [COMPACT_FILE]
