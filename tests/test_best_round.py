"""``select_round = "best_val"``: each client keeps the round that ranks its own validation pairs best, and a finished
run's summary, evaluation and export use that round's model (fedpdpo/client/selection.py)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from fedpdpo.client.selection import best_snapshot, keep_if_best, load_final, track_best, validation_accuracy
from fedpdpo.client.state import BEST_DIR, COMPACT_FILE, LOCAL_FILE, ClientState, ClientStore
from fedpdpo.client.trainer import SCORES
from fedpdpo.config import load_config
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.model.naming import HEAD_WEIGHT
from tests.conftest import ROOT, TINY_CONFIG

HEAD = "local.head.weight"


def _metrics(val: float | None, score: str = "combined") -> dict[str, float]:
    metrics = {"selected_score": float(SCORES.index(score)), "accuracy": 0.5}
    if val is not None:
        metrics[f"val/accuracy_{score}"] = val
    return metrics


def _train(store: ClientStore, server_round: int) -> dict[str, torch.Tensor]:
    """Store a version whose local tensor and the shared tensors it is evaluated with both say which round it is."""
    store.save(0, ClientState(local={HEAD: torch.full((2, 3), float(server_round))}), server_round)
    return {"lora.A": torch.full((4,), float(server_round))}


def _walk(store: ClientStore, vals: list[float | None]) -> list[int]:
    kept = []
    for r, val in enumerate(vals, start=1):
        kept.append(keep_if_best(store, 0, r, _metrics(val), _train(store, r)))
    return kept


def test_keeps_the_best_validation_round_and_ties_go_to_the_later_round(tmp_path):
    store = ClientStore(tmp_path)
    assert _walk(store, [0.6, 0.8, 0.7, 0.8, 0.5]) == [1, 2, 2, 4, 4]
    state, shared = load_final(store, 0, {"lora.A": torch.zeros(4)})
    assert torch.equal(state.local[HEAD], torch.full((2, 3), 4.0))  # round 4's local modules ...
    assert torch.equal(shared["lora.A"], torch.full((4,), 4.0))  # ... with the shared tensors it was evaluated with
    assert store.versions(0) == [4, 5]  # versions are pruned as before; the snapshot keeps its own link
    assert [p.name for p in (store.path(0) / BEST_DIR).iterdir()] == ["round_00004"]


def test_without_validation_pairs_the_latest_round_is_kept(tmp_path):
    store = ClientStore(tmp_path)
    assert _walk(store, [0.9, None, 0.1]) == [1, 2, 3]  # None (no validation pairs) is no evidence either way
    assert validation_accuracy({"accuracy": 1.0}) is None
    assert validation_accuracy(_metrics(0.75, "explicit")) == 0.75
    # a scorer and a policy: the mean of the selected score's and the implicit reward's validation accuracy
    assert validation_accuracy(_metrics(0.8, "explicit") | {"val/accuracy_implicit": 0.6}) == pytest.approx(0.7)
    assert validation_accuracy(_metrics(0.6, "implicit")) == 0.6  # FedAvg: one score


def test_without_a_snapshot_the_newest_state_and_the_final_global_are_used(tmp_path):
    store = ClientStore(tmp_path)
    _train(store, 1)
    final_global = {"lora.A": torch.full((4,), 9.0)}
    state, shared = load_final(store, 0, final_global)
    assert shared is final_global and torch.equal(state.local[HEAD], torch.full((2, 3), 1.0))


def test_track_best_only_with_best_val_and_after_training(tmp_path, tiny_cfg):
    store = ClientStore(tmp_path)
    shared = _train(store, 1)
    tiny_cfg.select_round = "last"
    assert track_best(tiny_cfg, store, 0, 1, _metrics(0.7), shared) == {}
    tiny_cfg.select_round = "best_val"
    assert track_best(tiny_cfg, store, 0, 0, _metrics(0.7), shared) == {}  # round 0: nothing trained yet
    assert track_best(tiny_cfg, store, 0, 1, _metrics(0.7), shared) == {"best_round": 1.0}


def test_rewriting_a_round_after_a_kill_keeps_one_snapshot(tmp_path):
    store = ClientStore(tmp_path)
    _walk(store, [0.6, 0.8])
    stale = store.path(0) / BEST_DIR / ".tmp_killed"
    stale.mkdir()  # a snapshot being written when the run was killed
    assert keep_if_best(store, 0, 2, _metrics(0.8), _train(store, 2)) == 2  # the resumed run evaluates round 2 again
    assert [p.name for p in (store.path(0) / BEST_DIR).iterdir()] == ["round_00002"]


def test_finalize_compacts_the_snapshot_and_shares_the_newest_versions_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 8, generator=gen)
    store = ClientStore(tmp_path, bases={HEAD_WEIGHT: base})
    heads = {}
    for r, val in ((1, 0.9), (2, 0.5)):  # client 0 keeps an older round
        heads[r] = base + r * 1e-3
        store.save(0, ClientState(local={HEAD_WEIGHT: heads[r]}), r)
        keep_if_best(store, 0, r, _metrics(val), {"lora.A": torch.full((4,), float(r))})
    for r, val in ((1, 0.5), (2, 0.9)):  # client 1 keeps the newest
        store.save(1, ClientState(local={HEAD_WEIGHT: heads[r]}), r)
        keep_if_best(store, 1, r, _metrics(val), {"lora.A": torch.full((4,), float(r))})
    store.finalize([0, 1])
    for cid, kept in ((0, 1), (1, 2)):
        snapshot = best_snapshot(store, cid)
        assert snapshot is not None and snapshot.round == kept
        assert not (snapshot.path / LOCAL_FILE).exists() and (snapshot.path / COMPACT_FILE).is_file()
        state, shared = load_final(store, cid, {})
        assert torch.allclose(state.local[HEAD_WEIGHT], heads[kept], atol=1e-6)
        assert torch.equal(shared["lora.A"], torch.full((4,), float(kept)))
    newest = store.version_dir(1, 2) / COMPACT_FILE
    assert (best_snapshot(store, 1).path / COMPACT_FILE).samefile(newest)  # one file, two names


def test_finalize_without_bases_keeps_the_snapshot_linked_to_the_full_file(tmp_path):
    """A state with no tensor to compact (Local, FedAvg's empty state: no personalized head) has no compact file to
    share: the snapshot keeps its link to the newest version's full file (this once raised FileNotFoundError)."""
    store = ClientStore(tmp_path)
    kept = keep_if_best(store, 0, 1, _metrics(0.9), _train(store, 1))
    assert kept == 1
    store.finalize([0])
    snapshot = best_snapshot(store, 0)
    assert snapshot is not None and (snapshot.path / LOCAL_FILE).samefile(store.version_dir(0, 1) / LOCAL_FILE)
    state, _ = load_final(store, 0, {})
    assert torch.equal(state.local[HEAD], torch.full((2, 3), 1.0))


BEST_RUN_SETS = ["lr=5e-2", "select_round=best_val", "data.validation_fraction=0.25"]


@pytest.fixture(scope="module")
def best_run(tmp_path_factory):
    # a large step, so that a client's validation accuracy peaks before the last round (client 0: round 2)
    cfg = load_config(TINY_CONFIG, ["rounds=4", *BEST_RUN_SETS])
    out = tmp_path_factory.mktemp("best") / "run"
    summary = run_inprocess(cfg, out, quiet=True)
    return cfg, out, summary


def test_summary_reports_each_clients_kept_round(best_run):
    cfg, out, summary = best_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["select_round"] == "best_val"
    assert min(c["selected_round"] for c in summary["clients"]) < cfg.rounds  # the test exercises an earlier round
    for client in summary["clients"]:
        mine = {r["round"]: r for r in rows if r["client"] == client["id"] and r["round"] >= 1}
        vals = {r: validation_accuracy(row) for r, row in mine.items()}
        expected = max(vals, key=lambda r: (vals[r], r))  # the best validation accuracy, the later round on ties
        assert client["selected_round"] == expected == mine[cfg.rounds]["best_round"]
        assert client["accuracy"] == mine[expected]["accuracy"]
        assert client["accuracy_last_round"] == mine[cfg.rounds]["accuracy"]
        assert client["accuracy_implicit"] == mine[expected]["accuracy_implicit"]
    from fedpdpo.report.markdown import _validation_lines

    line = _validation_lines(summary)[1]
    kept = ", ".join(f"client {c['id']}: round {c['selected_round']}" for c in summary["clients"])
    assert '(`select_round = "best_val"`; ' + kept + "), and the results above are those rounds'" in line


def test_evaluation_and_export_rebuild_the_kept_round(best_run, tmp_path):
    from fedpdpo.evaluation import cross_client_matrix, load_run
    from fedpdpo.export import load_from_run

    _, out, summary = best_run
    setup, global_, store = load_run(out)
    matrix = cross_client_matrix(setup, global_, store)
    assert matrix["accuracy"][0][0] == summary["clients"][0]["accuracy"]  # the kept round's model, not the last
    for client in summary["clients"]:
        snapshot = best_snapshot(store, client["id"])
        assert snapshot is not None and snapshot.round == client["selected_round"]
        kept = load_file(snapshot.path / "shared.safetensors")
        loaded = load_from_run(out, client["id"]).model.get_tensors(sorted(kept))
        assert all(torch.equal(loaded[name].detach().cpu(), value) for name, value in kept.items())


def test_replaying_the_selection_over_fewer_rounds_is_the_shorter_run(best_run, tmp_path, capsys):
    """scripts/replay_selection.py: the learning rate is constant and training never reads the selection, so the
    first R rounds of a run are the R-round run, and the replay of its rule over them gives that run's summary."""
    import importlib.util

    from fedpdpo.tune import validation_score

    spec = importlib.util.spec_from_file_location("replay_selection", ROOT / "scripts" / "replay_selection.py")
    assert spec is not None and spec.loader is not None
    replay_selection = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(replay_selection)
    cfg, out, summary = best_run
    shorter = run_inprocess(load_config(TINY_CONFIG, [*BEST_RUN_SETS, "rounds=2"]), tmp_path / "r2", quiet=True)
    for rounds, expected in ((cfg.rounds, summary), (2, shorter)):
        replayed = replay_selection.replay(replay_selection.evaluations(out), rounds)
        assert replayed["validation_score"] == pytest.approx(validation_score(expected))
        for key in ("accuracy", "accuracy_implicit", "accuracy_combined"):
            assert replayed[key] == pytest.approx(sum(c[key] for c in expected["clients"]) / len(expected["clients"]))
    replay_selection.main(["--run", str(out), "--json", str(tmp_path / "t.json")])
    table = json.loads((tmp_path / "t.json").read_text())["table"]
    assert [row["rounds"] for row in table] == [1, 2, 3, 4] and "| 4 | " in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:  # not a run directory: one line, exit code 2
        replay_selection.main(["--run", str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "missing/metrics.jsonl: no such file" in capsys.readouterr().err
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"round": 0}\n{"rou\n')
    with pytest.raises(SystemExit) as exit_info:
        replay_selection.main(["--run", str(tmp_path / "cut")])
    assert exit_info.value.code == 2 and "cut/metrics.jsonl:2: not a JSON line" in capsys.readouterr().err
