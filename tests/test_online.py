"""On-policy pairs (fedpdpo.client.online): the client's own samples, labelled by its own score, and the DPO steps
the round takes on them."""

from __future__ import annotations

import copy

import pytest
import torch

from fedpdpo.client.online import close, own_pairs, sample_pairs
from fedpdpo.client.state import ClientState
from fedpdpo.client.trainer import _fit_online, _Steps, fit, load_client
from fedpdpo.data.tokenize import collate
from fedpdpo.engines.setup import build_setup
from fedpdpo.model.naming import optimizer_groups


def test_close_ends_a_finished_response_as_training_does_and_cuts_at_the_budget():
    assert close([5, 6], 4, 2) == (5, 6, 2)  # ended before the budget: closed by the end-of-turn token
    assert close([5, 6, 7, 8], 4, 2) == (5, 6, 7, 8)  # reached the budget: cut, as a long training response
    assert close([5, 6, 7, 8, 9], 4, 2) == (5, 6, 7, 8)
    assert close([5], 4, None) == (5,)


@pytest.fixture
def online_setup(tiny_cfg):
    tiny_cfg.method.online_pairs = 6
    setup = build_setup(tiny_cfg)
    model, task = setup.model, setup.tasks[0]
    load_client(model, setup.initial_global(), ClientState(), setup.initial)
    with torch.no_grad():  # a reward head that is not zero, so that it orders the samples
        for name, p in model.trainable().items():
            if "reward" in name:
                p.add_(torch.randn_like(p))
    model.eval()
    return setup, model, task


def test_own_pairs_put_the_side_the_reward_head_prefers_first(online_setup):
    setup, model, task = online_setup
    own = own_pairs(model, task, setup.cfg, seed=7)
    assert own.pairs and len(own.pairs) <= 6 and own.metrics["online/pairs"] == len(own.pairs)
    assert [p.index for p in own.pairs] == list(range(len(own.pairs)))
    budget = task.lengths.max_length - len(task.train[0].prompt_ids)
    prompts = {p.prompt_ids for p in task.train}
    batch = collate(own.pairs, task.pad_id)
    with torch.no_grad():
        out = model(batch, with_reference=True)
    n = len(own.pairs)
    assert bool((out.rewards[:n] > out.rewards[n:]).all())  # chosen = what the client's reward head ranks higher
    assert torch.allclose(own.reference, torch.stack(out.ref_logps.chunk(2), 1), atol=1e-5)
    for pair in own.pairs:
        assert pair.prompt_ids in prompts and pair.chosen_ids != pair.rejected_ids
        assert 0 < len(pair.chosen_ids) <= budget and 0 < len(pair.rejected_ids) <= budget
    again = own_pairs(model, task, setup.cfg, seed=7)
    assert again.pairs == own.pairs  # the seed decides the prompts and every sample
    assert sample_pairs(model, task, setup.cfg, seed=8) != sample_pairs(model, task, setup.cfg, seed=7)


def test_more_candidates_pair_the_best_and_the_worst_of_each_prompts_samples(online_setup):
    """online_candidates = N > 2: each pair is, of its slot's N samples (drawn as sample_responses draws them), the
    one the reward head ranks first against the one it ranks last; N = 2 keeps the two as drawn."""
    from fedpdpo.data.tokenize import collate_responses
    from fedpdpo.sampling import SamplingConfig, sample_responses

    setup, model, task = online_setup
    cfg = setup.cfg
    cfg.method.online_candidates = 4
    prompt = task.train[0].prompt_ids
    task.train = [p for p in task.train if p.prompt_ids == prompt]  # one prompt: one group, slots in order
    pairs = sample_pairs(model, task, cfg, seed=3)
    budget = task.lengths.max_length - len(prompt)
    k, n = cfg.method.online_pairs, 4
    sampling = SamplingConfig(max_new_tokens=budget, temperature=cfg.method.online_temperature, top_p=1.0, seed=4)

    def drawn(count: int) -> list[tuple[int, ...]]:
        """The group's samples as sample_pairs draws them (seed + 1 for its only group), closed."""
        rows = sample_responses(model, list(prompt), "personalized", count, sampling, task.stop_ids)
        return [close(r, budget, task.end_id) for r in rows]

    rows = drawn(n * k)
    with torch.no_grad():
        scores = model.explicit_rewards(collate_responses(prompt, rows, task.pad_id)).tolist()
    expected = []
    for j in range(k):
        slot = range(n * j, n * (j + 1))
        best, worst = max(slot, key=scores.__getitem__), min(slot, key=scores.__getitem__)
        if rows[best] != rows[worst]:
            expected.append((rows[best], rows[worst]))
    assert expected and [(p.chosen_ids, p.rejected_ids) for p in pairs] == expected
    cfg.method.online_candidates = 2
    two = sample_pairs(model, task, cfg, seed=3)
    rows = drawn(2 * k)
    assert [(p.chosen_ids, p.rejected_ids) for p in two] == [
        (rows[2 * j], rows[2 * j + 1]) for j in range(k) if rows[2 * j] != rows[2 * j + 1]
    ]


def test_online_steps_train_the_policy_and_leave_the_reward_head_alone(online_setup):
    """The explicit reward loss is off on the client's own samples (the head would learn its own labels back): its
    tensors do not move, while the LoRA, the adapter and the personal head do."""
    setup, model, task = online_setup
    params = model.trainable()
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(optimizer_groups(params, setup.cfg), lr=1e-2)
    run = _Steps(optimizer, params, set(setup.initial_global()), seed=1, steps=0)
    metrics, steps = _fit_online(model, task, setup.cfg, run, seed=3)
    assert steps == -(-int(metrics["online/pairs"]) // setup.cfg.batch_size) and steps > 0
    assert {"online/loss", "online/rewards/accuracies", "online/implicit_agrees"} <= set(metrics)
    moved = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert moved and not any("reward" in n for n in moved)
    assert any("lora" in n for n in moved) and any("head" in n and "reward" not in n for n in moved)


def test_online_local_only_leaves_the_shared_lora_where_the_offline_steps_put_it(online_setup):
    """With ``method.online_local_only`` the on-policy steps train the adapter and the personal head only: the shared
    LoRA (what the client sends) is exactly what it was before them."""
    setup, model, task = online_setup
    setup.cfg.method.online_local_only = True
    params = model.trainable()
    shared = set(setup.initial_global())
    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(optimizer_groups(params, setup.cfg), lr=1e-2)
    run = _Steps(optimizer, params, shared, seed=1, steps=0)
    _, steps = _fit_online(model, task, setup.cfg, run, seed=3)
    assert steps > 0
    moved = {n for n, p in params.items() if not torch.equal(p.detach(), before[n])}
    assert moved and not moved & shared and not any("reward" in n for n in moved)
    assert any("adapter" in n for n in moved) and any("head" in n and "reward" not in n for n in moved)


def test_fit_with_online_pairs_is_seeded_and_counts_its_steps(tiny_cfg):
    def run(online_pairs: int) -> dict[str, float]:
        cfg = copy.deepcopy(tiny_cfg)
        cfg.method.online_pairs, cfg.method.online_steps = online_pairs, 3
        setup = build_setup(cfg)
        return fit(setup.model, setup.tasks[0], ClientState(), setup.initial_global(), setup.initial, cfg, 1).metrics

    plain, online, again = run(0), run(4), run(4)
    assert not any(k.startswith("online/") for k in plain)
    assert online["steps"] == plain["steps"] + 3
    assert online == again


def test_repeated_ngrams_counts_the_repeats_of_token_ids_as_of_words():
    from fedpdpo.sampling import repeated_ngrams

    assert repeated_ngrams((1, 2, 3, 1, 2, 3, 1, 2, 3)) == pytest.approx(4 / 7)  # 7 trigrams, 3 distinct
    assert repeated_ngrams((1, 2, 3, 4, 5)) == 0.0 and repeated_ngrams((1, 2)) == 0.0
    assert repeated_ngrams(["a", "b", "a", "b", "a"], n=2) == pytest.approx(2 / 4)


LOOP, FLUENT_A, FLUENT_B = (7, 8, 9) * 4, (10, 11, 12, 13, 14), (15, 16, 17, 18, 19)


def test_a_loop_is_never_the_chosen_side_and_is_rejected_first(online_setup, monkeypatch):
    """online_max_repeat: of a prompt's N samples the chosen side is the best-scored fluent one and the rejected
    side the worst-scored loop, whatever the reward head thinks of the loop; a prompt whose samples all loop gives
    no pair; at the default 1 nothing is a loop and the pair is the best against the worst."""
    import fedpdpo.client.online as online

    setup, model, task = online_setup
    cfg = copy.deepcopy(setup.cfg)
    cfg.method.online_pairs, cfg.method.online_candidates = 1, 4
    task.train = task.train[:1]  # one prompt, one slot
    scores = {LOOP: 9.0, (7, 8, 9, 1) * 3: -5.0, FLUENT_A: 1.0, FLUENT_B: 0.5}
    rows = list(scores)

    def fake_sample(model, prompt, variant, count, sampling, stop_ids):
        return [list(rows[i % len(rows)]) for i in range(count)]

    monkeypatch.setattr(online, "sample_responses", fake_sample)
    monkeypatch.setattr(online, "close", lambda row, budget, end_id: tuple(row))
    monkeypatch.setattr(online, "_own_scores", lambda model, prompt, rs, pad, cfg: [scores[r] for r in rs])
    cfg.method.online_max_repeat = 1.0
    [pair] = sample_pairs(model, task, cfg, seed=0)
    assert (pair.chosen_ids, pair.rejected_ids) == (LOOP, (7, 8, 9, 1) * 3)  # off: the head's best and worst
    cfg.method.online_max_repeat = 0.1
    [pair] = sample_pairs(model, task, cfg, seed=0)
    assert (pair.chosen_ids, pair.rejected_ids) == (FLUENT_A, (7, 8, 9, 1) * 3)  # the worst-scored loop
    rows = [FLUENT_A, FLUENT_B, FLUENT_B, FLUENT_A]
    [pair] = sample_pairs(model, task, cfg, seed=0)
    assert (pair.chosen_ids, pair.rejected_ids) == (FLUENT_A, FLUENT_B)  # no loop: the best against the worst
    rows = [LOOP, (7, 8, 9, 1) * 3]
    assert sample_pairs(model, task, cfg, seed=0) == []


def test_own_pairs_order_a_fluent_side_over_a_loop_and_drop_two_loops(online_setup, monkeypatch):
    import fedpdpo.client.online as online
    from fedpdpo.data.tokenize import TokenizedPair

    setup, model, task = online_setup
    cfg = copy.deepcopy(setup.cfg)
    cfg.method.online_max_repeat = 0.1
    prompt = task.train[0].prompt_ids
    drawn = [
        TokenizedPair(0, prompt, LOOP, FLUENT_A),
        TokenizedPair(1, prompt, FLUENT_B, LOOP),
        TokenizedPair(2, prompt, LOOP, (7, 8, 9, 1) * 3),
    ]
    monkeypatch.setattr(online, "sample_pairs", lambda model, task, cfg, seed: drawn)
    own = own_pairs(model, task, cfg, seed=0)
    assert [(p.chosen_ids, p.rejected_ids) for p in own.pairs] == [(FLUENT_A, LOOP), (FLUENT_B, LOOP)]
    assert own.metrics["online/rejected_loops"] == 1.0
    cfg.method.online_max_repeat = 1.0  # off: the reward head alone orders all three
    assert len(own_pairs(model, task, cfg, seed=0).pairs) == 3
