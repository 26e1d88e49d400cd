"""Local LoRA-DPO training speed: fedpdpo's client trainer versus TRL's ``DPOTrainer``, side by side.

Both sides train the same job: the same backbone (``fedpdpo.model.backbone.load_backbone``), the same IMDB pairs
tokenized once by fedpdpo (TRL receives the token ids, so both see identical sequences), the same ``peft.LoraConfig``
(built by ``fedpdpo.model.policy.lora_config``; TRL gets it as ``peft_config`` and so, like fedpdpo, uses the
adapter-disabled frozen base as the reference), the same max length, batch size, beta, learning rate (constant,
AdamW, no weight decay, gradient clipping 1.0), steps and threads. The training set holds exactly
``steps * batch_size / epochs`` pairs. With the default ``--epochs 1`` both sides see every pair once and compute
each reference log-prob once: fedpdpo's caches (reference log-probs, frozen-prefix hidden states) give it nothing
there. With ``--epochs E > 1`` each pair is seen E times, as a client sees its data again over federated rounds;
TRL then gets ``precompute_ref_log_probs=True`` (its best setting for repeated data), fedpdpo reuses its caches.

Sides (``--precision`` sets the arithmetic of the first three; default fp32):

* ``fedpdpo``: ``algorithm = "fedavg"`` (plain DPO, no local modules): the like-for-like comparison;
* ``trl``: ``DPOTrainer`` (no gradient checkpointing by default: its fastest setting on a CPU), with its own
  ``bf16`` setting (accelerate's bf16 autocast, fp32 master weights: what fedpdpo's bf16 does) when the precision is
  bf16;
* ``fedpdpo-full``: ``algorithm = "fedpdpo"`` (personal head, reward head, adapter): reported, not compared;
* ``fedpdpo-fp32``, ``trl-fp32``: the same two trainers in fp32 whatever ``--precision`` says, so that one
  invocation also gives what bf16 gains over fp32 (``fedpdpo / fedpdpo-fp32``) and fedpdpo against what a user would
  otherwise run on a CPU (``fedpdpo / trl-fp32``: TRL's fp32 against fedpdpo's chosen precision).

``--precision auto`` takes bf16 where the hardware computes it (CUDA, CPUs with AVX512-BF16 or AMX; the rule of
``precision = "auto"`` in a run config), fp32 elsewhere, for fedpdpo and TRL alike. ``--device cuda`` runs every side
on the GPU (``benchmarks/gpu_check.sh``).

Each side of each repeat runs in its own subprocess, so its peak RSS (``getrusage``) is its own. The CPU may be
shared with other jobs, so absolute figures are noisy; the ratio is taken per repeat (sides run back to back, in
alternating order) and the median over repeats is reported. Held-out reward accuracy is DPO's implicit-reward
ranking accuracy (ties count half) on the same held-out pairs for every side.

    python benchmarks/bench_local_dpo.py              # defaults: smollm2, max_length 128, batch 4, 6 steps, 2 repeats
    python benchmarks/bench_local_dpo.py --repeats 3 --json out.json
    python benchmarks/bench_local_dpo.py --steps 8 --epochs 4        # 8 pairs, 4 passes (rounds) over them
    python benchmarks/bench_local_dpo.py --sides fedpdpo --set perf.shared_prefix=false   # one optimization off
    python benchmarks/bench_local_dpo.py --precision bf16 --sides fedpdpo,trl,fedpdpo-fp32,trl-fp32 --steps 8 --epochs 4

The last line printed is ``ratio_pairs_per_s=<x>`` (fedpdpo / trl at the chosen precision, median over repeats).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = "/work/shared/data/imdb_sentiment_pairs.jsonl"
SIDES = ("fedpdpo", "trl", "fedpdpo-full", "fedpdpo-fp32", "trl-fp32")
#: Sides run in fp32 whatever --precision says.
FP32_SIDES = ("fedpdpo-fp32", "trl-fp32")


def child_env() -> dict[str, str]:
    """This checkout's ``src`` first on the children's path (an installed fedpdpo may be another checkout's)."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    return os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH", "")]))}


def job_config(args: argparse.Namespace, algorithm: str, precision: str = "fp32") -> dict[str, Any]:
    """The fedpdpo config of the benchmark job (one client holding steps * batch_size training pairs, no validation
    split: every pair is trained on)."""
    return {
        "algorithm": algorithm,
        "model": args.model,
        "seed": args.seed,
        "device": args.device,
        "precision": precision,
        "num_clients": 1,
        "rounds": 1,
        "local_steps": args.steps,
        "batch_size": args.batch_size,
        "eval_batch_size": args.eval_batch_size,
        "max_length": args.max_length,
        "lr": args.lr,
        "beta": args.beta,
        "threads": args.threads,
        "lora": {
            "r": args.lora_r,
            "alpha": args.lora_alpha,
            "target_modules": args.lora_targets.split(","),
            "last_n_layers": args.last_n_layers,
        },
        "data": {
            "path": args.data,
            "max_train_per_client": train_pairs(args),
            "max_test_per_client": args.eval_pairs,
            "max_prompt_length": args.max_prompt_length,
            "validation_fraction": 0.0,
        },
    }


def side_precision(args: argparse.Namespace, side: str) -> str:
    """``fp32`` or ``bf16``: what ``side`` computes in (``--precision auto`` resolved on this machine)."""
    if side in FP32_SIDES or args.precision == "fp32":
        return "fp32"
    if args.precision == "bf16":
        return "bf16"
    import torch

    from fedpdpo.client.trainer import has_bf16

    return "bf16" if has_bf16(torch.device(args.device)) else "fp32"


def train_pairs(args: argparse.Namespace) -> int:
    """Training set size: ``steps * batch_size / epochs`` pairs, so that the job makes ``epochs`` passes."""
    total = args.steps * args.batch_size
    if args.epochs < 1 or total % args.epochs:
        raise SystemExit(f"--epochs {args.epochs} must divide steps * batch_size = {total}")
    return total // args.epochs


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def train_tokens(pairs) -> int:
    """Non-padding tokens of one pass over ``pairs`` (chosen and rejected sequences)."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def implicit_accuracy(
    decoder, head_weight, disable_adapter, pairs, pad_id: int, beta: float, batch_size: int, device: Any = "cpu"
):
    """Held-out accuracy of DPO's implicit reward ``beta * h`` (ties half), for any decoder with a PEFT adapter
    (in fp32: the same scorer for every side, whatever precision it trained in)."""
    import torch

    from fedpdpo.data.tokenize import collate, length_bucketed_batches
    from fedpdpo.losses import pairwise_accuracy
    from fedpdpo.model.policy import response_logps

    margins = []
    with torch.no_grad():
        for chunk in length_bucketed_batches(pairs, batch_size):
            batch = collate(chunk, pad_id).to(device)

            def logps(batch=batch):
                hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
                return response_logps(hidden, batch.input_ids, batch.response_mask, head_weight)[0]

            policy = logps()
            with disable_adapter():
                ref = logps()
            b = batch.num_pairs
            margins.append(beta * ((policy[:b] - ref[:b]) - (policy[b:] - ref[b:])))
    return pairwise_accuracy(torch.cat(margins)).item()


def run_fedpdpo(args: argparse.Namespace, algorithm: str, precision: str) -> dict[str, Any]:
    import torch

    from fedpdpo.client.state import ClientState
    from fedpdpo.client.trainer import evaluate, fit, precision_used, reference_logps
    from fedpdpo.config import config_from_dict
    from fedpdpo.engines.setup import build_setup

    cfg = config_from_dict(job_config(args, algorithm, precision), args.set)
    setup = build_setup(cfg)
    task, model = setup.tasks[0], setup.model
    state = ClientState()
    # The held-out reference is evaluation work, as in TRL (which computes it in evaluate()): not timed.
    state.reference["test"] = reference_logps(model, task.test, setup.cfg, task.pad_id)
    step_times: list[float] = []
    cpu0 = time.process_time()
    start = time.perf_counter()
    result = fit(
        model,
        task,
        state,
        setup.initial_global(),
        setup.initial,
        setup.cfg,
        server_round=1,
        on_step=lambda _s, _m: step_times.append(time.perf_counter()),
    )
    _synchronize(args.device)
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    # evaluate()'s ``accuracy_implicit`` is the quantity implicit_accuracy() computes for TRL (same pairs, same
    # formula, ties half; tests/test_perf.py checks that they agree), without a second reference pass.
    metrics = evaluate(model, task, state, result.shared, setup.initial, setup.cfg)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "step_s": _step_durations(start, step_times),
        "pairs": setup.cfg.local_steps * setup.cfg.batch_size,
        "tokens": args.epochs * train_tokens(task.train),
        "accuracy": metrics["accuracy_implicit"],
        "accuracy_personalized": metrics["accuracy"],
        "train_loss": result.metrics["loss"],
        "threads": torch.get_num_threads(),
        "shared_bytes": sum(t.numel() * t.element_size() for t in result.shared.values()),
        "precision": precision_used(setup.cfg),
        "peak_device_bytes": _peak_device_bytes(args.device),
    }


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_device_bytes(device: str) -> int:
    import torch

    return int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else 0


def run_trl(args: argparse.Namespace, precision: str) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fedpdpo.config import config_from_dict
    from fedpdpo.data import build_clients
    from fedpdpo.data.task import build_task
    from fedpdpo.model.backbone import load_backbone
    from fedpdpo.model.policy import lora_config

    cfg = config_from_dict(job_config(args, "fedavg", precision), args.set)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    clients, _ = build_clients(cfg)
    backbone, tokenizer = load_backbone(cfg.model)
    task = build_task(clients[0], tokenizer, cfg)  # fedpdpo's own tokenization: the same ids as its side
    rows = [
        {"prompt_ids": list(p.prompt_ids), "chosen_ids": list(p.chosen_ids), "rejected_ids": list(p.rejected_ids)}
        for p in task.train
    ]

    class PretokenizedDPOTrainer(DPOTrainer):
        """TRL trains on fedpdpo's token ids (its own tokenization step skipped): identical sequences."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, *_a, **_k):
            self.times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        dpo_args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=cfg.batch_size,
            gradient_accumulation_steps=1,
            max_steps=cfg.local_steps,
            learning_rate=cfg.lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=cfg.max_grad_norm,
            optim="adamw_torch",
            beta=cfg.beta,
            loss_type=["sigmoid"],
            max_length=cfg.max_length,
            bf16=precision == "bf16",
            fp16=False,
            use_cpu=args.device == "cpu",
            gradient_checkpointing=args.trl_gradient_checkpointing,
            # Over several epochs TRL's best setting computes every reference once, upfront (timed: inside train()).
            precompute_ref_log_probs=args.epochs > 1,
            seed=cfg.seed,
            report_to=[],
            logging_steps=10**6,
            save_strategy="no",
            eval_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        clock = StepClock()
        trainer = PretokenizedDPOTrainer(
            model=backbone,
            args=dpo_args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(backbone, cfg.lora),
            callbacks=[clock],
        )
        if cfg.threads:
            torch.set_num_threads(cfg.threads)  # the Trainer may have changed it
        cpu0 = time.process_time()
        start = time.perf_counter()
        output = trainer.train()
        _synchronize(args.device)
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu0
    peft_model = trainer.model
    peft_model.eval()
    base = peft_model.get_base_model()
    device = next(peft_model.parameters()).device
    accuracy = implicit_accuracy(
        base.get_decoder(),
        base.get_output_embeddings().weight,
        peft_model.disable_adapter,
        task.test,
        task.pad_id,
        cfg.beta,
        16,
        device,
    )
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "step_s": _step_durations(start, clock.times),
        "pairs": cfg.local_steps * cfg.batch_size,
        "tokens": args.epochs * train_tokens(task.train),
        "accuracy": accuracy,
        "train_loss": float(output.training_loss),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "peak_device_bytes": _peak_device_bytes(args.device),
    }


def _step_durations(start: float, ends: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *ends[:-1]], ends, strict=True)]


def child(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    precision = side_precision(args, args.child)
    if args.child.startswith("trl"):
        result = run_trl(args, precision)
    else:
        result = run_fedpdpo(args, "fedpdpo" if args.child == "fedpdpo-full" else "fedavg", precision)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


def run_side(side: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", side]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{side} run failed (exit {proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["pairs_per_s"] = result["pairs"] / result["wall_s"]
    result["tokens_per_s"] = result["tokens"] / result["wall_s"]
    result["pairs_per_cpu_s"] = result["pairs"] / result["cpu_s"]
    return result


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "machine": platform.machine(), "cpus": str(os.cpu_count())}
    for pkg in ("torch", "transformers", "peft", "trl", "fedpdpo"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "-"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                out["cpu"] = line.split(":", 1)[1].strip()
                break
    return out


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    keys = ("pairs_per_s", "tokens_per_s", "pairs_per_cpu_s", "wall_s", "peak_rss_bytes", "accuracy", "train_loss")
    return {side: {k: statistics.median(r[k] for r in rs) for k in keys} for side, rs in runs.items()}


def add_job_args(p: argparse.ArgumentParser, steps: int, eval_pairs: int) -> None:
    """The training job's settings, shared with roofline.py so both measure the same job."""
    p.add_argument("--model", default="smollm2")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--max-prompt-length", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (a client's rounds)")
    p.add_argument("--eval-pairs", type=int, default=eval_pairs)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="q_proj,v_proj")
    p.add_argument("--last-n-layers", type=int, default=4, help="LoRA on the last N layers on both sides (0 = all)")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=["fp32", "bf16", "auto"], default="fp32", help="arithmetic of both sides")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (both sides)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    add_job_args(p, steps=6, eval_pairs=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--trl-gradient-checkpointing", action="store_true", help="TRL's default; off = its fastest")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="fedpdpo config override")
    p.add_argument("--json", metavar="PATH", help="write all runs and the summary as JSON")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child_argv(args: argparse.Namespace) -> list[str]:
    """The parent's options, forwarded to each child."""
    out = [
        *("--model", args.model, "--data", args.data, "--max-length", str(args.max_length)),
        *("--max-prompt-length", str(args.max_prompt_length), "--batch-size", str(args.batch_size)),
        *("--eval-batch-size", str(args.eval_batch_size), "--steps", str(args.steps), "--epochs", str(args.epochs)),
        *("--eval-pairs", str(args.eval_pairs), "--lora-r", str(args.lora_r), "--lora-alpha", str(args.lora_alpha)),
        *("--lora-targets", args.lora_targets, "--last-n-layers", str(args.last_n_layers)),
        *("--beta", str(args.beta), "--lr", str(args.lr), "--threads", str(args.threads), "--seed", str(args.seed)),
        *("--precision", args.precision, "--device", args.device),
    ]
    if args.trl_gradient_checkpointing:
        out.append("--trl-gradient-checkpointing")
    for item in args.set:
        out += ["--set", item]
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    sides = [s for s in args.sides.split(",") if s]
    unknown = set(sides) - set(SIDES)
    if unknown:
        raise SystemExit(f"unknown side(s): {sorted(unknown)}")
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in sides}
    for rep in range(args.repeats):
        order = sides if rep % 2 == 0 else sides[::-1]
        for side in order:
            r = run_side(side, child_argv(args))
            runs[side].append(r)
            print(
                f"repeat {rep + 1}/{args.repeats} {side:13s} {r['precision']:4s} {r['pairs_per_s']:7.3f} pairs/s "
                f"{r['tokens_per_s']:8.1f} tok/s  wall {r['wall_s']:7.1f} s  cpu {r['cpu_s']:7.1f} s  "
                f"peak RSS {r['peak_rss_bytes'] / 2**30:5.2f} GiB  accuracy {r['accuracy']:.3f}  "
                f"load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
    summary = summarize(runs)
    print()
    header = ("side", "precision", "pairs/s", "tokens/s", "pairs/cpu-s", "peak RSS GiB", "accuracy", "loss")
    print("{:13s} {:>9s} {:>9s} {:>9s} {:>11s} {:>13s} {:>9s} {:>7s}".format(*header))
    for side, s in summary.items():
        print(
            f"{side:13s} {runs[side][0]['precision']:>9s} {s['pairs_per_s']:9.3f} {s['tokens_per_s']:9.1f} "
            f"{s['pairs_per_cpu_s']:11.3f} {s['peak_rss_bytes'] / 2**30:13.2f} {s['accuracy']:9.3f} "
            f"{s['train_loss']:7.4f}"
        )
    comparisons = {}
    for name, (a, b) in COMPARISONS.items():
        if a in runs and b in runs:
            comparisons[name] = compare(runs, a, b)
            c = comparisons[name]
            print(
                f"{name} ({a}/{b}): median {c['ratio']:.2f}; per repeat {', '.join(f'{x:.2f}' for x in c['ratios'])}; "
                f"per CPU-second {', '.join(f'{x:.2f}' for x in c['cpu_ratios'])}; peak RSS {c['rss_ratio']:.2f}"
            )
    like = comparisons.get("like for like")
    ratio = like["ratio"] if like else float("nan")
    if args.json:
        blob = {"args": vars(args), "versions": versions(), "runs": runs, "summary": summary}
        blob |= {"comparisons": comparisons, "ratio_pairs_per_s": ratio}
        if like:  # the keys earlier result files have
            blob |= {"ratios": like["ratios"], "cpu_ratios": like["cpu_ratios"]}
        Path(args.json).write_text(json.dumps(blob, indent=2), encoding="utf-8")
    print(f"ratio_pairs_per_s={ratio:.3f}")


#: Ratios printed when both sides ran: name -> (numerator side, denominator side). Each is taken per repeat (the
#: two sides ran back to back) and the median reported.
COMPARISONS = {
    "like for like": ("fedpdpo", "trl"),
    "bf16 gain": ("fedpdpo", "fedpdpo-fp32"),
    "vs TRL fp32": ("fedpdpo", "trl-fp32"),
    "fp32 like for like": ("fedpdpo-fp32", "trl-fp32"),
}


def compare(runs: dict[str, list[dict[str, Any]]], a: str, b: str) -> dict[str, Any]:
    ratios = [x["pairs_per_s"] / y["pairs_per_s"] for x, y in zip(runs[a], runs[b], strict=True)]
    cpu = [x["pairs_per_cpu_s"] / y["pairs_per_cpu_s"] for x, y in zip(runs[a], runs[b], strict=True)]
    rss = statistics.median(r["peak_rss_bytes"] for r in runs[a]) / statistics.median(
        r["peak_rss_bytes"] for r in runs[b]
    )
    return {"ratio": statistics.median(ratios), "ratios": ratios, "cpu_ratios": cpu, "rss_ratio": rss}


if __name__ == "__main__":
    main()
