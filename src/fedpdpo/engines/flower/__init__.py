"""fedpdpo on Flower: a ServerApp and a ClientApp (Message API) and three ways to run them.

* ``flower-sim``: Flower's simulation engine (Ray), one virtual SuperNode per client (``simulation.py``);
* ``flower-deploy``: a real ``flower-superlink`` and one ``fedpdpo node`` per client (``deploy.py``, ``node.py``;
  a loopback launcher here, one machine per node in docs/deployment.md), each node with its own data file or its
  partition of a shared one;
* an in-process ``Grid`` (``local_grid.py``) that runs the same apps synchronously, for tests.

Only the server loop's transport is Flower-specific (``server_app.GridTransport``); clients run the same
``fedpdpo.client.trainer.fit``/``evaluate`` as the in-process engine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedpdpo.config import RunConfig

if TYPE_CHECKING:
    from fedpdpo.engines.flower.deploy import NodeFiles

ENGINES = ("flower-sim", "flower-deploy")


def run_flower(
    engine: str,
    cfg: RunConfig,
    out: str | Path,
    *,
    quiet: bool = False,
    overwrite: bool = False,
    min_fit_replies: int = 1,
    reply_timeout: float = 0.0,
    sim_cpus: float = 1.0,
    sim_gpus: float = 0.0,
    tls: bool = False,
    nodes: dict[int, NodeFiles] | None = None,
    resume: bool = False,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run the job with ``engine`` and return its summary (the same files as the in-process engine).

    ``nodes`` (flower-deploy): each loopback node's own files; ``resume``: continue the run in ``out`` (``cfg`` is
    its config.toml) after its last checkpoint, ``rounds`` raising its number of rounds."""
    if engine == "flower-sim":
        from fedpdpo.engines.flower.simulation import SimResources, run_flower_sim

        res = SimResources(sim_cpus, sim_gpus)
        return run_flower_sim(
            cfg, out, quiet, overwrite, resources=res, min_fit_replies=min_fit_replies, resume=resume, rounds=rounds
        )
    if engine == "flower-deploy":
        from fedpdpo.engines.flower.deploy import run_loopback

        return run_loopback(
            cfg,
            out,
            overwrite=overwrite,
            tls=tls,
            min_fit_replies=min_fit_replies,
            reply_timeout=reply_timeout,
            nodes=nodes,
            resume=resume,
            rounds=rounds,
        )
    raise ValueError(f"unknown Flower engine {engine!r}")
