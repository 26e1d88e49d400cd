"""The FedPDPO model: parameter split, reference policy, log-prob computation."""

from __future__ import annotations

import pytest
import torch

from fedpdpo.data.tokenize import PairTokenizer, collate
from fedpdpo.engines.setup import build_model
from fedpdpo.strategies import get_strategy


def tiny_batch(model_cfg, tokenizer):
    from fedpdpo.data.records import PreferenceRecord

    pt = PairTokenizer(tokenizer, model_cfg.max_length, model_cfg.data.max_prompt_length)
    pairs = [pt(i, PreferenceRecord(f"prompt {i}", f"good {i} " * (i + 1), f"bad {i}")) for i in range(3)]
    return collate(pairs, pt.pad_id)


def test_local_modules_never_shared(tiny_cfg):
    model, _ = build_model(tiny_cfg)
    names = list(model.trainable())
    shared = get_strategy("fedpdpo").shared_names(names)
    assert shared and all(".lora_" in n for n in shared)
    local = [n for n in names if n not in shared]
    assert {n.split(".")[1] for n in local} == {"head", "reward_head", "adapter"}
    assert not any(n.startswith("local.") for n in shared)
    # the frozen backbone is not trainable
    assert not any("embed_tokens" in n for n in names)


def test_policy_equals_reference_at_init_and_logps_match_full_logits(tiny_cfg):
    model, tokenizer = build_model(tiny_cfg)
    batch = tiny_batch(tiny_cfg, tokenizer)
    out = model(batch)
    ref = model.reference_logps(batch)
    torch.testing.assert_close(out.logps, ref)
    assert torch.all(out.rewards == 0)  # zero-initialised reward head: no preference before training
    # naive computation over all positions with the backbone's own LM head
    logits = model.peft.get_base_model()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, batch.input_ids[:, 1:, None]).squeeze(2)
    naive = (logp * batch.response_mask[:, 1:]).sum(1)
    torch.testing.assert_close(ref, naive, rtol=1e-5, atol=1e-4)


def test_local_modules_change_policy_but_not_reference(tiny_cfg):
    model, tokenizer = build_model(tiny_cfg)
    batch = tiny_batch(tiny_cfg, tokenizer)
    ref_before = model.reference_logps(batch)
    with torch.no_grad():
        model.local["head"].weight.add_(0.05 * torch.randn_like(model.local["head"].weight))
        for n, p in model.trainable().items():
            if "lora_B" in n:
                p.add_(0.1)
    torch.testing.assert_close(model.reference_logps(batch), ref_before)
    assert not torch.allclose(model(batch).logps, ref_before)


def test_ablation_strategies_drop_modules(tiny_cfg):
    cfg = get_strategy("fedavg").configure(tiny_cfg)
    model, _ = build_model(cfg)
    assert len(model.local) == 0
    assert all(".lora_" in n for n in model.trainable())


def test_head_lr_scale_gives_the_head_its_own_step(tiny_cfg):
    """``method.head_lr_scale`` splits the personalized head from the adapter; 0 keeps the groups as they were
    (so a client state saved without it resumes)."""
    from fedpdpo.model.naming import HEAD_WEIGHT, optimizer_groups

    model, _ = build_model(tiny_cfg)
    params = model.trainable()
    tiny_cfg.lr, tiny_cfg.method.local_lr_scale, tiny_cfg.method.reward_lr_scale = 1e-3, 1.0, 10.0
    tiny_cfg.method.head_lr_scale = 0.0
    plain = optimizer_groups(params, tiny_cfg)
    assert [g["lr"] for g in plain] == [1e-3, 1e-3, 1e-2]
    assert any(p is params[HEAD_WEIGHT] for p in plain[1]["params"])
    tiny_cfg.method.head_lr_scale = 0.05
    split = optimizer_groups(params, tiny_cfg)
    assert [g["lr"] for g in split] == pytest.approx([1e-3, 1e-3, 5e-5, 1e-2])
    assert [id(p) for p in split[2]["params"]] == [id(params[HEAD_WEIGHT])]
    assert all(p is not params[HEAD_WEIGHT] for p in split[1]["params"]) and split[1]["params"]
    assert sum(len(g["params"]) for g in split) == len(params)
