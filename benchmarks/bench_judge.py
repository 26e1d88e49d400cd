"""The judge's two costs on a real model: sampling responses, and ranking best-of-N candidates.

``fedpdpo evaluate`` samples ``samples x (best_of + 2)`` responses per client (personalized with its candidates,
global, base) and ranks the candidates by the client's reward head. This times, on the config's model (the demo's
SmolLM2 by default, its clients' modules as initialised; the arithmetic does not depend on their values), in the
config's precision, each against the way it was done before, in the same invocation (median of ``--repeats``):

* **attention while decoding**: ``--rows`` samples of ``--tokens`` tokens to one prompt, with transformers' eager
  attention (which copies every cached key and value ``heads / kv_heads`` times per layer and step) against
  :func:`fedpdpo.sampling.grouped_attention`;
* **prompts in one batch**: one sample to each of ``--prompts`` distinct prompts of different lengths, one
  :func:`fedpdpo.sampling.sample_batch` call per prompt against one call for all (left-padded);
* **ranking**: ``--rows`` responses scored with :func:`fedpdpo.generate.score_responses` (policy and reference
  log-probs and the explicit reward) against :func:`fedpdpo.generate.own_scores` (the reward head's path alone).

    python benchmarks/bench_judge.py                                   # configs/demo.toml, 64 rows x 96 tokens
    python benchmarks/bench_judge.py --json benchmarks/results/judge_demo.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from fedpdpo import sampling as sampling_module
from fedpdpo.client.trainer import autocast
from fedpdpo.config import load_config
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.engines.setup import build_setup
from fedpdpo.generate import own_scores, score_responses
from fedpdpo.sampling import SamplingConfig, sample_batch


def median_time(fn: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--rows", type=int, default=64, help="samples to one prompt, and responses ranked")
    ap.add_argument("--tokens", type=int, default=96, help="new tokens per sample (no end token is honoured)")
    ap.add_argument("--prompts", type=int, default=16, help="distinct prompts for the batching comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    cfg = load_config(args.config)
    setup = build_setup(cfg)
    model, task = setup.model, setup.tasks[0]
    assert task.lengths is not None
    pair_tok = PairTokenizer(setup.tokenizer, task.lengths.max_length, task.lengths.max_prompt_length)
    prompt = setup.clients[task.client_id].test[0].prompt
    how = SamplingConfig(max_new_tokens=args.tokens, temperature=0.7, top_p=0.9)
    no_stop: set[int] = set()  # every row decodes all --tokens tokens, so both sides do the same work

    def sample(prompts: list[list[int]], calls: int = 1) -> list[list[int]]:
        out: list[list[int]] = []
        size = -(-len(prompts) // calls)
        with autocast(cfg, model):
            for start in range(0, len(prompts), size):
                rows = prompts[start : start + size]
                out.extend(sample_batch(model, rows, list(range(len(rows))), "personalized", how, no_stop))
        return out

    one_prompt = [pair_tok.prompt_ids(prompt)] * args.rows
    results: dict[str, float] = {}
    grouped_types = sampling_module.GROUPED_MODEL_TYPES
    try:
        sampling_module.GROUPED_MODEL_TYPES = frozenset()  # decoding() falls back to eager attention
        results["eager_attention_s"] = median_time(lambda: sample(one_prompt), args.repeats)
    finally:
        sampling_module.GROUPED_MODEL_TYPES = grouped_types
    results["grouped_attention_s"] = median_time(lambda: sample(one_prompt), args.repeats)
    # prompts of 1..9 words: different lengths
    words = ["a", "short", "review", "of", "the", "movie", "with", "its", "cast"]
    texts = [f"Write {' '.join(words[: 1 + i % len(words)])} number {i}." for i in range(args.prompts)]
    distinct = [pair_tok.prompt_ids(text) for text in texts]
    results["per_prompt_calls_s"] = median_time(lambda: sample(distinct, calls=len(distinct)), args.repeats)
    results["one_batched_call_s"] = median_time(lambda: sample(distinct), args.repeats)
    responses = [setup.tokenizer.decode(x, skip_special_tokens=True) for x in sample(one_prompt)]

    def rank(fn: Callable) -> None:
        with autocast(cfg, model):
            fn(model, pair_tok, cfg.beta, prompt, responses, cfg.eval_batch_size)

    results["rank_full_scoring_s"] = median_time(lambda: rank(score_responses), args.repeats)
    results["rank_reward_head_s"] = median_time(lambda: rank(own_scores), args.repeats)
    for key, value in results.items():
        print(f"{key:22s} {value:8.2f} s (median of {args.repeats})")
    ratios = {
        "grouped_vs_eager": results["eager_attention_s"] / results["grouped_attention_s"],
        "batched_vs_per_prompt": results["per_prompt_calls_s"] / results["one_batched_call_s"],
        "reward_head_vs_full_scoring": results["rank_full_scoring_s"] / results["rank_reward_head_s"],
    }
    for key, value in ratios.items():
        print(f"ratio_{key}={value:.2f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "precision": cfg.precision, **results, **ratios}, f, indent=2)


if __name__ == "__main__":
    main()
