"""What a strategy tells its clients for one round, the way Flower's FedProx sends ``proximal-mu``.

A strategy never rewrites the user's config to make the trainer behave differently. Each round it returns a small
flat dict of scalars (:meth:`~fedpdpo.strategies.base.Strategy.fit_instructions`), every transport delivers that
dict with the shared tensors (an argument in-process, keys of the train message's ``ConfigRecord`` on Flower), and
the client's ``fit`` turns it into a :class:`FitPlan`. The saved ``config.toml`` is therefore exactly what the user
asked for, and a resumed run rebuilds the same instructions from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Gradient steps of the round's federated pass (default: the config's ``local_steps``).
LOCAL_STEPS = "local-steps"
#: FedProx: weight ``mu`` of the proximal term ``mu/2 * ||w - w_global||^2`` on the shared tensors (0 = off).
PROXIMAL_MU = "proximal-mu"
#: FedRep: the first ``head-steps`` steps train only the local tensors, the rest only the shared ones (0 = off).
HEAD_STEPS = "head-steps"
#: FedPDPO: ``personal-first-steps`` extra steps at the start of the round train only the local tensors against the
#: received global ones (which the client's model is evaluated with), before the joint steps (0 = off).
PERSONAL_FIRST_STEPS = "personal-first-steps"
#: Ditto: weight ``lambda`` of the pull of the personal copy towards the global tensors (0 = no personal pass).
DITTO_LAMBDA = "ditto-lambda"
#: Ditto: steps of the personal pass (default: those of the federated pass).
PERSONAL_STEPS = "personal-steps"

KEYS = frozenset({LOCAL_STEPS, PROXIMAL_MU, HEAD_STEPS, PERSONAL_FIRST_STEPS, DITTO_LAMBDA, PERSONAL_STEPS})

Instructions = dict[str, int | float]


def pick(config: Mapping[str, object]) -> Instructions:
    """The instruction keys of a message's config (which also holds the round, the run config, ...)."""
    return {k: v for k, v in config.items() if k in KEYS and isinstance(v, int | float)}


@dataclass(frozen=True)
class FitPlan:
    """What one client does in one round: the steps of each pass and the extra loss terms."""

    local_steps: int
    proximal_mu: float = 0.0
    head_steps: int = 0
    personal_first_steps: int = 0  # FedPDPO: local-only steps before the joint ones, in the same pass
    ditto_lambda: float = 0.0
    personal_steps: int = 0  # 0 without Ditto's personal pass

    @classmethod
    def parse(cls, instructions: Mapping[str, int | float] | None, local_steps: int) -> FitPlan:
        """The plan for ``instructions`` (None or empty: ``local_steps`` plain DPO steps); unknown keys are a
        programming error, not something to ignore."""
        instructions = instructions or {}
        unknown = sorted(set(instructions) - KEYS)
        if unknown:
            raise ValueError(f"unknown client instruction(s) {unknown}; known: {sorted(KEYS)}")
        steps = int(instructions.get(LOCAL_STEPS, local_steps))
        ditto_lambda = float(instructions.get(DITTO_LAMBDA, 0.0))
        return cls(
            local_steps=steps,
            proximal_mu=float(instructions.get(PROXIMAL_MU, 0.0)),
            head_steps=int(instructions.get(HEAD_STEPS, 0)),
            personal_first_steps=int(instructions.get(PERSONAL_FIRST_STEPS, 0)),
            ditto_lambda=ditto_lambda,
            personal_steps=int(instructions.get(PERSONAL_STEPS, steps)) if ditto_lambda > 0 else 0,
        )

    @property
    def pass_steps(self) -> int:
        """Gradient steps of the federated pass (each reports to the progress display)."""
        return self.personal_first_steps + self.local_steps

    @property
    def total_steps(self) -> int:
        """Gradient steps the client runs in the round, both passes together."""
        return self.pass_steps + self.personal_steps
