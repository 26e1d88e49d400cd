"""``fedpdpo evaluate``: judge what a finished run's models generate, and the cross-client accuracy matrix."""

from __future__ import annotations

import argparse
import json
import math

from fedpdpo.errors import FedPDPOError


def register(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="sample each client's models, score them with an independent judge, and the cross-client matrix",
        description="For a finished run: responses sampled on each client's held-out prompts from its personalized "
        "policy, the global policy and the base model, scored by a judge the method did not train; and each "
        "client's model on every client's held-out pairs. Writes RUN/evaluation.json and adds both to "
        "RUN/summary.json (rendered by `fedpdpo report RUN`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ev.add_argument("--run", required=True, help="the --out directory of a finished `fedpdpo run`")
    ev.add_argument(
        "--judge",
        default="sentiment",
        help="'sentiment' (VADER polarity), a reward-model directory, or 'package.module:function' "
        "(f(prompts, responses) -> list of floats); see docs/evaluation.md",
    )
    ev.add_argument("--samples", type=int, default=48, help="responses per client and model (0: no judge)")
    ev.add_argument("--max-new-tokens", type=int, default=96, help="length of each sampled response")
    ev.add_argument("--temperature", type=float, default=0.7, help="sampling temperature")
    ev.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    ev.add_argument("--seed", type=int, default=0, help="sample k of every model uses seed + k")
    ev.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty for every model's samples (1: off; 1.2 is a common choice)",
    )
    ev.add_argument(
        "--best-of",
        type=int,
        default=8,
        help="N > 1: also judge, per sample, the best of N personalized samples by the client's own reward head "
        "(its explicit reward), the 'best_of' row; 1: no such row",
    )
    ev.add_argument(
        "--realign",
        type=float,
        default=1.0,
        help="L != 1: also judge personalized samples drawn from pi_ref^(1-L) * pi^L token by token (decoding-time "
        "realignment: about the policy trained at beta / L), the 'realigned' row; 1: no such row",
    )
    ev.add_argument("--no-matrix", action="store_true", help="skip the cross-client accuracy matrix")
    ev.set_defaults(func=cmd_evaluate)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fedpdpo.evaluation import EvaluationSettings, evaluate_run

    if args.samples < 0 or args.max_new_tokens < 1 or args.best_of < 1:
        raise FedPDPOError("--samples must be >= 0, --max-new-tokens >= 1 and --best-of >= 1")
    if not 0.0 < args.top_p <= 1.0 or args.temperature < 0 or not args.repetition_penalty > 0:
        raise FedPDPOError("--top-p must be in (0, 1], --temperature >= 0 and --repetition-penalty > 0")
    if not 0 <= args.realign < math.inf:
        raise FedPDPOError(f"--realign must be a finite number >= 0 (1: no 'realigned' row), got {args.realign}")
    settings = EvaluationSettings(
        judge=args.judge,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
        best_of=args.best_of,
        realign=args.realign,
        matrix=not args.no_matrix,
    )
    print(json.dumps(brief(evaluate_run(args.run, settings))))
    return 0


def brief(result: dict) -> dict:
    """What the command prints of an evaluation: the matrix's summary numbers and the judge table's rows."""
    out: dict = {}
    if "cross_client" in result:
        m = result["cross_client"]
        out["cross_client"] = {k: m[k] for k in ("own_mean", "others_mean", "worst_client", "spread")}
    if "judge" in result:
        out["judge"] = [
            {k: v for k, v in row.items() if k != "examples" and not k.endswith("mean_score")}
            for row in result["judge"]["clients"]
        ]
    return out
