"""The Flower ServerApp/ClientApp on the in-process Grid: same results as the in-process engine, only shared
tensors on the wire, failed clients tolerated, DP clipping and noise applied to the shared update."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedpdpo.engines.flower.client_app import app as client_app
from fedpdpo.engines.flower.local_grid import LocalGrid
from fedpdpo.engines.flower.privacy import noise_std
from fedpdpo.engines.flower.records import ARRAYS, CONFIG, KEY_ROUND, record_to_tensors
from fedpdpo.engines.flower.server_app import ServerParams, make_server_app
from fedpdpo.engines.inprocess import run_inprocess
from fedpdpo.engines.setup import build_model
from fedpdpo.strategies import get_strategy


def run_on_local_grid(cfg, out: Path, app=client_app, **params) -> dict:
    grid = LocalGrid(app, cfg.num_clients)
    server_app = make_server_app(ServerParams(cfg, str(out), "flower-local", **params))
    server_app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    return json.loads((out / "summary.json").read_text())


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Recorder:
    """A ClientApp wrapper that keeps every (instruction, reply) pair, i.e. all the client ever sent."""

    def __init__(self, app=client_app) -> None:
        self.app = app
        self.log: list[tuple[Message, Message]] = []

    def __call__(self, msg: Message, ctx: Context) -> Message:
        reply = self.app(msg, ctx)
        self.log.append((msg, reply))
        return reply


# algorithm -> the instruction its train messages must carry (the strategy's per-round instructions travel in the
# message's ConfigRecord, as Flower's FedProx sends proximal-mu)
INSTRUCTED = {"fedpdpo": None, "ditto": "ditto-lambda", "centralized": "local-steps", "fedpdpo+online": None}


@pytest.mark.parametrize("algorithm", sorted(INSTRUCTED))
def test_flower_apps_match_inprocess_engine(tiny_cfg, tmp_path, algorithm):
    """ "+online": with on-policy pairs, which the client samples from its own policy in each round."""
    tiny_cfg.algorithm = algorithm.removesuffix("+online")
    if algorithm.endswith("+online"):
        tiny_cfg.method.online_pairs = 4
    ref = run_inprocess(tiny_cfg, tmp_path / "inprocess", quiet=True)
    recorder = Recorder()
    got = run_on_local_grid(tiny_cfg, tmp_path / "flower", app=recorder)
    trains = [msg.content[CONFIG] for msg, _ in recorder.log if msg.metadata.message_type == "train"]
    key = INSTRUCTED[algorithm]
    assert trains and all(key is None or key in config for config in trains)
    assert got["engine"] == "flower-local"
    config = (tmp_path / "flower" / "config.toml").read_text()
    assert config == (tmp_path / "inprocess" / "config.toml").read_text()
    for a, b in zip(ref["clients"], got["clients"], strict=True):
        assert a["id"] == b["id"]
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-4, abs=1e-6)
    ref_rows, rows = metric_rows(tmp_path / "inprocess"), metric_rows(tmp_path / "flower")
    assert [(r["round"], r["client"]) for r in rows] == [(r["round"], r["client"]) for r in ref_rows]
    for a, b in zip(ref_rows, rows, strict=True):
        assert set(a) == set(b)
        for key, value in a.items():
            assert b[key] == (pytest.approx(value, rel=1e-4, abs=1e-6) if isinstance(value, float) else value), key
    # the node kept its local tensors on disk, as the in-process engine does (centralized's model has none)
    kept = list((tmp_path / "flower" / "clients").glob("client_*/**/local.safetensors"))
    assert bool(kept) == (algorithm != "centralized")


@pytest.mark.parametrize("algorithm", ["fedpdpo", "fedsa-lora"])
def test_clients_send_only_the_strategys_shared_tensors(tiny_cfg, tmp_path, algorithm):
    tiny_cfg.algorithm = algorithm
    cfg = get_strategy(algorithm).configure(tiny_cfg)
    model, _ = build_model(cfg)
    trainable = list(model.trainable())
    shared = set(get_strategy(algorithm).shared_names(trainable))
    kept = [n for n in trainable if n not in shared]
    assert shared and kept, "the test needs both shared and kept tensors to mean anything"

    recorder = Recorder()
    run_on_local_grid(tiny_cfg, tmp_path / "run", app=recorder)
    sent = [reply for msg, reply in recorder.log if msg.metadata.message_type == "train"]
    assert len(sent) == cfg.rounds * cfg.num_clients
    for msg, reply in recorder.log:
        for record in reply.content.array_records.values():
            names = set(record.keys())
            assert names == shared, f"{msg.metadata.message_type} reply carried {sorted(names - shared)}"
            assert not any(n.startswith("local.") for n in names)


def failing_client(fail_client: int, fail_round: int) -> Recorder:
    """The real ClientApp, except that ``fail_client`` crashes in round ``fail_round``'s training."""

    def app(msg: Message, ctx: Context) -> Message:
        config = msg.content.config_records.get(CONFIG)
        is_target = ctx.node_config["partition-id"] == fail_client and msg.metadata.message_type == "train"
        if is_target and config is not None and int(config[KEY_ROUND]) == fail_round:
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="simulated crash"), reply_to=msg)
        return client_app(msg, ctx)

    return Recorder(app)


def test_failed_client_is_recorded_and_rejoins(tiny_cfg, tmp_path):
    tiny_cfg.rounds = 3
    summary = run_on_local_grid(tiny_cfg, tmp_path / "run", app=failing_client(0, 1))
    rows = {(r["round"], r["client"]): r for r in metric_rows(tmp_path / "run")}
    assert rows[(1, 0)]["train/failed"] == 1.0
    assert "train_loss" in rows[(1, 1)]
    assert "train_loss" in rows[(2, 0)] and "train_loss" in rows[(3, 0)]  # back in later rounds
    assert [(f["round"], f["client"]) for f in summary["rejected_updates"]] == [(1, 0)]
    assert "simulated crash" in summary["rejected_updates"][0]["reason"]
    assert len(summary["clients"]) == tiny_cfg.num_clients


def test_min_fit_replies_keeps_the_old_global(tiny_cfg, tmp_path):
    tiny_cfg.rounds = 1
    recorder = failing_client(0, 1)
    run_on_local_grid(tiny_cfg, tmp_path / "run", app=recorder, min_fit_replies=2)
    evals = [msg for msg, _ in recorder.log if msg.metadata.message_type == "evaluate"]
    before = record_to_tensors(evals[0].content.array_records[ARRAYS])
    after = record_to_tensors(evals[-1].content.array_records[ARRAYS])
    assert all(torch.equal(before[k], after[k]) for k in before)  # one update < 2: not aggregated


def update_norms(recorder: Recorder) -> list[float]:
    norms = []
    for msg, reply in recorder.log:
        if msg.metadata.message_type != "train":
            continue
        sent = record_to_tensors(msg.content.array_records[ARRAYS])
        got = record_to_tensors(reply.content.array_records[ARRAYS])
        norms.append(torch.sqrt(sum(((got[k] - sent[k]) ** 2).sum() for k in sent)).item())
    return norms


def test_dp_clips_the_update_adds_noise_and_still_trains(tiny_cfg, tmp_path):
    plain = Recorder()
    run_on_local_grid(tiny_cfg, tmp_path / "plain", app=plain)
    plain_norms = update_norms(plain)
    clip = min(plain_norms) / 4  # binding for every client and round

    tiny_cfg.privacy.clipping_norm = clip
    tiny_cfg.privacy.noise_multiplier = 0.5
    private = Recorder()
    summary = run_on_local_grid(tiny_cfg, tmp_path / "dp", app=private)
    assert max(update_norms(private)) <= clip * (1 + 1e-4)

    # the server's noise: round 1's global differs from the plain weighted mean of the clipped updates
    def sent_in(kind: str, server_round: int) -> list[dict[str, torch.Tensor]]:
        msgs = [m for m, _ in private.log if m.metadata.message_type == kind]
        return [
            record_to_tensors(m.content.array_records[ARRAYS])
            for m in msgs
            if m.content[CONFIG][KEY_ROUND] == server_round
        ]

    replies = [r for m, r in private.log if m.metadata.message_type == "train" and m.content[CONFIG][KEY_ROUND] == 1]
    updates = [record_to_tensors(r.content.array_records[ARRAYS]) for r in replies]
    mean = {k: sum(u[k] for u in updates) / len(updates) for k in updates[0]}  # equal-sized clients
    initial, round1 = sent_in("evaluate", 0)[0], sent_in("evaluate", 1)[0]
    diff = torch.cat([(round1[k] - mean[k]).flatten() for k in mean])
    std = noise_std(tiny_cfg, tiny_cfg.num_clients)
    assert 0.8 * std < diff.std().item() < 1.25 * std

    # still trains: finite losses and accuracies, and the global moved away from its initial value
    rows = metric_rows(tmp_path / "dp")
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in rows if "train_loss" in r)
    assert all(0.0 <= c["accuracy"] <= 1.0 for c in summary["clients"])
    assert any(not torch.equal(initial[k], round1[k]) for k in initial)


def test_secagg_plus_hides_each_update_and_keeps_the_results(tiny_cfg, tmp_path):
    tiny_cfg.num_clients = 3  # SecAgg+ can drop a client only while enough neighbours hold its key shares
    ref = run_inprocess(tiny_cfg, tmp_path / "inprocess", quiet=True)
    tiny_cfg.privacy.secagg = True
    recorder = Recorder()
    got = run_on_local_grid(tiny_cfg, tmp_path / "secagg", app=recorder)
    for a, b in zip(ref["clients"], got["clients"], strict=True):
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-6)
        assert b["reward_margin"] == pytest.approx(a["reward_margin"], rel=1e-3, abs=1e-5)  # 2**22-level quantization
    train_replies = [r for m, r in recorder.log if m.metadata.message_type == "train"]
    assert len(train_replies) == 4 * tiny_cfg.rounds * tiny_cfg.num_clients  # the protocol's four stages
    for reply in train_replies:  # masked vectors travel as bytes; no reply holds a client's tensors in the clear
        assert all(len(record) == 0 for record in reply.content.array_records.values())
