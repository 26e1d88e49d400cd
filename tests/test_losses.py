"""Losses against hand computations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch.nn import functional as F

from fedpdpo.losses import dpo_loss, fedpdpo_objective, pairwise_accuracy, reward_bt_loss


def sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_sigmoid_matches_hand_computation():
    # pair: log pi(w)=-10, log pi(l)=-12, log ref(w)=-11, log ref(l)=-11 -> h = (1) - (-1) = 2
    losses, r_w, r_l = dpo_loss(
        torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]), beta=0.5
    )
    assert losses.item() == pytest.approx(-math.log(sigmoid(0.5 * 2)))
    assert r_w.item() == pytest.approx(0.5)
    assert r_l.item() == pytest.approx(-0.5)


def test_dpo_label_smoothing_and_ipo():
    args = (torch.tensor([-10.0]), torch.tensor([-12.0]), torch.tensor([-11.0]), torch.tensor([-11.0]))
    smoothed, _, _ = dpo_loss(*args, beta=0.5, label_smoothing=0.1)
    expected = -0.9 * math.log(sigmoid(1.0)) - 0.1 * math.log(sigmoid(-1.0))
    assert smoothed.item() == pytest.approx(expected)
    ipo, _, _ = dpo_loss(*args, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(*args, beta=0.5, loss_type="hinge-typo")


def test_reward_bt_loss():
    loss = reward_bt_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]))
    assert loss.tolist() == pytest.approx([-math.log(sigmoid(1.0)), math.log(2.0)])


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, -1.0, 0.0, 2.0])).item() == pytest.approx((1 + 0 + 0.5 + 1) / 4)


def test_fedpdpo_objective_combines_terms_and_names_metrics_like_trl():
    policy = torch.tensor([-10.0, -9.0, -12.0, -9.5])  # chosen x2, rejected x2
    ref = torch.tensor([-11.0, -9.0, -11.0, -9.0])
    rewards = torch.tensor([1.0, 0.5, -1.0, 0.5])
    out = fedpdpo_objective(policy, ref, rewards, beta=0.1, reward_weight=2.0)
    h = torch.tensor([1.0 - (-1.0), 0.0 - (-0.5)])
    dpo = (-torch.nn.functional.logsigmoid(0.1 * h)).mean().item()
    rm = (-torch.nn.functional.logsigmoid(torch.tensor([2.0, 0.0]))).mean().item()
    assert out.loss.item() == pytest.approx(dpo + 2.0 * rm)
    assert out.metrics["rewards/margins"] == pytest.approx((0.1 * h).mean().item())
    assert out.margins.tolist() == pytest.approx((0.1 * h).tolist())  # per pair: what evaluation ranks by
    assert out.metrics["rewards/accuracies"] == pytest.approx(1.0)
    assert out.metrics["explicit/accuracies"] == pytest.approx(0.75)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "loss/dpo", "loss/reward"):
        assert key in out.metrics
    # without a reward head the objective is plain DPO
    plain = fedpdpo_objective(policy, ref, None, beta=0.1, reward_weight=2.0)
    assert plain.loss.item() == pytest.approx(dpo)


def test_global_policy_term_adds_its_dpo_loss_with_its_weight():
    logps, ref = torch.tensor([-10.0, -12.0]), torch.tensor([-11.0, -11.0])
    global_logps = torch.tensor([-11.0, -10.0])  # the global policy prefers the rejected side: h = 0 - 1 = -1
    base = fedpdpo_objective(logps, ref, None, beta=0.5, reward_weight=0.0)
    both = fedpdpo_objective(logps, ref, None, 0.5, 0.0, global_logps=global_logps, global_weight=0.3)
    assert both.loss.item() == pytest.approx(base.loss.item() + 0.3 * -math.log(sigmoid(0.5 * -1)))
    assert both.metrics["global/accuracies"] == 0.0 and "loss/global" in both.metrics
    off = fedpdpo_objective(logps, ref, None, 0.5, 0.0, global_logps=global_logps, global_weight=0.0)
    assert off.loss.item() == pytest.approx(base.loss.item()) and "loss/global" not in off.metrics


def test_rpo_term_adds_the_chosen_sides_per_token_nll():
    """RPO (TRL's rpo_alpha): alpha times the chosen responses' NLL per token, pooled over the batch."""
    logps = torch.tensor([-10.0, -30.0, -12.0, -9.0])  # chosen: -10 (5 tokens), -30 (10 tokens); then rejected
    ref = torch.tensor([-11.0, -29.0, -11.0, -11.0])
    n_tokens = torch.tensor([5.0, 10.0, 4.0, 3.0])
    base = fedpdpo_objective(logps, ref, None, beta=0.1, reward_weight=0.0)
    rpo = fedpdpo_objective(logps, ref, None, 0.1, 0.0, n_tokens=n_tokens, rpo_alpha=0.5)
    assert rpo.metrics["loss/nll"] == pytest.approx(40.0 / 15.0)
    assert rpo.loss.item() == pytest.approx(base.loss.item() + 0.5 * 40.0 / 15.0)
    assert torch.equal(rpo.margins, base.margins)  # ranking is unchanged: the term only shapes training
    off = fedpdpo_objective(logps, ref, None, 0.1, 0.0, n_tokens=n_tokens, rpo_alpha=0.0)
    assert "loss/nll" not in off.metrics and off.loss.item() == pytest.approx(base.loss.item())


def test_dpop_penalises_only_a_chosen_side_below_the_reference():
    """DPOP: h - mu * max(0, log pi_ref(y_w) - log pi(y_w)) inside the sigmoid; a chosen side at or above the
    reference costs nothing, the margins that rank pairs do not change, and the global policy's term gets it too."""
    logps = torch.tensor([-12.0, -8.0, -20.0, -9.0])  # chosen: 2 nats below its reference, 1 above; then rejected
    ref = torch.tensor([-10.0, -9.0, -18.0, -10.0])
    beta, mu = 0.1, 5.0
    out = fedpdpo_objective(logps, ref, None, beta, 0.0, dpop_lambda=mu)
    h = torch.tensor([(-2.0) - (-2.0) - mu * 2.0, 1.0 - 1.0])
    assert out.loss.item() == pytest.approx(-F.logsigmoid(beta * h).mean().item())
    assert out.metrics["dpop/chosen_drop"] == pytest.approx(1.0)  # (2 + 0) / 2 nats
    plain = fedpdpo_objective(logps, ref, None, beta, 0.0)
    assert torch.equal(out.margins, plain.margins) and "dpop/chosen_drop" not in plain.metrics
    assert fedpdpo_objective(logps, ref, None, beta, 0.0, dpop_lambda=0.0).loss.item() == plain.loss.item()
    above = torch.tensor([-9.0, -8.0, -20.0, -9.0])  # both chosen sides at or above the reference: no penalty
    assert fedpdpo_objective(above, ref, None, beta, 0.0, dpop_lambda=mu).loss.item() == pytest.approx(
        fedpdpo_objective(above, ref, None, beta, 0.0).loss.item()
    )
    glob = fedpdpo_objective(logps, ref, None, beta, 0.0, global_logps=logps, global_weight=1.0, dpop_lambda=mu)
    assert glob.metrics["loss/global"] == pytest.approx(out.metrics["loss/dpo"])


def test_dpop_keeps_the_chosen_likelihood_up_in_a_training_step(tiny_cfg):
    """With method.dpop_lambda the same local round ends with its training pairs' chosen side less far below the
    reference than without (the gradient of the penalty pushes log pi(y_w) up); the metric is reported."""
    from fedpdpo.client.state import ClientState
    from fedpdpo.client.trainer import fit
    from fedpdpo.engines.setup import build_setup

    def train(mu: float) -> dict[str, float]:
        cfg = copy.deepcopy(tiny_cfg)
        cfg.method.rpo_alpha, cfg.method.dpop_lambda, cfg.local_steps, cfg.lr = 0.0, mu, 12, 1e-2
        setup = build_setup(cfg)
        return fit(setup.model, setup.tasks[0], ClientState(), setup.initial_global(), setup.initial, cfg, 1).metrics

    plain, dpop = train(0.0), train(50.0)
    assert "dpop/chosen_drop" in dpop and "dpop/chosen_drop" not in plain
    assert dpop["rewards/chosen"] > plain["rewards/chosen"]


def test_rpo_term_raises_the_chosen_likelihood_in_a_training_step(tiny_cfg):
    """A local round with rpo_alpha > 0 trains on the NLL term and reports it (loss/nll, as in evaluation)."""
    from fedpdpo.client.state import ClientState
    from fedpdpo.client.trainer import fit
    from fedpdpo.engines.setup import build_setup

    tiny_cfg.method.rpo_alpha = 1.0
    tiny_cfg.local_steps = 6
    setup = build_setup(tiny_cfg)
    result = fit(setup.model, setup.tasks[0], ClientState(), setup.initial_global(), setup.initial, setup.cfg, 1)
    assert result.metrics["loss/nll"] > 0


def test_local_rpo_scope_trains_only_the_local_tensors_with_the_nll(tiny_cfg):
    """rpo_scope = "local": the shared LoRA's gradient is the one without the NLL, bit for bit, and the local
    tensors' gradient is the one of the whole RPO objective (TRL's, rpo_scope = "all")."""
    from fedpdpo.client.state import ClientState
    from fedpdpo.client.trainer import _ref_for, backpropagate, load_client, objective, reference_table
    from fedpdpo.data.tokenize import collate
    from fedpdpo.engines.setup import build_setup

    setup = build_setup(tiny_cfg)
    model, task, state = setup.model, setup.tasks[0], ClientState()
    load_client(model, setup.initial_global(), state, setup.initial)
    params = model.trainable()
    with torch.no_grad():  # a non-zero LoRA, adapter and reward head, so every gradient is non-trivial
        for p in params.values():
            p.add_(0.01 * torch.randn_like(p))
    shared = set(setup.initial_global())
    local = [p for n, p in params.items() if n not in shared]
    batch = collate(task.train[:4], task.pad_id)
    table = reference_table(state, "train", len(task.train))
    table[batch.index] = torch.stack(model.reference_logps(batch).chunk(2), 1)

    def grads(alpha: float, scope: str) -> dict[str, torch.Tensor]:
        setup.cfg.method.rpo_alpha, setup.cfg.method.rpo_scope = alpha, scope
        out = model(batch)
        result = objective(out.logps, _ref_for(batch, table, "cpu"), out.rewards, setup.cfg, None, out.n_tokens)
        model.zero_grad(set_to_none=True)
        backpropagate(result.loss, result.local_loss, local)
        return {n: p.grad.clone() for n, p in params.items() if p.grad is not None}

    plain, everywhere, local_only = grads(0.0, "all"), grads(1.0, "all"), grads(1.0, "local")
    assert set(local_only) == set(plain)
    for name in params:
        if name in shared:  # the shared LoRA never sees the NLL: the same gradient, bit for bit
            assert torch.equal(local_only[name], plain[name]), name
        else:  # the sum of two backward passes against one: the same up to fp32 rounding of the accumulation
            assert torch.allclose(local_only[name], everywhere[name], rtol=1e-5, atol=1e-6), name
    head = [n for n in params if n not in shared and "head" in n and "reward" not in n]
    assert head and not torch.allclose(plain[head[0]], everywhere[head[0]])  # the NLL does reach the local head
    lora = [n for n in shared if "lora_B" in n]
    assert not torch.allclose(plain[lora[0]], everywhere[lora[0]])  # and with "all" the shared LoRA too
