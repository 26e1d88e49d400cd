"""On-policy pairs: responses the client's personalized policy writes, labelled by the client's own score.

Why: a client's preference pairs are text the policy would not write (on IMDB, human reviews), and DPO on them
teaches the policy to *rank* such text long before it changes what the policy *samples*: on the demo the
personalized policies rank 70 % of held-out pairs right, yet their samples lean to their clients' side no more
than the base model's, while the best of 4 of their own samples by the client's reward head does
(docs/results.md). Pairs of the policy's own samples, ordered by that head, put the preference where the policy
writes. The reward head learned on the client's pairs only, so nothing leaves the client and no outside judge is
involved (the judge of ``fedpdpo evaluate`` stays independent of training).

:func:`own_pairs` builds them; the trainer then takes ``method.online_steps`` DPO steps on them with the
reference log-probs computed here (formula and choices in docs/method.md, "On-policy pairs"). Off by default: at
16 pairs and 4 steps per round on the demo it did not make the policies lean beyond noise (docs/results.md, "DPOP
and on-policy pairs"); from the best and worst of 8 samples one majority client's policy of two leaned fluently
on each of three seeds, the conflict client's on none (docs/results.md, "On-policy pairs from the best and the
worst of 8"); with loops also kept off the chosen side (``method.online_max_repeat``) both majority clients'
policies leaned on one seed of two, the conflict client's on neither (docs/results.md, "On-policy pairs that keep
loops off the chosen side"), nor with the steps on its local modules only (``method.online_local_only``;
docs/results.md, "On-policy steps on the local modules only").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedpdpo.config import RunConfig
from fedpdpo.data.task import ClientTask
from fedpdpo.data.tokenize import TokenizedPair, collate, collate_responses
from fedpdpo.model.policy import FedPDPOModel
from fedpdpo.sampling import SamplingConfig, repeated_ngrams, sample_responses


@dataclass
class OwnPairs:
    pairs: list[TokenizedPair]  # indexed 0..n-1: the rows of ``reference``
    reference: torch.Tensor  # [n, 2] reference log-probs of (chosen, rejected)
    metrics: dict[str, float]


def close(response: list[int], budget: int, end_id: int | None) -> tuple[int, ...]:
    """A sampled response as a training response: closed by the end-of-turn token when it ended before the budget
    (training responses are closed unless cut), and at most ``budget`` tokens."""
    ids = list(response[:budget])
    if end_id is not None and len(ids) < budget:
        ids.append(end_id)
    return tuple(ids)


@torch.no_grad()
def sample_pairs(model: FedPDPOModel, task: ClientTask, cfg: RunConfig, seed: int) -> list[TokenizedPair]:
    """``cfg.method.online_pairs`` pairs of personalized samples, to prompts drawn (with ``seed``) from the
    client's training pairs; prompts that recur are sampled in one batch. Each pair comes from
    ``method.online_candidates`` samples of its prompt: with two, the two as drawn (unlabelled: ``chosen`` is the
    first); with more, the one the client's own score ranks first (``chosen``) and the one it ranks last, where a
    loop (:func:`loops`) is never ``chosen`` and is ``rejected`` first (a prompt whose N samples all loop gives no
    pair). Pairs of two identical responses are dropped (nothing to prefer)."""
    k, n = cfg.method.online_pairs, cfg.method.online_candidates
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(task.train), (k,), generator=gen).tolist()
    groups: dict[tuple[int, ...], list[int]] = {}
    for slot, i in enumerate(picks):
        groups.setdefault(task.train[i].prompt_ids, []).append(slot)
    max_length = task.lengths.max_length if task.lengths else cfg.max_length
    found: dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = {}
    for g, (prompt, slots) in enumerate(groups.items()):
        budget = max_length - len(prompt)
        sampling = SamplingConfig(
            max_new_tokens=budget,
            temperature=cfg.method.online_temperature,
            top_p=1.0,
            seed=seed + 1 + n * k * g,
        )
        rows = sample_responses(model, list(prompt), "personalized", n * len(slots), sampling, task.stop_ids)
        closed = [close(row, budget, task.end_id) for row in rows]
        scores = _own_scores(model, prompt, closed, task.pad_id, cfg) if n > 2 else None
        for j, slot in enumerate(slots):
            candidates = range(n * j, n * (j + 1))
            if scores is None:
                found[slot] = (prompt, closed[candidates[0]], closed[candidates[1]])
                continue
            # fluent above loop, then by score: the best fluent sample against the worst loop (or the worst one)
            rank = {i: (not loops(closed[i], cfg), scores[i]) for i in candidates}
            first, last = max(candidates, key=rank.__getitem__), min(candidates, key=rank.__getitem__)
            if rank[first][0]:  # else every sample of the prompt loops: no pair
                found[slot] = (prompt, closed[first], closed[last])
    kept = [found[s] for s in range(k) if s in found and found[s][1] != found[s][2]]
    return [TokenizedPair(i, p, a, b) for i, (p, a, b) in enumerate(kept)]


def loops(response: tuple[int, ...], cfg: RunConfig) -> bool:
    """Whether a sampled response is a loop: more than ``method.online_max_repeat`` of its token trigrams occurred
    earlier in it (never, at the default 1)."""
    return repeated_ngrams(response) > cfg.method.online_max_repeat


def _own_scores(
    model: FedPDPOModel, prompt: tuple[int, ...], responses: list[tuple[int, ...]], pad_id: int, cfg: RunConfig
) -> list[float]:
    """The client's own score of each response (:meth:`FedPDPOModel.own_scores`), ``cfg.eval_batch_size``
    responses per pass."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(responses), cfg.eval_batch_size):
        batch = collate_responses(prompt, responses[start : start + cfg.eval_batch_size], pad_id).to(device)
        out.extend(model.own_scores(batch, cfg.beta).float().tolist())
    return out


@torch.no_grad()
def own_pairs(model: FedPDPOModel, task: ClientTask, cfg: RunConfig, seed: int) -> OwnPairs:
    """:func:`sample_pairs`, each ordered so that the side the client's own score ranks higher is ``chosen``: its
    explicit reward ``r(x, y)``, or without a reward head the implicit reward (the same rule as best-of-N,
    :func:`fedpdpo.generate.own_score`), except that a fluent side beats a loop (:func:`loops`) whatever their
    scores; ties and pairs of two loops are dropped. Run under the caller's autocast, with the model's client
    modules loaded and in eval mode."""
    pairs = sample_pairs(model, task, cfg, seed)
    labelled: list[TokenizedPair] = []
    reference: list[torch.Tensor] = []
    gaps: list[float] = []
    agree = over_loops = 0
    for start in range(0, len(pairs), cfg.eval_batch_size):
        chunk = pairs[start : start + cfg.eval_batch_size]
        batch = collate(chunk, task.pad_id).to(next(model.parameters()).device)
        out = model(batch, with_reference=True)
        n = len(chunk)
        implicit = (out.logps.float() - out.ref_logps.float()).cpu()
        own = implicit if out.rewards is None else out.rewards.float().cpu()
        ref = out.ref_logps.float().cpu()
        for row, pair in enumerate(chunk):
            gap = float(own[row] - own[n + row])
            looped = (loops(pair.chosen_ids, cfg), loops(pair.rejected_ids, cfg))
            if gap == 0 or all(looped):
                continue
            first_wins = gap > 0 if looped[0] == looped[1] else looped[1]
            over_loops += int(any(looped))
            agree += int((implicit[row] > implicit[n + row]) == first_wins)
            gaps.append(abs(gap))
            chosen, rejected = (
                (pair.chosen_ids, pair.rejected_ids) if first_wins else (pair.rejected_ids, pair.chosen_ids)
            )
            labelled.append(TokenizedPair(len(labelled), pair.prompt_ids, chosen, rejected))
            sides = (ref[row], ref[n + row]) if first_wins else (ref[n + row], ref[row])
            reference.append(torch.stack(sides))
    metrics = {"online/pairs": float(len(labelled))}
    if labelled:
        metrics["online/score_gap"] = sum(gaps) / len(gaps)
        # how often the policy's implicit reward already orders its own samples as its reward head does
        metrics["online/implicit_agrees"] = agree / len(labelled)
        metrics["online/rejected_loops"] = over_loops / len(labelled)  # pairs whose rejected side is a loop
    table = torch.stack(reference) if reference else torch.empty((0, 2))
    return OwnPairs(labelled, table, metrics)
