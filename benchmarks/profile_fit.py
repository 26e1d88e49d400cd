"""Operator profile of one client's local training (``fit``) inside a real run: where a step's time goes.

Runs ``fedpdpo run`` with the given config and overrides, and wraps the N-th call of
``fedpdpo.client.trainer.fit`` (in call order: round 1 clients 1..K, then round 2, ...) in ``torch.profiler``; prints
the call's wall time and the operators by self CPU time. With ``--set local_steps=13`` on the demo config (103
training pairs per client, batch 8) round 1 visits every training pair once, so ``--call 4`` (round 2, client 0)
profiles steps whose frozen-prefix outputs are all cached, and ``--call 1`` steps that compute them.

    python benchmarks/profile_fit.py --config configs/demo.toml --set rounds=2 --set local_steps=13 --call 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

from torch.profiler import ProfilerActivity, profile


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/demo.toml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    ap.add_argument("--call", type=int, default=4, help="which call of fit to profile (1 = the first)")
    ap.add_argument("--rows", type=int, default=25, help="operators to print")
    args = ap.parse_args()

    import fedpdpo.engines.inprocess as inprocess
    from fedpdpo.cli import main as cli

    real_fit, calls = inprocess.fit, [0]
    prof = profile(activities=[ProfilerActivity.CPU])

    def fit(*a, **k):
        calls[0] += 1
        if calls[0] != args.call:
            return real_fit(*a, **k)
        t0 = time.perf_counter()
        with prof:
            result = real_fit(*a, **k)
        print(f"fit call {args.call}: {time.perf_counter() - t0:.1f} s wall", file=sys.stderr)
        return result

    inprocess.fit = fit
    with tempfile.TemporaryDirectory() as out:
        argv = ["run", "--config", args.config, "--out", f"{out}/run", "--quiet"]
        rc = cli(argv + [x for s in args.set for x in ("--set", s)])
    if calls[0] < args.call:
        print(f"fit was called {calls[0]} times; --call {args.call} never ran", file=sys.stderr)
        return 2
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return rc


if __name__ == "__main__":
    sys.exit(main())
