"""``--engine flower-sim``: the Flower apps on Flower's simulation engine (Ray), one virtual SuperNode per client.

``flwr.simulation.run_simulation`` runs the ServerApp in this process and the ClientApps in Ray actors; each
actor keeps its process, so the model is loaded once per actor, not per round. Client state lives under
``OUT/clients`` (one machine), exactly where the in-process engine keeps it, so ``resume`` continues a killed run
after its last checkpoint with the clients' state as it was.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedpdpo.config import RunConfig
from fedpdpo.engines.flower.server_app import ServerParams, make_server_app
from fedpdpo.errors import FedPDPOError
from fedpdpo.rundir import preflight, run_directory

log = logging.getLogger(__name__)


@dataclass
class SimResources:
    """Ray resources of one ClientApp actor: ``num_cpus`` per client (actors run in parallel when CPUs allow)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


def backend_config(res: SimResources) -> dict[str, Any]:
    return {
        "client_resources": {"num_cpus": res.num_cpus, "num_gpus": res.num_gpus},
        "init_args": {"include_dashboard": False, "log_to_driver": False},
    }


def run_flower_sim(
    cfg: RunConfig,
    out: str | Path,
    quiet: bool = False,
    overwrite: bool = False,
    resources: SimResources | None = None,
    min_fit_replies: int = 1,
    resume: bool = False,
    rounds: int | None = None,
) -> dict[str, Any]:
    """Run the job on Flower's Ray simulation engine; writes the same files as the in-process engine.

    With ``resume``, ``cfg`` is the run's own config.toml and the run continues after its last checkpoint
    (``rounds`` raises its number of rounds)."""
    from flwr.simulation import run_simulation

    from fedpdpo.engines.flower.client_app import app as client_app

    out = Path(out).resolve()
    if not resume:
        preflight(out, overwrite)  # fail before Ray starts
    result: dict[str, Any] = {}
    # the server runs in this process, which holds the run
    with run_directory(out, overwrite=overwrite, resume=resume) as target:
        params = ServerParams(
            cfg,
            str(target),
            "flower-sim",
            min_fit_replies=min_fit_replies,
            quiet=quiet,
            lock=False,
            resume=resume,
            rounds=rounds,
        )
        server_app = make_server_app(params, on_done=result.update)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.num_clients,
            backend_config=backend_config(resources or SimResources()),
        )
        if not result:
            raise FedPDPOError("the Flower simulation ended without finishing the run; see the log above")
    return result
