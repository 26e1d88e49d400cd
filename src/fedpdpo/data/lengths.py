"""Sequence length limits, chosen per client from its own training pairs when the config leaves them at 0.

* ``data.max_prompt_length = 0`` (auto): the 90th percentile of the client's rendered prompt lengths (chat template
  included), at most half of ``max_length`` (or of :data:`MAX_AUTO_LENGTH`), and never less than the template plus
  one token of content.
* ``max_length = 0`` (auto): the prompt budget plus the 90th percentile of the longer response of each pair (end
  token included), at most :data:`MAX_AUTO_LENGTH`.

So nine prompts in ten keep every token, and nine pairs in ten keep their whole responses. Each client decides from
its own pairs (in a deployment nobody else sees them), so the same data gives the same limits in every engine.
Prompts longer than their budget lose tokens from the start of their content; responses from their end; the
shares of each are logged at the start of a run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedpdpo.data.tokenize import EncodedPair, TokenizedPair
from fedpdpo.errors import ConfigError

#: Upper bound of an automatic ``max_length`` (compute grows with it; set ``max_length`` to go further).
MAX_AUTO_LENGTH = 384
PERCENTILE = 90


@dataclass(frozen=True)
class Lengths:
    max_length: int
    max_prompt_length: int


def _p(values: Sequence[int]) -> int:
    return math.ceil(float(np.percentile(np.asarray(values), PERCENTILE)))


def resolve_lengths(pairs: Sequence[EncodedPair], max_length: int, max_prompt_length: int) -> Lengths:
    """The limits for a client whose untruncated pairs are ``pairs`` (a configured value > 0 is kept as is)."""
    template = max(len(p.prompt.head) + len(p.prompt.tail) for p in pairs)
    prompt = max_prompt_length
    if not prompt:
        cap = (max_length or MAX_AUTO_LENGTH) // 2
        prompt = max(min(_p([len(p.prompt) for p in pairs]), cap), template + 1)
    total = max_length or min(prompt + _p([max(len(p.chosen), len(p.rejected)) for p in pairs]), MAX_AUTO_LENGTH)
    total = max(total, prompt + 1) if not max_length else total
    if prompt >= total:
        raise ConfigError(
            f"the prompt budget ({prompt} tokens, data.max_prompt_length) leaves no room for a response within "
            f"max_length={total}; raise 'max_length' or lower 'data.max_prompt_length'"
        )
    return Lengths(total, prompt)


def truncation_shares(pairs: Sequence[TokenizedPair]) -> dict[str, float]:
    """Share of pairs whose prompt, and whose longer response, was cut."""
    n = max(1, len(pairs))
    return {
        "prompts_truncated": sum(p.prompt_truncated for p in pairs) / n,
        "responses_truncated": sum(p.response_truncated for p in pairs) / n,
    }
