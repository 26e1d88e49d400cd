"""Baselines and ablations: what each strategy switches on, what it shares, how it aggregates."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import fit
from fedpdpo.data.partition import ClientData
from fedpdpo.engines.server import planned_steps
from fedpdpo.engines.setup import build_setup
from fedpdpo.errors import ConfigError
from fedpdpo.strategies import STRATEGIES, ClientUpdate, get_strategy, weighted_average

LORA = [
    f"peft.base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.default.weight"
    for layer in (0, 1)
    for proj in ("q_proj", "v_proj")
    for ab in ("A", "B")
]
LOCAL = ["local.head.weight", "local.reward_head.score.weight", "local.adapter.down.weight"]

# name -> (personal_head, reward_head, adapter, eval_score)
MODULES = {
    "fedpdpo": (True, True, True, "auto"),
    "fedavg": (False, False, False, "auto"),
    "local": (False, False, False, "auto"),
    "centralized": (False, False, False, "auto"),
    "fedprox": (False, False, False, "auto"),
    "fedadam": (False, False, False, "auto"),
    "fedyogi": (False, False, False, "auto"),
    "fedper": (True, False, False, "auto"),
    "fedrep": (True, False, False, "auto"),
    "ditto": (False, False, False, "auto"),
    "fedsa-lora": (False, False, False, "auto"),
    "lg-fedavg": (False, False, False, "auto"),
    "fedpdpo-no-head": (False, True, True, "auto"),
    "fedpdpo-no-reward": (True, False, True, "auto"),
    "fedpdpo-no-adapter": (True, True, False, "auto"),
    "fedpdpo-implicit-eval": (True, True, True, "implicit"),
}


def test_registry_holds_every_algorithm_and_rejects_unknown():
    assert set(STRATEGIES) == set(MODULES)
    with pytest.raises(ConfigError, match="unknown algorithm 'fedfoo'"):
        get_strategy("fedfoo")


@pytest.mark.parametrize("name", sorted(MODULES))
def test_configure_switches_modules_without_touching_input(name, tiny_cfg):
    before = repr(tiny_cfg)
    cfg = get_strategy(name).configure(tiny_cfg)
    assert repr(tiny_cfg) == before
    m = cfg.method
    assert (m.personal_head, m.reward_head, m.adapter, m.eval_score) == MODULES[name]
    cfg.validate()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from(sorted(STRATEGIES)),
    modules=st.tuples(st.booleans(), st.booleans(), st.booleans()),
    eval_score=st.sampled_from(["implicit", "explicit", "combined"]),
    steps=st.integers(1, 12),
    clients=st.integers(1, 6),
    mu=st.sampled_from([0.0, 0.3]),
)
def test_configure_is_idempotent_and_only_switches_modules(tiny_cfg, name, modules, eval_score, steps, clients, mu):
    """``configure(configure(c)) == configure(c)`` for every strategy, and it changes nothing but the module switches
    (a resumed run, an export and a remote node all rebuild the same model from the saved config)."""
    cfg = copy.deepcopy(tiny_cfg)
    cfg.algorithm, cfg.local_steps, cfg.num_clients, cfg.method.proximal_mu = name, steps, clients, mu
    cfg.method.personal_head, cfg.method.reward_head, cfg.method.adapter = modules
    cfg.method.eval_score = eval_score
    strategy = get_strategy(name)
    once = strategy.configure(cfg)
    assert strategy.configure(once) == once
    switches = ("personal_head", "reward_head", "adapter", "eval_score")
    untouched = dataclasses.replace(
        once, method=dataclasses.replace(once.method, **{k: getattr(cfg.method, k) for k in switches})
    )
    assert untouched == cfg


@pytest.mark.parametrize("name", sorted(MODULES))
def test_local_modules_never_travel(name):
    strategy = get_strategy(name)
    shared = strategy.shared_names(LORA + LOCAL)
    assert not any(n.startswith("local.") for n in shared)


def test_sharing_rules():
    def shared(name):
        return set(get_strategy(name).shared_names(LORA + LOCAL))

    lora = set(LORA)
    for name in ("fedpdpo", "fedavg", "fedprox", "fedadam", "fedper", "fedrep", "centralized"):
        assert shared(name) == lora, name
    assert shared("local") == set()
    assert shared("fedsa-lora") == {n for n in LORA if ".lora_A." in n}
    assert shared("lg-fedavg") == {n for n in LORA if ".layers.1." in n}


def test_lg_fedavg_needs_the_model_names_first():
    with pytest.raises(RuntimeError, match="shared_names"):
        get_strategy("lg-fedavg").is_shared(LORA[0])


def test_strategy_parameters_become_round_instructions(tiny_cfg):
    """Parameters are the strategy's own (from the config when set there) and reach clients as instructions; the
    config itself is never rewritten."""
    assert get_strategy("fedprox", tiny_cfg).fit_instructions(1) == {"proximal-mu": pytest.approx(0.01)}
    assert get_strategy("ditto", tiny_cfg).fit_instructions(1) == {"ditto-lambda": pytest.approx(0.1)}
    assert get_strategy("fedprox").proximal_mu == pytest.approx(0.01)  # constructor defaults without a config
    tiny_cfg.method.proximal_mu, tiny_cfg.method.ditto_lambda = 0.5, 0.25
    assert get_strategy("fedprox", tiny_cfg).fit_instructions(2) == {"proximal-mu": 0.5}
    assert get_strategy("ditto", tiny_cfg).fit_instructions(2) == {"ditto-lambda": 0.25}
    assert get_strategy("fedavg", tiny_cfg).fit_instructions(1) == {}  # another strategy's parameter: not used
    before = copy.deepcopy(tiny_cfg)
    for name in STRATEGIES:
        strategy = get_strategy(name, tiny_cfg)
        strategy.configure(tiny_cfg)
        strategy.fit_instructions(1)
    assert tiny_cfg == before


def test_fedrep_phase_split(tiny_cfg):
    tiny_cfg.local_steps = 6
    assert get_strategy("fedrep", tiny_cfg).fit_instructions(1) == {"head-steps": 3}
    tiny_cfg.method.head_steps = 6
    with pytest.raises(ConfigError, match="head_steps"):
        get_strategy("fedrep", tiny_cfg)


def test_centralized_pools_data_and_keeps_the_step_budget(tiny_cfg):
    strategy = get_strategy("centralized", tiny_cfg)
    assert strategy.configure(tiny_cfg).local_steps == tiny_cfg.local_steps  # the config keeps the user's steps
    assert strategy.fit_instructions(1) == {"local-steps": tiny_cfg.local_steps * tiny_cfg.num_clients}
    assert strategy.sample_clients(3, 3, 1.0, tiny_cfg.seed) == [0]
    clients = [ClientData(i, train=[f"r{i}{j}" for j in range(i + 2)], test=[f"t{i}"]) for i in range(3)]
    pooled = strategy.prepare_clients(clients)
    assert pooled[0].train == ["r00", "r01", "r10", "r11", "r12", "r20", "r21", "r22", "r23"]
    assert [c.train for c in pooled[1:]] == [c.train for c in clients[1:]]
    assert [c.test for c in pooled] == [c.test for c in clients]


def _updates(seed: int) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    return [ClientUpdate(i, n, {"a": torch.randn(4, 3, generator=gen)}) for i, n in enumerate((5, 2, 9))]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi"])
def test_server_optimizer_matches_flower(name, monkeypatch):
    """Three rounds of our FedAdam/FedYogi against Flower's classes fed the same client arrays."""
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
    from flwr.serverapp import strategy as flwr_strategy
    from flwr.supercore.task_identity import TaskIdentity

    from fedpdpo.strategies.fedopt import FedAdam

    for attr in ("_run_id", "_node_id", "_task_id"):  # a Message outside a Flower run needs an identity
        monkeypatch.setattr(TaskIdentity, attr, 1)
    ours = get_strategy(name)
    assert isinstance(ours, FedAdam)
    theirs = {"fedadam": flwr_strategy.FedAdam, "fedyogi": flwr_strategy.FedYogi}[name](
        eta=ours.eta, beta_1=ours.beta1, beta_2=ours.beta2, tau=ours.tau
    )
    current = {"a": torch.zeros(4, 3, dtype=torch.float64)}
    for server_round in (1, 2, 3):
        updates = _updates(server_round)
        theirs.current_arrays = {k: v.numpy() for k, v in current.items()}
        replies = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({k: Array(v.double().numpy()) for k, v in u.tensors.items()}),
                        "metrics": MetricRecord({"num-examples": u.num_examples}),
                    }
                ),
                dst_node_id=1,
                message_type="train",
            )
            for u in updates
        ]
        expected = theirs.aggregate_train(server_round, replies)[0]["a"].numpy()
        current = ours.aggregate(
            server_round,
            current,
            [ClientUpdate(u.client_id, u.num_examples, {"a": u.tensors["a"].double()}) for u in updates],
        )
        np.testing.assert_allclose(current["a"].numpy(), expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(current["a"], weighted_average(_updates(3))["a"].double())


def test_fedrep_head_phase_leaves_shared_tensors_alone(tiny_cfg):
    """With every step in the head phase the shared LoRA comes back unchanged and the head moves."""
    tiny_cfg.algorithm = "fedper"
    setup = build_setup(tiny_cfg)
    shared = setup.initial_global()
    cfg = setup.cfg
    head_only = {"head-steps": cfg.local_steps}
    result = fit(setup.model, setup.tasks[0], ClientState(), shared, setup.initial, cfg, 1, instructions=head_only)
    assert all(torch.equal(result.shared[n], shared[n]) for n in shared)
    assert not torch.equal(result.state.local["local.head.weight"], setup.initial["local.head.weight"])
    assert result.metrics["steps"] == cfg.local_steps
    result = fit(setup.model, setup.tasks[0], ClientState(), shared, setup.initial, cfg, 1)
    assert any(not torch.equal(result.shared[n], shared[n]) for n in shared if ".lora_B." in n)


def test_fedpdpo_personal_first_steps(tiny_cfg):
    """``method.personal_first_steps`` becomes FedPDPO's instruction; those steps train the local modules alone
    against the received LoRA (all of them local-only: the LoRA comes back unchanged), then the joint steps follow
    and the progress display counts both."""
    assert get_strategy("fedpdpo", tiny_cfg).fit_instructions(1) == {}
    tiny_cfg.method.personal_first_steps = 3
    assert get_strategy("fedpdpo", tiny_cfg).fit_instructions(1) == {"personal-first-steps": 3}
    assert get_strategy("fedavg", tiny_cfg).fit_instructions(1) == {}
    assert planned_steps(get_strategy("fedpdpo", tiny_cfg), tiny_cfg, range(1, 3)) == {
        r: dict.fromkeys(range(tiny_cfg.num_clients), tiny_cfg.local_steps + 3) for r in (1, 2)
    }
    setup = build_setup(tiny_cfg)
    shared, cfg = setup.initial_global(), setup.cfg
    only_local = {"personal-first-steps": 3, "local-steps": 0}
    result = fit(setup.model, setup.tasks[0], ClientState(), shared, setup.initial, cfg, 1, instructions=only_local)
    assert all(torch.equal(result.shared[n], shared[n]) for n in shared)
    assert not torch.equal(result.state.local["local.adapter.down.weight"], setup.initial["local.adapter.down.weight"])
    assert result.metrics["steps"] == 3
    both = {"personal-first-steps": 2, "local-steps": 2}
    result = fit(setup.model, setup.tasks[0], ClientState(), shared, setup.initial, cfg, 1, instructions=both)
    assert any(not torch.equal(result.shared[n], shared[n]) for n in shared if ".lora_B." in n)
    assert result.metrics["steps"] == 4


def test_unshared_lora_trains_at_the_full_learning_rate(tiny_cfg):
    """local keeps LoRA on the client; it must get ``lr``, not the local modules' smaller step."""
    tiny_cfg.algorithm = "local"
    setup = build_setup(tiny_cfg)
    assert setup.shared_names == []
    result = fit(setup.model, setup.tasks[0], ClientState(), {}, setup.initial, setup.cfg, 1)
    assert result.shared == {}
    assert {g["lr"] for g in result.state.optimizer["param_groups"]} == {setup.cfg.lr}
    assert set(result.state.local) == set(setup.initial)


def test_ditto_sends_fedavg_update_and_evaluates_its_personal_copy(tiny_cfg, tmp_path, monkeypatch):
    """Ditto's federated pass is FedAvg's local training (same global tensors, bit for bit); each client is then
    evaluated with its own personal LoRA, which stays in its state and was pulled towards the global one."""
    from safetensors.torch import load_file

    from fedpdpo.client.state import ClientStore
    from fedpdpo.engines.inprocess import run_inprocess
    from fedpdpo.model.naming import PERSONAL, personal_copies
    from fedpdpo.report.compare import load_run

    monkeypatch.setattr(ClientStore, "finalize", lambda self, client_ids: 0)  # keep the optimizers a finished run drops
    summaries = {}
    for name in ("fedavg", "ditto"):
        tiny_cfg.algorithm = name
        summaries[name] = run_inprocess(tiny_cfg, tmp_path / name, quiet=True)
    fedavg, ditto = (load_file(tmp_path / n / "global.safetensors") for n in ("fedavg", "ditto"))
    assert fedavg.keys() == ditto.keys() and all(torch.equal(fedavg[k], ditto[k]) for k in fedavg)
    state = ClientStore(tmp_path / "ditto" / "clients").load(0)
    personal = personal_copies(state.local)
    assert set(personal) == set(ditto) and state.personal_optimizer is not None
    assert any(not torch.equal(personal[k], ditto[k]) for k in personal)
    assert all(n.startswith(PERSONAL) for n in state.local)  # no local modules: only the personal copies
    margins = {n: [c["reward_margin"] for c in s["clients"]] for n, s in summaries.items()}
    assert margins["ditto"] != margins["fedavg"]  # evaluated with the personal LoRA, not the global one
    # the clients report the steps they ran: Ditto's personal pass doubles them, and the report reads that
    assert load_run(tmp_path / "ditto").step_budget == 2 * load_run(tmp_path / "fedavg").step_budget
    assert [c["local_steps"] for c in summaries["fedavg"]["clients"]] == [tiny_cfg.rounds * tiny_cfg.local_steps] * 2
