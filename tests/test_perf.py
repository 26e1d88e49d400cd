"""The [perf] switches change speed only: every fast path must give the results of the plain path."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import ensure_reference, evaluate, fit
from fedpdpo.config import PerfSettings, config_from_dict
from fedpdpo.data.tokenize import collate
from fedpdpo.engines.setup import build_model, build_setup
from fedpdpo.errors import ConfigError
from fedpdpo.model import head_logps
from fedpdpo.model.backbone import load_backbone
from fedpdpo.model.policy import FedPDPOModel, response_logps
from tests.conftest import TINY_CONFIG

PLAIN = PerfSettings(
    shared_prefix=False, fused_reference=False, response_only_logits=False, prefix_cache=False, compiled_head=False
)


def _setup(tiny_cfg, **lora):
    tiny_cfg.lora.last_n_layers = lora.get("last_n_layers", 1)
    return build_setup(tiny_cfg)


def _trained(setup):
    """A model whose LoRA and local modules are not at their initial values (so policy != reference)."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(7)
        for p in setup.model.trainable().values():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return setup.model


def _twin(setup, model, perf: PerfSettings):
    """The same weights as ``model`` in a model built with other perf settings (fixed at construction)."""
    twin, _ = build_model(dataclasses.replace(setup.cfg, perf=perf))
    twin.set_tensors(model.get_tensors(list(model.trainable())))
    return twin


@pytest.mark.parametrize("algorithm", ["fedavg", "fedpdpo"])
def test_forward_paths_agree(tiny_cfg, algorithm):
    tiny_cfg.algorithm = algorithm
    setup = _setup(tiny_cfg)
    model = _trained(setup)
    assert model.split_layer == 1
    batch = collate(setup.tasks[0].train[:3], setup.tasks[0].pad_id)
    plain = _twin(setup, model, PLAIN)(batch, with_reference=True)
    fast = model(batch, with_reference=True)
    torch.testing.assert_close(fast.logps, plain.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.ref_logps, plain.ref_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.ref_logps, model.reference_logps(batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(fast.logps, fast.ref_logps)  # the LoRA is really on in the policy pass
    if algorithm == "fedpdpo":
        torch.testing.assert_close(fast.rewards, plain.rewards, rtol=1e-5, atol=1e-5)
    # the layers swapped out during the prefix pass are all back
    assert all(type(layer).__name__ != "_Done" for layer in model.decoder.layers)
    assert type(model.decoder.norm).__name__ != "Identity"


def test_gradients_agree(tiny_cfg):
    setup = _setup(tiny_cfg)
    model = _trained(setup)
    batch = collate(setup.tasks[0].train[:4], setup.tasks[0].pad_id)
    grads = []
    for m in (_twin(setup, model, PLAIN), model):
        m.zero_grad(set_to_none=True)
        m(batch).logps.sum().backward()
        grads.append({n: p.grad.clone() for n, p in m.trainable().items() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_fit_same_with_and_without_switches(tiny_cfg, monkeypatch):
    """Fused reference + shared prefix + the compiled head (forced on for the tiny vocabulary) train the same model
    and cache the same reference as the plain path."""
    monkeypatch.setattr("fedpdpo.model.head_logps.COMPILE_MIN_LOGITS", 0)
    results = []
    for perf in (PLAIN, PerfSettings()):
        cfg = dataclasses.replace(tiny_cfg, perf=perf)
        setup = _setup(cfg)
        task, state = setup.tasks[0], ClientState()
        result = fit(setup.model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
        ensure_reference(setup.model, task, state, setup.cfg)  # fills rows the fused path has not visited yet
        results.append((result, state))
    (plain, plain_state), (fast, fast_state) = results
    assert head_logps.LSE.compiled is not None  # the fast side went through torch.compile (or its fallback)
    for name in plain.shared:
        # atol 1e-4 on LoRA values of about 0.01-0.1: the compiled exp rounds differently from the eager one, and
        # Adam's normalised steps carry a gradient's last bits into the update
        torch.testing.assert_close(fast.shared[name], plain.shared[name], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(fast_state.reference["train"], plain_state.reference["train"], rtol=1e-5, atol=1e-4)
    assert not torch.isnan(fast_state.reference["train"]).any()


def test_prefix_cache_is_canonical(tiny_cfg):
    """A cached prefix is computed per sequence, so its value does not depend on the batch that first needed it,
    and a full cache (budget 0: recompute every time) gives the same bits as a warm one."""
    setup = _setup(tiny_cfg)
    model, task = _trained(setup), setup.tasks[0]
    cache = model.prefix.cache
    first = collate(task.train[:4], task.pad_id)
    other = collate([task.train[0], *task.train[4:7]], task.pad_id)  # pair 0 with other partners
    cache.clear()
    warm = model(first).logps
    assert len(cache) == 8 and cache.nbytes > 0
    prompts = {tuple(p.prompt_ids) for p in task.train[:4]}
    assert cache.count("prompt") == len(prompts)  # chosen and rejected share their prompt's work
    cold_model = _twin(setup, model, PerfSettings(prefix_cache_mb=0))
    assert cold_model.prefix.cache is cache  # one cache per frozen prefix and process; the budget is the model's
    fresh = cold_model.prefix.hidden(other)[[0, 4]]  # pair 0, chosen and rejected, recomputed
    cached = cold_model.prefix.hidden(first)[[0, 4]]
    width = min(fresh.shape[1], cached.shape[1])
    assert torch.equal(fresh[:, :width], cached[:, :width])
    cache.clear()
    cold = cold_model(first).logps
    assert len(cache) == 0  # nothing stored over budget
    assert torch.equal(cold, warm)
    # and the cached path agrees with the batched prefix up to rounding
    batched = _twin(setup, model, PerfSettings(prefix_cache=False))(first).logps
    torch.testing.assert_close(warm, batched, rtol=1e-5, atol=1e-5)


def test_prefix_cache_is_for_the_cpu_only(tiny_cfg):
    """On a GPU the frozen prefix runs batched: per-sequence passes would cost more launches than they save."""
    setup = _setup(tiny_cfg)
    prefix = setup.model.prefix
    assert prefix.caches(torch.device("cpu"))
    assert not prefix.caches(torch.device("cuda", 0))
    assert not _twin(setup, setup.model, PerfSettings(prefix_cache=False)).prefix.caches(torch.device("cpu"))


def test_fit_identical_with_warm_or_cold_prefix_cache(tiny_cfg):
    """A restarted process (empty cache) trains the same bits as one that kept its cache from earlier rounds."""
    setup = _setup(tiny_cfg)
    model, task = setup.model, setup.tasks[0]
    cache = model.prefix.cache
    runs = []
    for warm in (False, True):
        cache.clear()
        if warm:
            evaluate(model, task, ClientState(), setup.initial_global(), setup.initial, setup.cfg)
            ensure_reference(model, task, ClientState(), setup.cfg)
            assert len(cache) == 2 * (len(task.train) + len(task.val) + len(task.test))  # evaluate scores val too
        hits = cache.hits
        result = fit(model, task, ClientState(), setup.initial_global(), setup.initial, setup.cfg, server_round=1)
        runs.append(result)
        assert (cache.hits > hits) == warm
    for name, value in runs[0].shared.items():
        assert torch.equal(runs[1].shared[name], value), name


def test_prefix_needs_last_n_layers(tiny_cfg):
    setup = _setup(tiny_cfg, last_n_layers=0)
    assert setup.model.split_layer == 0  # LoRA everywhere: nothing frozen to share, the plain path runs


def test_benchmark_accuracy_matches_evaluate(tiny_cfg):
    """benchmarks/bench_local_dpo.py scores TRL's model with implicit_accuracy() and fedpdpo's with evaluate()."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_local_dpo.py"
    spec = importlib.util.spec_from_file_location("bench_local_dpo", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny_cfg.algorithm = "fedavg"
    setup = _setup(tiny_cfg)
    model = _trained(setup)
    task = setup.tasks[0]
    shared = model.get_tensors(setup.shared_names)
    metrics = evaluate(model, task, ClientState(), shared, setup.initial, setup.cfg)
    decoder = model.peft.get_base_model().get_decoder()
    ours = bench.implicit_accuracy(
        decoder, model.ref_head_weight, model.peft.disable_adapter, task.test, task.pad_id, setup.cfg.beta, 16
    )
    assert ours == pytest.approx(metrics["accuracy_implicit"])


def test_prefix_cache_shared_by_models_on_the_same_backbone(tiny_cfg):
    """The runs of a comparison share one cache; a model whose frozen prefix differs gets its own."""
    first, second = _setup(tiny_cfg).model, _setup(tiny_cfg).model
    assert first.prefix.cache is second.prefix.cache
    backbone, _ = load_backbone("tiny")
    with torch.no_grad():
        backbone.model.layers[0].mlp.down_proj.weight.add_(1.0)  # a different frozen prefix
    third = FedPDPOModel(backbone, tiny_cfg.lora, tiny_cfg.method)
    assert third.prefix.cache is not first.prefix.cache


def test_reward_layer_reads_the_frozen_layer_on_every_path(tiny_cfg):
    """``method.reward_layer = k``: the explicit reward is the head on ``hidden_states[k]`` of the frozen backbone,
    whichever forward path runs, untouched by LoRA and adapter, and only the head gets its gradient."""
    tiny_cfg.method.reward_layer = 1
    setup = _setup(tiny_cfg)
    model = _trained(setup)
    batch = collate(setup.tasks[0].train[:3], setup.tasks[0].pad_id)
    with torch.no_grad(), model.peft.disable_adapter():
        states = model.peft.get_base_model()(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_hidden_states=True
        ).hidden_states[1]
        expected = model.local["reward_head"](states, batch.response_mask)
    model.prefix.cache.clear()
    for perf in (PLAIN, PerfSettings(), PerfSettings(prefix_cache=False)):
        twin = _twin(setup, model, perf)
        torch.testing.assert_close(twin(batch).rewards, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(twin.explicit_rewards(batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(batch).rewards, expected, rtol=1e-5, atol=1e-5)
    assert model.prefix.cache.count("layer1") == 6  # chosen and rejected of 3 pairs, computed once each
    with torch.no_grad():
        for name, p in model.trainable().items():
            if "adapter" in name or "lora_B" in name:
                p.add_(0.3)
    model.zero_grad(set_to_none=True)
    rewards = model(batch).rewards
    torch.testing.assert_close(rewards, expected, rtol=1e-5, atol=1e-5)
    rewards.sum().backward()
    with_grad = {n for n, p in model.trainable().items() if p.grad is not None}
    assert with_grad and all(n.startswith("local.reward_head") for n in with_grad)


def test_reward_layer_must_be_frozen(tiny_cfg):
    tiny_cfg.method.reward_layer = 2  # the LoRA layer of the 2-layer tiny model
    with pytest.raises(ConfigError, match=r"method\.reward_layer"):
        _setup(tiny_cfg)
    with pytest.raises(ConfigError, match=r"method\.reward_layer"):
        config_from_dict({"data": {"path": "x.jsonl"}, "method": {"reward_layer": -1}})


@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("bf16", [False, True])
def test_head_logps_match_the_plain_formulation(bf16, compiled, monkeypatch):
    """``response_logps`` (fp32 logsumexp and a hand-written softmax gradient, compiled or eager, one head cast per
    call) against what benchmarks/bench_head.py times it with (gather minus logsumexp, autocast's per-chunk cast):
    the same log-probs and gradients up to float rounding, over more than one chunk (the second of 51 rows)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_head.py"
    spec = importlib.util.spec_from_file_location("bench_head", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setattr("fedpdpo.model.head_logps.COMPILE_MIN_LOGITS", 0)  # compile this small vocabulary too
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = bench.LOGIT_CHUNK + 50, 16, 300
    weight = torch.randn(vocab, hidden_size, generator=gen).requires_grad_(True)
    hidden = torch.randn(1, tokens + 1, hidden_size, generator=gen).requires_grad_(True)
    ids = torch.randint(0, vocab, (1, tokens + 1), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 0] = False
    values = []
    for fn in (
        lambda: response_logps(hidden, ids, mask, weight, compiled=compiled)[0],
        lambda: bench.plain_logps(hidden[0, :-1], ids[0, 1:], weight).sum()[None],
    ):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            value = fn()
        grads = torch.autograd.grad(value.sum(), [weight, hidden])
        values.append((value.detach(), *grads))
    tol = {"rtol": 1e-2, "atol": 1e-2} if bf16 else {"rtol": 1e-5, "atol": 1e-4}
    for a, b in zip(*values, strict=True):
        torch.testing.assert_close(a.float(), b.float(), **tol)


def test_head_kernels_fall_back_to_eager_when_compilation_fails(monkeypatch, caplog):
    """Without a working compiler the head runs the same formulas eagerly, after one warning; ``compiled=False``
    and chunks below ``COMPILE_MIN_LOGITS`` never compile. The result equals the eager one exactly."""
    calls = []

    def broken_compile(fn, **_kwargs):
        def run(*_args):
            calls.append(fn.__name__)
            raise RuntimeError("InductorError: no C++ compiler found\nmore detail")

        return run

    gen = torch.Generator().manual_seed(1)
    states = torch.randn(7, 8, generator=gen).requires_grad_(True)
    weight = torch.randn(30, 8, generator=gen).requires_grad_(True)
    targets = torch.randint(0, 30, (7,), generator=gen)
    expected = torch.autograd.grad(head_logps.target_logps(states, weight, targets, compiled=False).sum(), [states])
    assert not calls
    for kernel in (head_logps.LSE, head_logps.LOGITS_GRAD):
        monkeypatch.setattr(kernel, "compiled", None)
        monkeypatch.setattr(kernel, "failed", False)
    monkeypatch.setattr(torch, "compile", broken_compile)
    head_logps.target_logps(states, weight, targets).sum().backward()  # 210 logits: below the threshold
    assert not calls
    monkeypatch.setattr(head_logps, "COMPILE_MIN_LOGITS", 0)
    with caplog.at_level("WARNING", logger="fedpdpo.model.head_logps"):
        for _ in range(2):
            got = torch.autograd.grad(head_logps.target_logps(states, weight, targets).sum(), [states])
            torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert calls == ["_lse", "_logits_grad"]  # each tried once, then eager for good
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and all("no C++ compiler found" in w and "more detail" not in w for w in warnings)


def test_profile_fit_benchmark_profiles_the_call_asked_for(monkeypatch, capsys):
    """benchmarks/profile_fit.py prints the operator table of the N-th fit call, and exits 2 when there is none."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "profile_fit.py"
    spec = importlib.util.spec_from_file_location("profile_fit", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    base = ["profile_fit.py", "--config", str(TINY_CONFIG), "--set", "rounds=1", "--set", "local_steps=1"]
    monkeypatch.setattr("sys.argv", [*base, "--call", "2", "--rows", "3"])
    assert bench.main() == 0
    captured = capsys.readouterr()
    assert "fit call 2:" in captured.err and "aten::" in captured.out
    monkeypatch.setattr("sys.argv", [*base, "--call", "99"])
    assert bench.main() == 2


def _same_length_batch(task, pad_id):
    """A batch whose sequences share a prompt and a length (so the prefix groups them): one pair's sides with
    their last response token varied."""
    pair = task.train[0]
    pairs = []
    for token in range(3, 7):
        chosen = (*pair.chosen_ids[:-1], token)
        pairs.append(dataclasses.replace(pair, chosen_ids=chosen, rejected_ids=(*chosen[:-1], token + 10)))
    return collate(pairs, pad_id)


def _one_by_one(prefix, batch):
    """Each row's prefix computed alone, without the cache."""
    prompt_length = int(batch.response_mask.int().argmax(1)[0])
    return torch.cat([prefix._sequence_prefix(ids[None], prompt_length) for ids in batch.input_ids])


def test_prefix_groups_are_computed_together_only_where_exact(tiny_cfg, monkeypatch):
    """Sequences of one prompt and length are computed in one call when that gives each row the bits it gets alone
    (checked once per shape), and one at a time where a platform's kernels would change them."""
    setup = _setup(tiny_cfg)
    model, task = _trained(setup), setup.tasks[0]
    batch = _same_length_batch(task, task.pad_id)
    assert bool(batch.attention_mask.all())  # one length, no padding
    cache = model.prefix.cache
    cache.clear()
    cache.batch_exact.clear()
    together = model.prefix.hidden(batch)
    assert list(cache.batch_exact.values()) == [True]  # the tiny model's rows do not depend on the batch
    alone = _one_by_one(model.prefix, batch)
    assert torch.equal(together, alone)

    # a platform where batching changes the bits: the first group is computed both ways, the alone values kept
    compute = model.prefix._sequence_prefix

    def inexact(ids, prompt_length):
        out = compute(ids, prompt_length)
        return out + 1e-3 if len(ids) > 1 else out

    monkeypatch.setattr(model.prefix, "_sequence_prefix", inexact)
    cache.clear()
    cache.batch_exact.clear()
    assert torch.equal(model.prefix.hidden(batch), alone)
    assert list(cache.batch_exact.values()) == [False]
    cache.clear()
    assert torch.equal(model.prefix.hidden(batch), alone)  # later groups of that shape: one by one


def test_a_training_step_reads_its_results_back_once(tiny_cfg, monkeypatch):
    """On a GPU every read of a computed tensor (``.item()``, ``float()``, ``.tolist()``) makes the host wait for the
    device's queue; a step reads its metrics, loss and gradient norm in one copy, and nothing else: the response
    positions (``nonzero``) are found while the batch is still on the CPU (data/tokenize.py), not in the model.
    (torch's AdamW reads its step counters with ``.item()``: they stay on the CPU unless ``capturable``, so only
    reads made by fedpdpo's own code are counted.)"""
    import sys

    from fedpdpo.client import trainer

    reads = {"item": 0, "float": 0, "nonzero": 0, "scalars": 0}
    real_read = trainer.read_scalars
    package = str(Path(trainer.__file__).parents[1])

    def count(kind, real):
        def wrapped(*args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if kind == "scalars" or (caller.startswith(package) and not caller.endswith("tokenize.py")):
                reads[kind] += 1
            return real(*args, **kwargs)

        return wrapped

    tiny_cfg.algorithm = "fedpdpo"
    tiny_cfg.local_steps = 5
    setup = build_setup(tiny_cfg)
    task, state = setup.tasks[0], ClientState()
    ensure_reference(setup.model, task, state, setup.cfg)  # not part of the steps
    steps = []
    monkeypatch.setattr(trainer, "read_scalars", count("scalars", real_read))
    monkeypatch.setattr(torch.Tensor, "item", count("item", torch.Tensor.item))
    monkeypatch.setattr(torch.Tensor, "__float__", count("float", torch.Tensor.__float__))
    monkeypatch.setattr(torch.Tensor, "nonzero", count("nonzero", torch.Tensor.nonzero))
    trainer._run_steps(
        setup.model,
        task,
        state,
        setup.cfg,
        trainer._Steps(torch.optim.AdamW(list(setup.model.trainable().values())), setup.model.trainable(), set(), 0, 5),
        lambda step, metrics: steps.append(metrics),
    )
    assert len(steps) == 5 and all(isinstance(v, float) for m in steps for v in m.values())
    assert reads == {"item": 0, "float": 0, "nonzero": 0, "scalars": 5}


def test_judge_benchmark_runs_and_prints_its_ratios(tmp_path, monkeypatch, capsys):
    """benchmarks/bench_judge.py on the tiny model: every side runs, the ratio lines and the JSON come out."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_judge.py"
    spec = importlib.util.spec_from_file_location("bench_judge", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "judge.json"
    argv = ["bench_judge.py", "--config", str(TINY_CONFIG), "--rows", "3", "--tokens", "3", "--prompts", "3"]
    monkeypatch.setattr("sys.argv", [*argv, "--repeats", "1", "--json", str(out)])
    bench.main()
    printed = capsys.readouterr().out
    names = ("grouped_vs_eager", "batched_vs_per_prompt", "reward_head_vs_full_scoring")
    assert all(f"ratio_{name}=" in printed for name in names)
    assert all(json.loads(out.read_text())[name] > 0 for name in names)
