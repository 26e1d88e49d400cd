"""Sample from and score with a client's personalized model (the sampling loop itself: :mod:`fedpdpo.sampling`).

Generation runs the same path as training, token by token with a KV cache:
``decoder (+ shared LoRA) -> bottleneck adapter -> personalized head``. Two comparison policies use the same loop:
``global`` (decoder + shared LoRA, original head: what every client shares) and ``base`` (the frozen backbone,
LoRA off: the reference policy). Prompts are rendered with the tokenizer's chat template, as in training.

Scoring gives both rewards FedPDPO learns: the *implicit* DPO reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` and
the *explicit* reward head's ``r(x, y)``, computed exactly as in training (same tokenization and truncation).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fedpdpo.data.formats import Text
from fedpdpo.data.tokenize import PairBatch, PairTokenizer, collate_responses
from fedpdpo.export import ClientModel
from fedpdpo.model.policy import FedPDPOModel
from fedpdpo.sampling import SamplingConfig, Variant, sample_responses


def generate_ids(
    cm: ClientModel, prompt: Text, variant: Variant = "personalized", sampling: SamplingConfig | None = None
) -> list[int]:
    """Token ids of a response to ``prompt`` sampled from the client's ``variant`` policy (end token excluded)."""
    sampling = sampling or SamplingConfig()
    pair_tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    prompt_ids = pair_tok.prompt_ids(prompt)  # exactly as training built it
    return sample_responses(cm.model, prompt_ids, variant, 1, sampling, pair_tok.stop_ids)[0]


def generate(
    cm: ClientModel, prompt: str, variant: Variant = "personalized", sampling: SamplingConfig | None = None
) -> str:
    """The decoded text of :func:`generate_ids`."""
    return cm.tokenizer.decode(generate_ids(cm, prompt, variant, sampling), skip_special_tokens=True)


def generate_best_of(cm: ClientModel, prompt: str, n: int, sampling: SamplingConfig | None = None) -> str:
    """Of ``n`` personalized samples (seeds ``seed .. seed + n - 1``; the first is :func:`generate`'s), the one the
    client's own score (:func:`own_score`) ranks first: its reward head chooses what it says."""
    sampling = sampling or SamplingConfig()
    pair_tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    ids = sample_responses(cm.model, pair_tok.prompt_ids(prompt), "personalized", n, sampling, pair_tok.stop_ids)
    texts = [cm.tokenizer.decode(x, skip_special_tokens=True) for x in ids]
    values = own_scores(cm.model, pair_tok, cm.beta, prompt, texts)
    return texts[max(range(n), key=values.__getitem__)]


@dataclass
class ResponseScore:
    response: str
    logp: float  # summed log-prob of the response under the personalized policy
    ref_logp: float  # ... under the reference policy (frozen backbone)
    implicit: float  # beta * (logp - ref_logp): DPO's implicit reward
    explicit: float | None  # the client's reward head; None when the method has no reward head
    n_tokens: int  # response tokens scored (after truncation to the run's max_length)


def own_score(row: ResponseScore) -> float:
    """What a client's model ranks its own samples by for best-of-N: its explicit reward ``r(x, y)`` (the implicit
    reward only without a reward head). Not the implicit reward: on the policy's own samples ``beta * log(pi /
    pi_ref)`` is biased towards whatever the policy over-produces (its mean is beta times KL(pi || pi_ref) >= 0), so it
    favours a policy's loops over its client's taste; the reward head was trained on the client's pairs alone."""
    return row.implicit if row.explicit is None else row.explicit


def _response_batches(
    pair_tok: PairTokenizer, prompt: Text, responses: list[str], batch_size: int, device: torch.device
) -> Iterator[tuple[list[str], PairBatch]]:
    """``responses`` to ``prompt``, ``batch_size`` at a time, tokenized and truncated as in training: each batch
    holds them once (collate's chosen half; its rejected half would repeat them)."""
    prompt_ids = tuple(pair_tok.prompt_ids(prompt))
    budget = pair_tok.max_length - len(prompt_ids)
    for start in range(0, len(responses), batch_size):
        texts = responses[start : start + batch_size]
        ids = [tuple(pair_tok.response_ids(text, budget)) for text in texts]
        yield texts, collate_responses(prompt_ids, ids, pair_tok.pad_id).to(device)


@torch.no_grad()
def score_responses(
    model: FedPDPOModel, pair_tok: PairTokenizer, beta: float, prompt: Text, responses: list[str], batch_size: int = 16
) -> list[ResponseScore]:
    """Implicit and explicit rewards of each response to ``prompt`` under ``model`` as loaded (a client's modules),
    tokenized and truncated as in training; ``batch_size`` responses per forward pass."""
    device = next(model.parameters()).device
    rows = []
    for texts, batch in _response_batches(pair_tok, prompt, responses, batch_size, device):
        out = model(batch)
        ref = model.reference_logps(batch)
        for i, text in enumerate(texts):
            logp, ref_logp = float(out.logps[i]), float(ref[i])
            explicit = None if out.rewards is None else float(out.rewards[i])
            rows.append(ResponseScore(text, logp, ref_logp, beta * (logp - ref_logp), explicit, int(out.n_tokens[i])))
    return rows


@torch.no_grad()
def own_scores(
    model: FedPDPOModel, pair_tok: PairTokenizer, beta: float, prompt: Text, responses: list[str], batch_size: int = 16
) -> list[float]:
    """:func:`own_score` of each response, as :func:`score_responses` would give it
    (:meth:`~fedpdpo.model.policy.FedPDPOModel.own_scores`); with a reward head only that head runs (no log-probs of
    the policy or the reference), so ranking best-of-N candidates costs one decoder pass."""
    device = next(model.parameters()).device
    batches = _response_batches(pair_tok, prompt, responses, batch_size, device)
    return [float(r) for _, batch in batches for r in model.own_scores(batch, beta)]


def score(cm: ClientModel, prompt: Text, responses: list[str]) -> list[ResponseScore]:
    """Implicit and explicit rewards of each response to ``prompt`` under the client's model."""
    pair_tok = PairTokenizer(cm.tokenizer, cm.max_length, cm.max_prompt_length)
    return score_responses(cm.model, pair_tok, cm.beta, prompt, responses)
