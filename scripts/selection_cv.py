"""Which rule should a client use to choose its score (and round) on its own validation pairs? Measured on the
validation pairs alone, by cross-fitting (docs/results.md, "Choosing the score on few validation pairs").

``record`` runs one federated job in process (exactly ``fedpdpo run``) and saves every client's per-pair margins,
for each score and round, on its validation *and* test pairs (``margins.json`` next to the run). ``analyse`` then
replays the selection (the score rule, then ``best_val``'s round rule with it) under several score rules:

* cross-fitted on the validation pairs only: each client's validation pairs are split at random into a half that
  chooses (score and round) and a half that scores the choice; averaged over many splits and all clients. This is
  the figure a rule is chosen by: it never looks at a test pair.
* on the test pairs (the whole validation split chooses), reported next to it, never used to choose.

    python scripts/selection_cv.py record --config configs/demo.toml --out /tmp/sel/demo-s0 --set seed=0
    python scripts/selection_cv.py analyse /tmp/sel/demo-s0 /tmp/sel/tqa-s0 --splits 400 --json s0.json
    python scripts/selection_cv.py pool s0.json s1.json   # the clients of several analyses together
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

from fedpdpo.client.selection import below, validation_accuracy
from fedpdpo.client.trainer import SCORES, _choose
from fedpdpo.errors import FedPDPOError
from fedpdpo.losses import pairwise_accuracy

MARGINS_FILE = "margins.json"
#: round -> split ("val", "test") -> score -> per-pair margins (chosen minus rejected), one client
Rounds = dict[int, dict[str, dict[str, torch.Tensor]]]
#: Which validation pairs a rule may look at (indices into a client's validation split).
Pairs = torch.Tensor
Rule = Callable[[dict[str, torch.Tensor]], str]


def record(config: Path, out: Path, overrides: list[str]) -> None:
    """Run the job and save each client's margins per round (a wrapper around the in-process engine's evaluation)."""
    import fedpdpo.client.trainer as trainer
    import fedpdpo.engines.inprocess as inprocess
    from fedpdpo.config import load_config

    captured: list[dict[str, list[float]]] = []
    score_split = trainer._score_split

    def capture(*args: Any, **kwargs: Any) -> Any:
        result = score_split(*args, **kwargs)
        captured.append({k: v.tolist() for k, v in result.margins.items()})
        return result

    trainer._score_split = capture  # evaluate() looks it up at call time
    margins: dict[int, dict[int, dict[str, dict[str, list[float]]]]] = {}
    engine_evaluate = inprocess.InProcessTransport.evaluate

    def evaluate_round(self: Any, server_round: int, client_ids: list[int], shared: Any) -> Any:
        original = inprocess.evaluate

        def per_client(model: Any, task: Any, *args: Any, **kwargs: Any) -> Any:
            captured.clear()
            metrics = original(model, task, *args, **kwargs)
            splits = ("test", "val") if task.val else ("test",)  # evaluate()'s order
            margins.setdefault(task.client_id, {})[server_round] = dict(zip(splits, captured, strict=True))
            return metrics

        inprocess.evaluate = per_client
        try:
            return engine_evaluate(self, server_round, client_ids, shared)
        finally:
            inprocess.evaluate = original

    inprocess.InProcessTransport.evaluate = evaluate_round
    try:
        inprocess.run_inprocess(load_config(config, overrides), out, quiet=True, overwrite=True)
    finally:  # the library as it was, for whatever runs next in this process
        inprocess.InProcessTransport.evaluate = engine_evaluate
        trainer._score_split = score_split
    (out / MARGINS_FILE).write_text(json.dumps({str(c): r for c, r in margins.items()}), encoding="utf-8")


def accuracy(margins: torch.Tensor, idx: Pairs | None = None) -> float:
    """Pairwise accuracy of ``margins`` over the pairs ``idx`` (all without)."""
    return pairwise_accuracy(margins if idx is None else margins[idx]).item()


def argmax_rule(val: dict[str, torch.Tensor]) -> str:
    """The rule before ``method.switch_z``: the most accurate candidate, ties to the earlier of SCORES."""
    names = [s for s in SCORES if s in val]
    return max(names, key=lambda s: (accuracy(val[s]), -SCORES.index(s)))


def guarded_rule(z: float) -> Rule:
    """The library's rule (``fedpdpo.client.trainer._choose``) with ``method.switch_z = z``: the client's own score
    unless another beats it by more than ``z`` paired standard errors on these pairs."""
    return lambda val: _choose(val, "auto", z)


def fixed_rule(name: str) -> Rule:
    return lambda val: name if name in val else "implicit"


RULES: dict[str, Rule] = {
    "old: most accurate": argmax_rule,
    "guarded z>0": guarded_rule(0.0),
    "guarded z>1": guarded_rule(1.0),
    "guarded z>1.645": guarded_rule(1.645),
    "combined": fixed_rule("combined"),
    "explicit": fixed_rule("explicit"),
    "implicit": fixed_rule("implicit"),
}
#: Rules whose round is the one where the policy's implicit accuracy is best (not the mean with the chosen score's).
BY_IMPLICIT = {"guarded z>1, round by implicit": guarded_rule(1.0)}


def select(rounds: Rounds, rule: Rule, idx: Pairs, by_implicit: bool = False) -> tuple[int, str]:
    """``best_val`` with ``rule``, as the library keeps a round (:func:`validation_accuracy`, ties to the later
    round) on the validation pairs ``idx``; ``by_implicit``: the round judged by the implicit accuracy alone."""
    best: tuple[float, int, str] | None = None
    for r in sorted(rounds):
        if r < 1:
            continue
        val = {name: m[idx] for name, m in rounds[r]["val"].items()}
        score = rule(val)
        judged = "implicit" if by_implicit else score
        value = validation_accuracy(
            {
                "selected_score": SCORES.index(judged),
                f"val/accuracy_{judged}": accuracy(val[judged]),
                "val/accuracy_implicit": accuracy(val["implicit"]),
            }
        )
        assert value is not None
        if best is None or not below(value, best[0]):
            best = (value, r, score)
    assert best is not None
    return best[1], best[2]


def load(run: Path) -> dict[str, Rounds]:
    """A recorded run's margins, per client (``"<run>/<id>"``), as tensors."""
    path = run / MARGINS_FILE
    if not path.is_file():
        _fail(f"{path}: no such file (not a run recorded with `selection_cv.py record`)")
    raw = _read_json(path)
    return {
        f"{run.name}/{cid}": {
            int(r): {split: {name: torch.tensor(m) for name, m in scores.items()} for split, scores in splits.items()}
            for r, splits in rounds.items()
        }
        for cid, rounds in raw.items()
    }


def analyse(runs: list[Path], splits: int, seed: int) -> dict[str, Any]:
    """Every rule on every client of ``runs``: cross-fitted on its validation pairs (the same ``splits`` random
    halvings for every rule) and on its test pairs; differences to the old rule with their standard error over
    clients (the independent units)."""
    clients = [client for run in runs for client in load(run).items()]
    rng = random.Random(seed)
    halvings = []
    for _, rounds in clients:
        n = len(rounds[1]["val"]["implicit"])
        orders = [torch.tensor(rng.sample(range(n), n)) for _ in range(splits)]
        halvings.append([(o[: n // 2], o[n // 2 :]) for o in orders])
    table: dict[str, dict[str, Any]] = {}
    for name, rule in (RULES | BY_IMPLICIT).items():
        by_implicit = name in BY_IMPLICIT
        cross, cross_implicit, test, implicit, chosen = [], [], [], [], []
        for (_, rounds), halves in zip(clients, halvings, strict=True):
            per_split, per_split_implicit = [], []
            for a, b in halves:
                r, score = select(rounds, rule, a, by_implicit)
                per_split.append(accuracy(rounds[r]["val"][score], b))
                per_split_implicit.append(accuracy(rounds[r]["val"]["implicit"], b))
            cross.append(sum(per_split) / len(per_split))
            cross_implicit.append(sum(per_split_implicit) / len(per_split_implicit))
            r, score = select(rounds, rule, whole(rounds), by_implicit)
            test.append(accuracy(rounds[r]["test"][score]))
            implicit.append(accuracy(rounds[r]["test"]["implicit"]))
            chosen.append(f"{score}@{r}")
        table[name] = {
            "cross_fit_val": cross,
            "cross_fit_implicit": cross_implicit,
            "test": test,
            "test_implicit": implicit,
            "chosen": chosen,
        }
    policy = {
        f"z>{z:g}": _policy_row(clients, halvings, z)
        for z in POLICY_Z
        if any("global" in rounds[1]["val"] for _, rounds in clients)
    }
    return {"clients": [c for c, _ in clients], "splits": splits, "rules": _summarise(table), "policy": policy}


#: Per-client lists of a rule's row; everything else in a row is computed from them by :func:`_summarise`.
PER_CLIENT = ("cross_fit_val", "cross_fit_implicit", "test", "test_implicit", "chosen")
#: Rule names of analyses written before the rule of 7 December 2026 was the library's.
LEGACY_NAMES = {"argmax (today)": "old: most accurate"}


def _summarise(table: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each rule's means over clients, and its paired differences to the old rule with their standard error over
    clients (the independent units)."""
    base = table["old: most accurate"]
    out = {}
    for name, row in table.items():
        row = {key: row[key] for key in PER_CLIENT}
        for key in ("cross_fit_val", "cross_fit_implicit", "test"):
            diff = [x - y for x, y in zip(row[key], base[key], strict=True)]
            row[f"{key}_mean"] = sum(row[key]) / len(row[key])
            row[f"{key}_vs_old"] = (sum(diff) / len(diff), _se(diff))
        row["test_implicit_mean"] = sum(row["test_implicit"]) / len(row["test_implicit"])
        out[name] = row
    return out


def pool(paths: list[Path]) -> dict[str, Any]:
    """Several ``analyse --json`` outputs as one analysis of all their clients: the per-client figures side by side
    (each client cross-fitted with its own analysis's splits), means and differences over all of them; the policy
    rows are the client-weighted means of each file's."""
    parts = [_read_json(path) for path in paths]
    try:
        rules = [{LEGACY_NAMES.get(name, name): row for name, row in part["rules"].items()} for part in parts]
        names = [name for name in rules[0] if all(name in r for r in rules)]
        table = {name: {key: [x for r in rules for x in r[name][key]] for key in PER_CLIENT} for name in names}
        sizes = [len(part["clients"]) for part in parts]
        policy = {
            z: {
                key: sum(n * part["policy"][z][key] for n, part in zip(sizes, parts, strict=True)) / sum(sizes)
                for key in ("cross_fit_val", "test")
            }
            for z in parts[0]["policy"]
            if all(z in part["policy"] for part in parts)
        }
        clients = [c for part in parts for c in part["clients"]]
        return {"clients": clients, "splits": parts[0]["splits"], "rules": _summarise(table), "policy": policy}
    # a field missing, of another type, or lists that do not match: the file was not written by `analyse`
    except (LookupError, TypeError, AttributeError, ValueError, ZeroDivisionError) as err:
        what = f"no field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
        _fail(f"{', '.join(map(str, paths))}: not the output of `selection_cv.py analyse --json` ({what})")


POLICY_Z = (0.0, 1.0, 1.645)


def _policy_row(clients: list[tuple[str, Rounds]], halvings: list[Any], z: float) -> dict[str, float]:
    """The policy a client generates with (its own or the global one, by their implicit accuracy; the library's
    rule with ``switch_z = z``, at the round the same rule keeps): its implicit accuracy, cross-fitted and on test."""
    rule = guarded_rule(z)
    cross, test = [], []

    def pick(rounds: Rounds, idx: Pairs) -> tuple[int, str]:
        r, _ = select(rounds, rule, idx)
        return r, rule({k: v[idx] for k, v in rounds[r]["val"].items() if k in ("implicit", "global")})

    for (_, rounds), halves in zip(clients, halvings, strict=True):
        per_split = []
        for a, b in halves:
            r, name = pick(rounds, a)
            per_split.append(accuracy(rounds[r]["val"][name], b))
        cross.append(sum(per_split) / len(per_split))
        r, name = pick(rounds, whole(rounds))
        test.append(accuracy(rounds[r]["test"][name]))
    return {"cross_fit_val": sum(cross) / len(cross), "test": sum(test) / len(test)}


def whole(rounds: Rounds) -> Pairs:
    """All of a client's validation pairs."""
    return torch.arange(len(rounds[1]["val"]["implicit"]))


def _se(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def _read_json(path: Path) -> Any:
    """A JSON file, or one line saying why it cannot be read (exit code 2)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        _fail(f"{path}: cannot read ({err.strerror})")
    except json.JSONDecodeError as err:
        _fail(f"{path}:{err.lineno}: not JSON ({err.msg})")


def _fail(message: str) -> NoReturn:
    """Bad input: one line on stderr, exit code 2 (as the CLI)."""
    print(f"selection_cv: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("--config", type=Path, required=True)
    rec.add_argument("--out", type=Path, required=True)
    rec.add_argument("--set", action="append", default=[], dest="overrides")
    ana = sub.add_parser("analyse")
    ana.add_argument("runs", type=Path, nargs="+")
    ana.add_argument("--splits", type=int, default=400)
    ana.add_argument("--seed", type=int, default=0)
    ana.add_argument("--json", type=Path)
    poo = sub.add_parser("pool", help="several `analyse --json` outputs as one analysis of all their clients")
    poo.add_argument("analyses", type=Path, nargs="+")
    poo.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.command == "record":
        try:
            record(args.config, args.out, args.overrides)
        except FedPDPOError as exc:  # a bad config or data file, as `fedpdpo run` reports it
            _fail(str(exc))
        return
    result = analyse(args.runs, args.splits, args.seed) if args.command == "analyse" else pool(args.analyses)
    print(f"{len(result['clients'])} clients; cross-fit: half the validation pairs choose, the other half score")
    print(
        f"{'rule':<30} {'cross-fit val':>14} {'vs old':>16} {'test':>7} {'vs old':>16} {'implicit':>8}"
        f" {'cv impl.':>8}  chosen (score@round)"
    )
    for name, row in result["rules"].items():
        cv, cv_se = row["cross_fit_val_vs_old"]
        t, t_se = row["test_vs_old"]
        print(
            f"{name:<30} {100 * row['cross_fit_val_mean']:>13.1f}% {100 * cv:>+8.1f} +- {100 * cv_se:<4.1f}"
            f" {100 * row['test_mean']:>6.1f}% {100 * t:>+8.1f} +- {100 * t_se:<4.1f}"
            f" {100 * row['test_implicit_mean']:>7.1f}% {100 * row['cross_fit_implicit_mean']:>7.1f}%"
            f"  {' '.join(row['chosen'])}"
        )
    for name, row in result["policy"].items():
        print(
            f"policy to generate with, {name}: cross-fit {100 * row['cross_fit_val']:.1f} %,"
            f" test {100 * row['test']:.1f} %"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
