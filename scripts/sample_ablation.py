"""Which of a client's personal modules moves what its model writes? (docs/results.md, "Where the loops come from")

For each client of a finished run, samples its kept-round personalized policy on its held-out prompt as is and with
one personal module put back to where it started (the personal head replaced by the original head; the bottleneck
adapter's up-projection zeroed, which makes it the identity) and at realignment strength ``--realign`` (decoding-time
realignment, ``fedpdpo.sampling.realigned``), next to the global policy and the base model. Every
model draws sample ``k`` with seed ``k`` (the same streams as ``fedpdpo evaluate``), and each sample set is scored
with the run-independent VADER judge, oriented to the client's side (read from its training pairs), and by its
share of repeated word trigrams (loops). One line per client and model:

    python scripts/sample_ablation.py --run runs/demo --samples 48
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from collections.abc import Iterator

import numpy as np
import torch

from fedpdpo.client.selection import load_final
from fedpdpo.client.trainer import autocast, load_client
from fedpdpo.data.formats import flat
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.evaluation import EvaluationSettings, direction, load_run, repeated_trigrams
from fedpdpo.judge import load_judge
from fedpdpo.sampling import SamplingConfig, Variant, sample_responses


@contextlib.contextmanager
def replaced(swaps: list[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block each tensor holds its replacement's values (restored on exit)."""
    saved = [t.detach().clone() for t, _ in swaps]
    try:
        with torch.no_grad():
            for tensor, value in swaps:
                tensor.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for (tensor, _), old in zip(swaps, saved, strict=True):
                tensor.copy_(old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="the --out directory of a finished `fedpdpo run`")
    parser.add_argument("--samples", type=int, default=48, help="samples per client and model")
    parser.add_argument("--realign", type=float, default=2.0, help="realignment strength of that row (1: no row)")
    args = parser.parse_args()
    defaults = EvaluationSettings()
    sampling = SamplingConfig(defaults.max_new_tokens, defaults.temperature, defaults.top_p, 0)
    realign = dataclasses.replace(sampling, realign=args.realign)
    setup, global_, store = load_run(args.run)
    judge, model = load_judge("sentiment"), setup.model
    for task in setup.tasks:
        cid = task.client_id
        assert task.lengths is not None
        pair_tok = PairTokenizer(setup.tokenizer, task.lengths.max_length, task.lengths.max_prompt_length)
        prompt = setup.clients[cid].test[0].prompt
        prompt_ids = pair_tok.prompt_ids(prompt)
        sign, _ = direction(judge, setup, cid, defaults.direction_pairs)
        state, shared = load_final(store, cid, global_)
        load_client(model, shared, state, setup.initial, personal=True)
        head, up = model.local["head"].weight, model.local["adapter"].up
        zero_up = [(up.weight, torch.zeros_like(up.weight)), (up.bias, torch.zeros_like(up.bias))]
        models: dict[str, tuple[Variant, SamplingConfig, list[tuple[torch.Tensor, torch.Tensor]]]] = {
            "personalized": ("personalized", sampling, []),
            "personal head -> original": ("personalized", sampling, [(head, model.ref_head_weight)]),
            "adapter -> identity": ("personalized", sampling, zero_up),
            "global": ("global", sampling, []),
            "base": ("base", sampling, []),
        }
        if args.realign != 1:
            models[f"realigned, strength {args.realign:g}"] = ("personalized", realign, [])
        for name, (variant, how, swaps) in models.items():
            with replaced(swaps), autocast(setup.cfg, model):
                ids = sample_responses(model, prompt_ids, variant, args.samples, how, pair_tok.stop_ids)
            texts = [setup.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
            oriented = sign * np.asarray(judge([flat(prompt)] * len(texts), texts))
            se = oriented.std(ddof=1) / np.sqrt(len(oriented))
            loops = 100 * np.mean([repeated_trigrams(t) for t in texts])
            print(
                f"client {cid}{' (conflict)' if setup.clients[cid].conflict else ''} | {name} | "
                f"oriented {oriented.mean():+.3f} +- {se:.3f} | on its side {100 * (oriented > 0).mean():.0f} % | "
                f"repeated trigrams {loops:.1f} %",
                flush=True,
            )


if __name__ == "__main__":
    main()
