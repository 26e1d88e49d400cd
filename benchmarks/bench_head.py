"""The output head of a training step: response log-probs over the vocabulary, forward and backward.

On SmolLM2 with the demo's batches (8 pairs, about 1,100 response tokens per step) the head is most of a step's
arithmetic: 3 x T x V x H x 2 = about 190 GFLOP (forward, gradient of the hidden states, gradient of the personal
head) against about 30 for the 4 LoRA layers. This times ``fedpdpo.model.policy.response_logps`` against the plain
formulation it replaced (autocast casting the head per chunk, ``gather`` minus ``logsumexp``), both with fp32
log-softmax as the method requires, in fp32 and in bf16 autocast, and prints the ratios (median of ``--repeats``).

    python benchmarks/bench_head.py                      # T=1100, H=576, V=49152 (SmolLM2), 2 threads
    python benchmarks/bench_head.py --tokens 2048 --vocab 262144 --hidden 640   # Gemma 3 270M
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from fedpdpo.model.policy import LOGIT_CHUNK, response_logps


def plain_logps(states: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The formulation before: per chunk, autocast casts the head; log-prob = gather - logsumexp in fp32."""
    out = []
    for start in range(0, states.shape[0], LOGIT_CHUNK):
        logits = (states[start : start + LOGIT_CHUNK] @ weight.T).float()
        tgt = targets[start : start + LOGIT_CHUNK]
        out.append(logits.gather(1, tgt[:, None]).squeeze(1) - torch.logsumexp(logits, dim=-1))
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1100, help="response tokens per step")
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weight = (0.02 * torch.randn(args.vocab, args.hidden, generator=gen)).requires_grad_(True)
    hidden = torch.randn(1, args.tokens + 1, args.hidden, generator=gen).requires_grad_(True)
    ids = torch.randint(0, args.vocab, (1, args.tokens + 1), generator=gen)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[0, 0] = False

    def current() -> torch.Tensor:
        return response_logps(hidden, ids, mask, weight)[0]

    def plain() -> torch.Tensor:
        return plain_logps(hidden[0, :-1], ids[0, 1:], weight)

    results: dict[str, float] = {}
    for precision in ("fp32", "bf16"):
        for name, fn in (("plain", plain), ("fedpdpo", current)):
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                    value = fn().sum()
                value.backward()
                times.append(time.perf_counter() - t0)
                weight.grad = hidden.grad = None
            results[f"{name}_{precision}_s"] = statistics.median(times)
            print(f"{name:8s} {precision}: {results[f'{name}_{precision}_s']:.3f} s per step (median)")
    ratios = {
        "fedpdpo_vs_plain_bf16": results["plain_bf16_s"] / results["fedpdpo_bf16_s"],
        "fedpdpo_vs_plain_fp32": results["plain_fp32_s"] / results["fedpdpo_fp32_s"],
        "fedpdpo_bf16_vs_fp32": results["fedpdpo_fp32_s"] / results["fedpdpo_bf16_s"],
    }
    for key, value in ratios.items():
        print(f"{key}={value:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), **results, **ratios}, f, indent=2)


if __name__ == "__main__":
    main()
