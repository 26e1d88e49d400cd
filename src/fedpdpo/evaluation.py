"""After a run: how each client's model behaves (an independent judge) and whom it serves (cross-client accuracy).

``fedpdpo evaluate --run DIR`` rebuilds the run's clients from its config (same data, same seed, same per-client
limits), its final global tensors and each client's private state, and computes:

* **cross-client accuracy**: client *i*'s model on client *j*'s held-out pairs, ranked by *i*'s own score. The
  diagonal is each client's accuracy; the off-diagonal shows what personalization is (a client with the opposite
  taste is *wrong* on the others' pairs). Summaries: mean of the diagonal, worst client, spread (max - min).
* **judge**: responses sampled on each client's held-out prompts from its personalized policy, the global policy
  (shared LoRA, original head) and the base model, scored by a judge the method did not train
  (:mod:`fedpdpo.judge`). Which side a client prefers is read off the judge's scores of its own training pairs
  (chosen minus rejected), so the table says, per client and model, the mean judge score oriented to the client's
  taste, the share of samples on the client's side (for judges where 0 is neutral), the win rate of each
  model's samples against the base model's, and each model's oriented mean minus the base model's with the
  standard error of that paired difference (so that a lean can be told from sampling noise).

Both go into ``DIR/evaluation.json`` and into ``summary.json`` (keys ``cross_client`` and ``judge``), which
``fedpdpo report`` renders. The client data must be readable where this runs (simulation runs, or a node's own
files).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file

from fedpdpo.client.selection import load_final
from fedpdpo.client.state import ClientState, ClientStore, atomic_write
from fedpdpo.client.trainer import SCORES, autocast, evaluate, load_client
from fedpdpo.config import load_config
from fedpdpo.data.formats import flat
from fedpdpo.data.tokenize import PairTokenizer
from fedpdpo.engines.checkpoint import CLIENTS_DIR
from fedpdpo.engines.server import GLOBAL_FILE
from fedpdpo.engines.setup import RunSetup, build_setup
from fedpdpo.errors import FedPDPOError
from fedpdpo.generate import own_scores
from fedpdpo.judge import Judge, load_judge
from fedpdpo.sampling import SamplingConfig, Variant, repeated_ngrams, sample_batch
from fedpdpo.timing import phase

log = logging.getLogger(__name__)

EVALUATION_FILE = "evaluation.json"
MODELS: tuple[Variant, ...] = ("personalized", "global", "base")
BEST_OF = "best_of"
REALIGNED = "realigned"


@dataclass
class EvaluationSettings:
    judge: str = "sentiment"
    # responses per client and model: 48, because with 16 the standard error of a lean (0.19-0.26 on the demo's
    # sentiment scores) is as large as the leans themselves (docs/evaluation.md)
    samples: int = 48
    max_new_tokens: int = 96
    temperature: float = 0.7
    top_p: float = 0.9
    seed: int = 0
    repetition_penalty: float = 1.0  # transformers' rule, the same for every model (1 = off)
    # > 1: also a "best_of" model: per slot, the personalized sample the client's own score ranks first among
    # best_of candidates (the slot's personalized sample and best_of - 1 more from the same model)
    best_of: int = 8
    # != 1: also a "realigned" model: personalized samples drawn from pi_ref^(1 - realign) * pi^realign
    # (decoding-time realignment, fedpdpo.sampling.realigned). Off by default: at 2 it amplified the personalized
    # policies' loops more than their lean on the demo (docs/results.md, 6 December)
    realign: float = 1.0
    matrix: bool = True
    direction_pairs: int = 64  # training pairs per client from which its preferred side is read


def load_run(run_dir: str | Path) -> tuple[RunSetup, dict[str, torch.Tensor], ClientStore]:
    """A finished run's setup (config, data, model), its final global tensors and its clients' private states."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").is_file():
        raise FedPDPOError(f"--run {run_dir}: no config.toml here; point --run at the --out directory of a run")
    if not (run_dir / GLOBAL_FILE).is_file():
        raise FedPDPOError(f"--run {run_dir}: no {GLOBAL_FILE}; the run has not finished")
    setup = build_setup(load_config(run_dir / "config.toml"))
    store = ClientStore(run_dir / CLIENTS_DIR, bases=setup.model.delta_bases())
    return setup, load_file(run_dir / GLOBAL_FILE), store


def cross_client_matrix(
    setup: RunSetup, global_: dict[str, torch.Tensor], store: ClientStore, chosen: dict[int, str] | None = None
) -> dict[str, Any]:
    """``accuracy[i][j]``: client i's model on client j's test pairs, ranked by the score client i chose on its own
    validation pairs (and by the implicit reward). ``chosen``: that score per client as the run recorded it
    (summary.json); a client missing there chooses again on its validation pairs, which costs an evaluation of
    them and of the global policy. Every cell, the diagonal included, is computed from the stored model."""
    ids = [t.client_id for t in setup.tasks]
    finals = {i: load_final(store, i, global_) for i in ids}  # kept round's (select_round), else final global
    chosen = dict(chosen or {})
    acc, implicit = [], []
    for i in ids:
        mine, shared = finals[i]
        own = None
        if i not in chosen:
            own = evaluate(setup.model, setup.tasks[i], mine, shared, setup.initial, setup.cfg)
            chosen[i] = SCORES[int(own["selected_score"])]
        row, row_implicit = [], []
        for j in ids:
            if j == i and own is not None:  # its own test pairs, ranked by the score it chose: measured just above
                metrics = own
            else:
                state = ClientState(local=mine.local, reference=finals[j][0].reference)
                test_only = dataclasses.replace(setup.tasks[j], val=[])  # i's choice is made; j's val unused
                with_global = chosen[i] == "global"  # the global policy's margins only where they are the score
                metrics = evaluate(
                    setup.model, test_only, state, shared, setup.initial, setup.cfg, chosen[i], with_global
                )
            row.append(round(metrics["accuracy"], 4))
            row_implicit.append(round(metrics["accuracy_implicit"], 4))
        acc.append(row)
        implicit.append(row_implicit)
    diagonal = [acc[k][k] for k in range(len(ids))]
    off = [acc[i][j] for i in range(len(ids)) for j in range(len(ids)) if i != j]
    return {
        "clients": ids,
        "conflict": [bool(setup.clients[i].conflict) for i in ids],
        "accuracy": acc,
        "accuracy_implicit": implicit,
        "own_mean": round(float(np.mean(diagonal)), 4),
        "others_mean": round(float(np.mean(off)), 4) if off else None,
        "worst_client": round(float(min(diagonal)), 4),
        "spread": round(float(max(diagonal) - min(diagonal)), 4),
    }


def _recorded_scores(summary: dict[str, Any] | None) -> dict[int, str]:
    """The score each client ranks by, as its run chose it on the client's validation pairs (from the run's
    summary.json; {} without one)."""
    clients = (summary or {}).get("clients", [])
    return {int(c["id"]): str(c["selected_score"]) for c in clients if c.get("selected_score") in SCORES}


def direction(judge: Judge, setup: RunSetup, cid: int, n: int) -> tuple[float, float]:
    """(sign, size) of the judge's mean chosen-minus-rejected score on the client's training pairs."""
    records = setup.clients[cid].train[:n]
    prompts = [flat(r.prompt) for r in records]
    diff = float(
        np.mean(judge(prompts, [r.chosen for r in records])) - np.mean(judge(prompts, [r.rejected for r in records]))
    )
    return (float(np.sign(diff)), diff)


def repeated_trigrams(text: str) -> float:
    """Share of the word trigrams of ``text`` that already occurred earlier in it (:func:`repeated_ngrams`). A judge
    scores a loop as neutral, so a model whose samples repeat can look as if it had no lean; the judge table
    reports this next to the scores."""
    return repeated_ngrams(text.split())


def difference_to_base(oriented: np.ndarray, base: np.ndarray) -> tuple[float, float | None]:
    """Mean of ``oriented`` minus mean of ``base`` and the standard error of that difference, *paired*: sample
    ``i`` of both models answers the same prompt with the same random stream (:func:`_prompts`, one generator per
    slot), so the error is that of the mean of the per-sample differences, ``sd(a_i - b_i) / sqrt(n)``. How
    positive a prompt's continuations are varies a lot from prompt to prompt; pairing takes that variance out,
    where two independent samples' error (``sqrt(var_a / n + var_b / n)``) would count it. None with fewer than 2
    pairs."""
    if oriented.shape != base.shape:
        raise ValueError(f"paired samples expected, got {oriented.shape} and {base.shape}")
    diff = float(oriented.mean() - base.mean())
    if len(oriented) < 2:
        return diff, None
    return diff, float((oriented - base).std(ddof=1) / np.sqrt(len(oriented)))


def _prompts(setup: RunSetup, cid: int, k: int) -> list[tuple[Any, int]]:
    """``k`` (prompt, sample index) slots over the client's distinct held-out prompts, in order of first use."""
    distinct = list(dict.fromkeys(r.prompt for r in setup.clients[cid].test))
    return [(distinct[s % len(distinct)], s // len(distinct)) for s in range(k)]


def own_reward(setup: RunSetup, pair_tok: PairTokenizer, prompt: Any, texts: list[str]) -> np.ndarray:
    """The client's own score (:func:`~fedpdpo.generate.own_score`) of each response to ``prompt``, its modules
    loaded in ``setup.model``."""
    cfg = setup.cfg
    with autocast(cfg, setup.model):
        return np.asarray(own_scores(setup.model, pair_tok, cfg.beta, prompt, texts, cfg.eval_batch_size))


def best_of_texts(
    setup: RunSetup, pair_tok: PairTokenizer, prompt: Any, candidates: list[str], count: int, n: int
) -> list[str]:
    """Slot ``k``'s pick among candidates ``k, k + count, ..., k + (n - 1) * count``: candidate ``j`` of slot ``k``
    was drawn with seed ``seed + j * count + k`` (candidate 0 is the plain personalized sample of the slot)."""
    rewards = own_reward(setup, pair_tok, prompt, candidates).reshape(n, count)
    return [candidates[int(rewards[:, k].argmax()) * count + k] for k in range(count)]


def judge_clients(
    setup: RunSetup, global_: dict[str, torch.Tensor], store: ClientStore, settings: EvaluationSettings
) -> dict[str, Any]:
    """Judge table: per client and model, oriented mean score, share on the client's side, win rate vs base."""
    judge = load_judge(settings.judge)
    model = setup.model
    sampling = SamplingConfig(
        settings.max_new_tokens, settings.temperature, settings.top_p, settings.seed, settings.repetition_penalty
    )
    sampled: dict[tuple, list[str]] = {}  # (model, client for personalized, prompt key) -> texts (global/base shared)
    models: tuple[str, ...] = (
        MODELS + ((BEST_OF,) if settings.best_of > 1 else ()) + ((REALIGNED,) if settings.realign != 1 else ())
    )
    realign = dataclasses.replace(sampling, realign=settings.realign)
    rows = []
    for task in setup.tasks:
        cid = task.client_id
        lengths = task.lengths
        assert lengths is not None
        pair_tok = PairTokenizer(setup.tokenizer, lengths.max_length, lengths.max_prompt_length)
        slots = _prompts(setup, cid, settings.samples)
        by_prompt: dict[Any, int] = {}
        for prompt, _ in slots:
            by_prompt[prompt] = by_prompt.get(prompt, 0) + 1
        state, own_shared = load_final(store, cid, global_)
        texts: dict[str, list[str]] = {}
        for name in models:
            variant: Variant = "personalized" if name in (BEST_OF, REALIGNED) else name  # type: ignore[assignment]
            personal = variant == "personalized"
            how = realign if name == REALIGNED else sampling
            load_client(model, own_shared if personal else global_, state, setup.initial, personal=personal)
            owner = cid if personal else None
            keys = {
                p: (variant, how.realign, owner, tuple(pair_tok.prompt_ids(p)), count) for p, count in by_prompt.items()
            }
            # what this model has not sampled yet, every prompt in one batched call; personalized: best-of's
            # candidates with it (a prompt's rows count.. are its (best_of - 1) more)
            per_slot = settings.best_of if personal and BEST_OF in models and name != REALIGNED else 1
            todo = {key: key[-1] * per_slot for key in keys.values() if key not in sampled}  # key -> rows to draw
            if todo:
                prompt_rows = [list(key[3]) for key, n_rows in todo.items() for _ in range(n_rows)]
                seeds = [how.seed + r for n_rows in todo.values() for r in range(n_rows)]
                with autocast(setup.cfg, model):  # the run's precision, as in training
                    drawn = sample_batch(model, prompt_rows, seeds, variant, how, pair_tok.stop_ids)
                texts_drawn = iter(setup.tokenizer.decode(x, skip_special_tokens=True) for x in drawn)
                for key, n_rows in todo.items():
                    sampled[key] = [next(texts_drawn) for _ in range(n_rows)]
            out: list[str] = []
            for prompt, count in by_prompt.items():
                if name == BEST_OF:
                    out.extend(best_of_texts(setup, pair_tok, prompt, sampled[keys[prompt]], count, settings.best_of))
                else:
                    out.extend(sampled[keys[prompt]][:count])
            texts[name] = out
        prompts = [flat(p) for p, count in by_prompt.items() for _ in range(count)]
        sign, diff = direction(judge, setup, cid, settings.direction_pairs)
        scores = {v: np.asarray(judge(prompts, texts[v])) for v in models}
        row: dict[str, Any] = {
            "client": cid,
            "conflict": bool(setup.clients[cid].conflict),
            "preferred_direction": int(sign),
            "train_margin": round(diff, 4),
            "samples": len(prompts),
        }
        base = sign * scores["base"]
        for v in models:
            oriented = sign * scores[v]
            row[f"{v}/mean_score"] = round(float(scores[v].mean()), 4)
            row[f"{v}/oriented_score"] = round(float(oriented.mean()), 4)
            if judge.zero_is_neutral:
                row[f"{v}/match"] = round(float((oriented > 0).mean()), 4)
            wins = (oriented[:, None] > base[None, :]).mean() + 0.5 * (oriented[:, None] == base[None, :]).mean()
            row[f"{v}/win_rate_vs_base"] = round(float(wins), 4)
            row[f"{v}/repeated_trigrams"] = round(float(np.mean([repeated_trigrams(t) for t in texts[v]])), 4)
            if v != "base":
                diff, se = difference_to_base(oriented, base)
                row[f"{v}/vs_base"] = round(diff, 4)
                row[f"{v}/vs_base_se"] = None if se is None else round(se, 4)
        row["examples"] = {v: texts[v][:2] for v in models}
        rows.append(row)
        log.info(
            "client %d (prefers %s): %s (oriented judge score)",
            cid,
            {1: "higher", -1: "lower", 0: "neither"}[int(sign)],
            ", ".join(f"{v} {row[f'{v}/oriented_score']:.2f}" for v in models),
        )
    return {
        "judge": judge.name,
        "zero_is_neutral": judge.zero_is_neutral,
        "models": list(models),
        "settings": asdict(settings),
        "clients": rows,
    }


def evaluate_run(run_dir: str | Path, settings: EvaluationSettings | None = None) -> dict[str, Any]:
    """Cross-client matrix and judge table of a finished run; written to evaluation.json and summary.json."""
    settings = settings or EvaluationSettings()
    run_dir = Path(run_dir).resolve()
    setup, global_, store = load_run(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else None
    result: dict[str, Any] = {}
    if settings.matrix:
        with phase("cross-client matrix"):
            result["cross_client"] = cross_client_matrix(setup, global_, store, _recorded_scores(summary))
    if settings.samples > 0:
        with phase("judge"):
            result["judge"] = judge_clients(setup, global_, store, settings)
    # a part this call skipped (--no-matrix, --samples 0) keeps what an earlier call measured
    path = run_dir / EVALUATION_FILE
    merged = (json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}) | result
    text = json.dumps(merged, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda p: Path(p).write_text(text, encoding="utf-8"))
    if summary is not None:
        summary.update(merged)  # the judge's settings too: the report says what its extra rows are
        body = json.dumps(summary, indent=2, allow_nan=False) + "\n"
        atomic_write(summary_path, lambda p: Path(p).write_text(body, encoding="utf-8"))
    return result
