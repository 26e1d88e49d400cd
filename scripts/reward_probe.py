"""How far can a linear explicit reward head get on a backbone's frozen features? (docs/results.md, the 90 % target)

FedPDPO's reward head is ``r = w^T mean(h_response) + b`` on the final hidden state, trained for a few dozen local
steps. This script gives the ceiling of such a head: an L2-regularised logistic regression fitted to convergence
(L-BFGS, standardised features) on ``pool(chosen) - pool(rejected)`` of the *frozen* backbone, for several response
lengths (``max_length``, tokenised exactly as training does), hidden layers and training-set sizes, scored by
held-out pairwise accuracy: by default on validation pairs taken from the training split after the fitted ones, so
that choosing a layer or a length never looks at the test split the experiments are scored on. Hidden states are
causal, so one forward pass at the longest length serves every shorter one. Output: one JSON line per setting
(and ``--out FILE`` for all of them).

    python scripts/reward_probe.py --data ../shared/data/imdb_sentiment_pairs.jsonl --out probe.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fedpdpo.data.records import load_records
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.model.backbone import load_backbone


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", required=True, help="preference JSONL with a split field (train/test)")
    p.add_argument("--n-train", default="64,256", help="training-set sizes (pairs), comma-separated")
    p.add_argument("--n-eval", type=int, default=200, help="pairs scored (held out from fitting)")
    p.add_argument(
        "--eval-on",
        choices=["validation", "test"],
        default="validation",
        help="validation: train-split pairs after the fitted ones (for choosing a layer or length without "
        "touching the test split the experiments score on); test: the test split",
    )
    p.add_argument("--max-lengths", default="96,128,160,224", help="total lengths (prompt + response)")
    p.add_argument("--max-prompt-length", type=int, default=32)
    p.add_argument("--layers", default="-1,20,14", help="hidden_states indices; -1 = final (after the norm)")
    p.add_argument("--l2", default="0.001,0.01,0.1", help="L2 weights; the table reports each")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", type=Path)
    return p.parse_args()


@torch.no_grad()
def response_states(model, tokenizer: PairTokenizer, records, layers: list[int]) -> dict[int, list[torch.Tensor]]:
    """Per layer, the response-token hidden states of every sequence, ordered chosen, rejected, chosen, ..."""
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for i, record in enumerate(records):
        pair = tokenizer(i, record)
        for response in (pair.chosen_ids, pair.rejected_ids):
            ids = torch.tensor([list(pair.prompt_ids) + list(response)])
            states = model(input_ids=ids, output_hidden_states=True).hidden_states
            for layer in layers:
                out[layer].append(states[layer][0, len(pair.prompt_ids) :])
    return out


def pair_features(states: list[torch.Tensor], budget: int) -> torch.Tensor:
    """``mean(h_chosen) - mean(h_rejected)`` over the first ``budget`` response tokens, one row per pair."""
    pooled = torch.stack([h[:budget].mean(0) for h in states])
    return pooled[0::2] - pooled[1::2]


def probe_accuracy(train: torch.Tensor, test: torch.Tensor, l2: float) -> float:
    """Fit w on (d, 1) and (-d, 0) with standardised features; held-out share of pairs with w.d > 0."""
    x = torch.cat([train, -train])
    y = torch.cat([torch.ones(len(train)), torch.zeros(len(train))])
    scale = x.std(0) + 1e-6
    x = x / scale
    w = torch.zeros(x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ w, y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return ((test / scale) @ w.detach() > 0).float().mean().item()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n_train, lengths, layers = _ints(args.n_train), _ints(args.max_lengths), _ints(args.layers)
    l2s = [float(x) for x in args.l2.split(",")]
    records, _ = load_records(args.data)
    pool = [r for r in records if r.split == "train"]
    train = pool[: max(n_train)]
    if args.eval_on == "validation":
        test = pool[max(n_train) : max(n_train) + args.n_eval]
    else:
        test = [r for r in records if r.split == "test"][: args.n_eval]
    model, hf_tokenizer = load_backbone(args.model)
    tokenizer = PairTokenizer(hf_tokenizer, max(lengths), args.max_prompt_length)
    prompt_length = len(tokenizer.prompt_ids(train[0].prompt))
    start = time.perf_counter()
    train_states = response_states(model, tokenizer, train, layers)
    test_states = response_states(model, tokenizer, test, layers)
    print(f"hidden states of {len(train)} + {len(test)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
    rows = []
    for layer in layers:
        for max_length in lengths:
            budget = max_length - prompt_length
            train_d = pair_features(train_states[layer], budget)
            test_d = pair_features(test_states[layer], budget)
            for n in n_train:
                acc = {str(l2): round(probe_accuracy(train_d[:n], test_d, l2), 3) for l2 in l2s}
                row = {"layer": layer, "max_length": max_length, "n_train": n, args.eval_on: len(test), "accuracy": acc}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
