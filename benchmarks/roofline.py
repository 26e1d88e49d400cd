"""Where local DPO time goes, and how far it is from this CPU's physical limit.

1. Peak fp32 matmul throughput on this machine (``torch.mm`` at the model's own shapes, best of a few runs).
2. Training FLOPs per preference pair, counted from the model config for fedpdpo's path (shared frozen prefix,
   reference from the prefix, head on response tokens only) and for TRL's (two full forwards, head on every
   position), so ``FLOPs / peak FLOP/s`` is the fastest either could possibly go.
3. A ``torch.profiler`` table of fedpdpo's ``fit`` on the benchmark job (operators by self CPU time).

    python benchmarks/roofline.py                     # all three, smollm2, the bench_local_dpo defaults
    python benchmarks/roofline.py --no-profile --json roofline.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench_local_dpo import add_job_args, job_config


def peak_matmul_flops(threads: int, repeats: int = 5) -> dict[str, float]:
    """Best fp32 GFLOP/s of ``torch.mm`` over shapes that occur in training (tokens x hidden x out)."""
    import torch

    torch.set_num_threads(threads)
    shapes = {"mlp 1024x576x1536": (1024, 576, 1536), "head 768x576x49152": (768, 576, 49152)}
    shapes["square 2048"] = (2048, 2048, 2048)
    out = {}
    for name, (m, k, n) in shapes.items():
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - start)
        out[name] = 2 * m * k * n / best / 1e9
    return out


def flops_per_pair(config, n_tokens: float, n_response: float, last_n_layers: int) -> dict[str, float]:
    """Training FLOPs of one pair (chosen + rejected: ``n_tokens`` real tokens, ``n_response`` scored ones).

    A matmul with frozen weights costs 2 FLOPs per weight per token forward and the same again backward (input
    gradient only; LoRA's own weights are negligible). Attention adds ``4 * L * d`` per token per layer.
    """
    d, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    per_layer_weights = d * d + 2 * d * kv + d * d + 3 * d * inter
    seq_len = n_tokens / 2
    layer = 2 * per_layer_weights + 4 * seq_len * d  # forward FLOPs per token per layer
    head = 2 * d * config.vocab_size  # forward FLOPs per projected token
    top = last_n_layers or layers
    fed = n_tokens * layer * (layers + top) + head * n_response * 2  # prefix once + top twice (ref, policy)
    fed += n_tokens * layer * top + head * n_response  # backward through the LoRA layers and the head
    trl = n_tokens * layer * layers * 2 + head * n_tokens * 2  # policy and reference forwards, every position
    trl += n_tokens * layer * top + head * n_tokens
    return {"fedpdpo": fed, "trl": trl, "per_token_forward": layers * layer + head}


def profile_fit(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Profile fedpdpo's ``fit`` on the benchmark job; operators by self CPU time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fedpdpo.client.state import ClientState
    from fedpdpo.client.trainer import fit, reference_logps
    from fedpdpo.config import config_from_dict
    from fedpdpo.engines.setup import build_setup

    setup = build_setup(config_from_dict(job_config(args, "fedavg")))
    task, model, state = setup.tasks[0], setup.model, ClientState()
    state.reference["test"] = reference_logps(model, task.test, setup.cfg, task.pad_id)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(model, task, state, setup.initial_global(), setup.initial, setup.cfg, server_round=1)
    rows = [
        {"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
        for e in prof.key_averages()
        if e.self_cpu_time_total > 0
    ]
    rows.sort(key=lambda r: -r["self_cpu_s"])
    torch.set_num_threads(args.threads)
    return rows


def categorize(rows: list[dict[str, Any]]) -> dict[str, float]:
    groups = {
        "matmul (mm, addmm, bmm, linear)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"),
        "attention (sdpa)": ("aten::_scaled_dot_product", "aten::scaled_dot_product"),
        "log-softmax over the vocabulary": ("aten::logsumexp", "aten::exp", "aten::log", "aten::sub", "aten::max"),
        "elementwise (RMSNorm, rotary, SiLU, residuals, copies)": (
            *("aten::mul", "aten::add", "aten::pow", "aten::neg", "aten::cat", "aten::silu", "aten::rsqrt"),
            *("aten::mean", "aten::copy_", "aten::fill_", "aten::where", "aten::sum", "aten::sqrt", "aten::div"),
        ),
        "optimizer (AdamW)": ("Optimizer.step", "aten::_foreach", "aten::addcdiv", "aten::lerp"),
    }
    total = sum(r["self_cpu_s"] for r in rows)
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        name = next((g for g, prefixes in groups.items() if r["op"].startswith(prefixes)), "other")
        out[name] += r["self_cpu_s"]
    return {k: v / total for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_job_args(p, steps=3, eval_pairs=8)
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from fedpdpo.config import config_from_dict
    from fedpdpo.data import build_clients
    from fedpdpo.data.task import build_task
    from fedpdpo.model.backbone import load_backbone

    peak = peak_matmul_flops(args.threads)
    best = max(peak.values())
    print(f"peak fp32 matmul, {args.threads} threads: " + ", ".join(f"{k}: {v:.1f} GFLOP/s" for k, v in peak.items()))

    cfg = config_from_dict(job_config(args, "fedavg"))
    backbone, tokenizer = load_backbone(cfg.model)
    pairs = build_task(build_clients(cfg)[0][0], tokenizer, cfg).train
    n_tokens = sum(2 * len(q.prompt_ids) + len(q.chosen_ids) + len(q.rejected_ids) for q in pairs) / len(pairs)
    n_response = sum(len(q.chosen_ids) + len(q.rejected_ids) for q in pairs) / len(pairs)
    flops = flops_per_pair(backbone.config, n_tokens, n_response, args.last_n_layers)
    print(
        f"mean tokens per pair {n_tokens:.0f} (response {n_response:.0f}); forward FLOPs per token (full model) "
        f"{flops['per_token_forward'] / 1e6:.0f} M"
    )
    limits = {}
    for side in ("fedpdpo", "trl"):
        limits[side] = best * 1e9 / flops[side]
        print(f"{side:8s} {flops[side] / 1e9:7.1f} GFLOP per pair -> at most {limits[side]:.2f} pairs/s at peak")
    result: dict[str, Any] = {"peak_gflops": peak, "flops_per_pair": flops, "max_pairs_per_s": limits}
    result["mean_tokens_per_pair"], result["mean_response_tokens_per_pair"] = n_tokens, n_response
    if not args.no_profile:
        del backbone
        rows = profile_fit(args)
        print(f"\nprofile of fit ({args.steps} steps, batch {args.batch_size}): self CPU time by operator")
        total = sum(r["self_cpu_s"] for r in rows)
        for r in rows[:15]:
            print(f"  {r['op']:45s} {r['self_cpu_s']:8.2f} s {100 * r['self_cpu_s'] / total:5.1f} %  {r['calls']:6d}")
        shares = categorize(rows)
        print("by category: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in shares.items()))
        result["profile_top"], result["profile_shares"] = rows[:30], shares
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
