"""``fedpdpo generate`` and ``fedpdpo score``: try a client's personalized model."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from rich.markup import escape
from rich.text import Text

from fedpdpo.errors import FedPDPOError
from fedpdpo.jsonio import dumps

log = logging.getLogger(__name__)


def _add_source(parser: argparse.ArgumentParser) -> None:
    src = parser.add_argument_group("model (a run and a client, or an export directory)")
    src.add_argument("--run", help="the --out directory of a finished `fedpdpo run`")
    src.add_argument("--client", type=int, help="client id (0-based), with --run")
    src.add_argument("--from", dest="from_dir", metavar="ADIR", help="a directory written by `fedpdpo export`")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of tables")


def register(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser(
        "generate",
        help="sample from a client's personalized model",
        description="Sample responses from a client's personalized model (decoder + shared LoRA -> adapter -> "
        "personalized head), optionally next to the global model (shared LoRA, original head) and the base model.",
    )
    _add_source(gen)
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    prompts.add_argument("--prompts", metavar="FILE", help="prompts: one per line, or JSONL with a 'prompt' field")
    # the defaults of fedpdpo.sampling.SamplingConfig, spelled here so that --help needs no torch import
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens to sample per response at most (default: %(default)s)"
    )
    gen.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (default: %(default)s)")
    gen.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    gen.add_argument(
        "--seed", type=int, default=0, help="sampling seed, the same for every model compared (default: %(default)s)"
    )
    gen.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="transformers' repetition penalty, 1 = off (default: %(default)s)",
    )
    gen.add_argument(
        "--realign",
        type=float,
        default=1.0,
        help="decoding-time realignment: sample from pi_ref^(1-L) * pi^L token by token; 1 = the policy as trained, "
        "2 = about the policy trained at beta / 2, 0 = the reference (default: %(default)s)",
    )
    gen.add_argument(
        "--best-of",
        type=int,
        default=1,
        help="sample N personalized responses and print the one the client's own reward head ranks first "
        "(default: %(default)s)",
    )
    gen.add_argument("--with-global", action="store_true", help="also answer with the global model")
    gen.add_argument("--with-base", action="store_true", help="also answer with the base (reference) model")
    gen.set_defaults(func=cmd_generate)

    score = sub.add_parser(
        "score",
        help="implicit and explicit rewards of responses under a client's model",
        description="Score responses with the client's model: the implicit DPO reward beta * (log pi - log pi_ref) "
        "and the explicit reward head r(x, y). With --pairs, score chosen and rejected of each preference pair.",
    )
    _add_source(score)
    score.add_argument("--prompt", help="the prompt the responses answer")
    score.add_argument("--response", action="append", help="a response to score (repeatable)")
    score.add_argument("--pairs", metavar="FILE", help="preference pairs (JSONL/parquet) to score instead")
    score.add_argument(
        "--limit",
        type=int,
        default=20,
        help="with --pairs: score at most this many pairs, 0 = all (default: %(default)s)",
    )
    score.add_argument(
        "--on-bad-record",
        choices=["error", "skip"],
        default="error",
        help="with --pairs: what to do with bad pairs (default: %(default)s)",
    )
    score.set_defaults(func=cmd_score)


def load_client_model(args: argparse.Namespace):
    from fedpdpo.export import load_from_run, load_personalized

    if args.from_dir and (args.run or args.client is not None):
        raise FedPDPOError("give either --from ADIR or --run DIR --client ID, not both")
    if args.from_dir:
        cm = load_personalized(args.from_dir)
    elif args.run and args.client is not None:
        cm = load_from_run(args.run, args.client)
    else:
        raise FedPDPOError("which model? give --run DIR --client ID, or --from ADIR (a `fedpdpo export` directory)")
    import torch

    if torch.cuda.is_available():
        cm.model.to("cuda")
    return cm


def read_prompts(path: str) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FedPDPOError(f"--prompts {path}: no such file")
    try:
        text = file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FedPDPOError(f"--prompts {path}: not valid UTF-8 (byte {exc.start}); re-encode it as UTF-8") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise FedPDPOError(f"--prompts {path}: the file holds no prompts")
    if file.suffix != ".jsonl":
        return lines
    prompts = []
    for i, line in enumerate(lines, start=1):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FedPDPOError(f"{path}:{i}: malformed JSON: {exc.msg}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not obj["prompt"].strip():
            raise FedPDPOError(f"{path}:{i}: expected an object with a non-empty string field 'prompt'")
        prompts.append(obj["prompt"])
    return prompts


def _check_texts(flag: str, texts: list[str]) -> None:
    """Empty text has no tokens to condition on or to score; say so instead of failing inside the model."""
    for text in texts:
        if not text.strip():
            raise FedPDPOError(f"{flag} is empty; give the text itself")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise FedPDPOError(f"{flag} holds a character that is not valid Unicode (a lone surrogate)") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.panel import Panel

    from fedpdpo.generate import generate, generate_best_of
    from fedpdpo.sampling import VARIANTS, SamplingConfig

    prompts = args.prompt or read_prompts(args.prompts)
    _check_texts("--prompt", prompts)
    if args.max_new_tokens <= 0 or not 0 < args.top_p <= 1 or not 0 <= args.temperature < math.inf:
        raise FedPDPOError("need --max-new-tokens > 0, 0 < --top-p <= 1 and a finite --temperature >= 0")
    if not 0 < args.repetition_penalty < math.inf:
        raise FedPDPOError("need a finite --repetition-penalty > 0 (1 = off)")
    if args.best_of < 1:
        raise FedPDPOError("need --best-of >= 1")
    if not 0 <= args.realign < math.inf:
        raise FedPDPOError(f"need a finite --realign >= 0 (1 = the policy as trained), got {args.realign}")
    sampling = SamplingConfig(
        args.max_new_tokens, args.temperature, args.top_p, args.seed, args.repetition_penalty, args.realign
    )
    wanted = {"personalized": True, "global": args.with_global, "base": args.with_base}
    variants = [v for v in VARIANTS if wanted[v]]
    cm = load_client_model(args)
    console = Console()
    for prompt in prompts:
        if not args.json:
            console.rule(f"[bold]client {cm.client_id}[/]: {escape(prompt)}")
        for variant in variants:
            if variant == "personalized" and args.best_of > 1:
                text = generate_best_of(cm, prompt, args.best_of, sampling)
            else:
                text = generate(cm, prompt, variant, sampling)
            if args.json:
                print(dumps({"client": cm.client_id, "prompt": prompt, "model": variant, "text": text}))
            else:
                console.print(Panel(Text(text) if text else "[dim](empty)[/]", title=variant, title_align="left"))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from fedpdpo.generate import score

    if args.pairs and (args.prompt or args.response):
        raise FedPDPOError("give either --pairs FILE or --prompt TEXT --response TEXT ..., not both")
    if not args.pairs and not (args.prompt is not None and args.response):
        raise FedPDPOError("give --prompt TEXT and at least one --response TEXT, or --pairs FILE")
    if args.limit < 0:
        raise FedPDPOError(f"--limit must be >= 0 (0 = all pairs), got {args.limit}")
    if not args.pairs:
        _check_texts("--prompt", [args.prompt])
        _check_texts("--response", args.response)
    cm = load_client_model(args)
    if args.pairs:
        return _score_pairs(cm, args)
    rows = score(cm, args.prompt, args.response)
    if args.json:
        for r in rows:
            print(dumps({"client": cm.client_id, "prompt": args.prompt} | _row_dict(r)))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"client {cm.client_id}: {escape(args.prompt)}", show_edge=False)
    for col in ("response", "implicit", "explicit", "log pi", "log pi_ref", "tokens"):
        table.add_column(col, justify="left" if col == "response" else "right")
    for r in rows:
        explicit = "-" if r.explicit is None else f"{r.explicit:+.4f}"
        table.add_row(
            _short(r.response), f"{r.implicit:+.4f}", explicit, f"{r.logp:.2f}", f"{r.ref_logp:.2f}", str(r.n_tokens)
        )
    Console().print(table)
    return 0


def _row_dict(r) -> dict:
    return {
        "response": r.response,
        "implicit": r.implicit,
        "explicit": r.explicit,
        "logp": r.logp,
        "ref_logp": r.ref_logp,
        "n_tokens": r.n_tokens,
    }


def _short(text: str, width: int = 60) -> str:
    """One line of at most ``width`` characters, escaped so that brackets in user text are not rich markup."""
    text = " ".join(text.split())
    return escape(text if len(text) <= width else text[: width - 1] + "…")


def _where(source: str, path: str) -> str:
    """A record's place in its file without the file's name (the table's title has it): ``12``, ``row 3``."""
    return escape(source.removeprefix(str(path)).lstrip(": ") or source)


def _score_pairs(cm, args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fedpdpo.data import load_records
    from fedpdpo.data.formats import flat
    from fedpdpo.generate import score
    from fedpdpo.losses import pairwise_accuracy

    records, report = load_records(args.pairs, args.on_bad_record)
    if report.n_skipped:
        log.warning("%s: skipped %d bad record(s) of %d", args.pairs, report.n_skipped, report.n_read)
    if args.limit:
        records = records[: args.limit]
    table = Table(title=f"client {cm.client_id}: {escape(args.pairs)} ({len(records)} pairs)", show_edge=False)
    for col in ("line", "prompt", "chosen", "rejected", "implicit margin", "explicit margin"):
        table.add_column(col, justify="right" if "margin" in col or col == "line" else "left")
    implicit_margins, explicit_margins = [], []
    for rec in records:
        chosen, rejected = score(cm, rec.prompt, [rec.chosen, rec.rejected])  # prompt: text or conversation
        implicit = chosen.implicit - rejected.implicit
        explicit = None if chosen.explicit is None or rejected.explicit is None else chosen.explicit - rejected.explicit
        implicit_margins.append(implicit)
        if explicit is not None:
            explicit_margins.append(explicit)
        if args.json:
            row = {"client": cm.client_id, "source": rec.source, "implicit_margin": implicit}
            row |= {"explicit_margin": explicit, "chosen": _row_dict(chosen), "rejected": _row_dict(rejected)}
            print(dumps(row))
        else:
            shown = "-" if explicit is None else f"{explicit:+.4f}"
            table.add_row(
                _where(rec.source, args.pairs),
                _short(flat(rec.prompt), 30),
                _short(rec.chosen, 30),
                _short(rec.rejected, 30),
                f"{implicit:+.4f}",
                shown,
            )
    import torch

    summary = {"pairs": len(records), "accuracy_implicit": pairwise_accuracy(torch.tensor(implicit_margins)).item()}
    if explicit_margins:
        summary["accuracy_explicit"] = pairwise_accuracy(torch.tensor(explicit_margins)).item()
    if args.json:
        print(dumps({"client": cm.client_id, "summary": summary}))
    else:
        table.caption = "chosen ranked above rejected: " + ", ".join(
            f"{k.removeprefix('accuracy_')} {v:.1%}" for k, v in summary.items() if k != "pairs"
        )
        Console().print(table)
    return 0
