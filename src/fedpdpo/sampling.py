"""Sampling responses token by token from a FedPDPO model: the personalized, global or base policy.

Used by ``fedpdpo generate`` and the judge (through :mod:`fedpdpo.generate`) and by training's on-policy pairs
(:mod:`fedpdpo.client.online`), so it imports nothing above the model: the loop runs the same path as training,
``decoder (+ shared LoRA) -> bottleneck adapter -> personalized head``, with a key/value cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel, RepetitionPenaltyLogitsProcessor

from fedpdpo.model.policy import FedPDPOModel, cast_once_for_autocast

Variant = Literal["personalized", "global", "base"]
VARIANTS: tuple[Variant, ...] = ("personalized", "global", "base")


@dataclass
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 = greedy
    top_p: float = 0.9
    seed: int = 0
    # transformers' repetition penalty (1 = off): logits of tokens already in the sequence, prompt included, are
    # divided by it when positive and multiplied when negative (RepetitionPenaltyLogitsProcessor, CTRL's rule)
    repetition_penalty: float = 1.0
    # decoding-time realignment (DeRa, Liu et al. 2024): sample from pi_ref^(1 - realign) * pi^realign, token by
    # token (:func:`realigned`). 1 = the policy as trained; 2 = about the policy DPO would reach with beta / 2;
    # 0 = the reference. Costs a second decoder pass per token (the reference's); ignored for the base model.
    realign: float = 1.0


NUCLEUS_CANDIDATES = 256  # most probable tokens examined first for the nucleus; the whole vocabulary if they fall short


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token id from ``logits`` [V]: greedy at temperature 0, else nucleus (top-p) sampling.

    The nucleus (the smallest set of most probable tokens whose mass reaches ``top_p``) is found among the
    :data:`NUCLEUS_CANDIDATES` most probable tokens, and only when their mass falls short of ``top_p`` by sorting the
    whole vocabulary: the same set either way, without a sort of 49k-262k probabilities per token and row."""
    if temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return int(torch.multinomial(probs.cpu(), 1, generator=gen))
    top, order = probs.topk(min(NUCLEUS_CANDIDATES, probs.numel()))  # descending
    if float(top.sum()) < top_p and top.numel() < probs.numel():
        top, order = probs.sort(descending=True)
    keep = top.cumsum(0) - top < top_p  # the first token always stays
    pick = torch.multinomial(top[keep].cpu(), 1, generator=gen)
    return int(order[keep][pick])


def realigned(policy: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Next-token logits of ``pi_ref^(1 - strength) * pi^strength`` from the policy's and the reference's logits.

    Why: DPO's optimum is ``pi_ref * exp(r / beta)``, so scaling the learned log-ratio ``log pi - log pi_ref`` by
    ``strength`` gives the policy the same data would train at ``beta / strength`` (DeRa, "Decoding-time
    Realignment of Language Models", Liu et al. 2024; exact for the sequence, approximated here token by token).
    A strength above 1 shows, without retraining, which way the learned log-ratio pushes what the policy writes:
    towards its client's taste, and towards whatever else it learned (on the demo's policies, repetition: measured
    in docs/results.md)."""
    log_pi = torch.log_softmax(policy.float(), dim=-1)
    log_ref = torch.log_softmax(reference.float(), dim=-1)
    return log_ref + strength * (log_pi - log_ref)


@contextlib.contextmanager
def decoding(decoder: PreTrainedModel) -> Iterator[None]:
    """Within the block, ``decoder`` runs eager attention (restored on exit, also on error).

    Why: a decoding step attends with a one-token query, where PyTorch's CPU SDPA kernel is several times slower
    than plain matmul + softmax (2.5 against 0.4 ms per call, batch 48 x 9 heads x 80 keys, bf16). It rounds
    differently, so samples differ from SDPA's draws. The frozen weights' bf16 copies come from the caller's
    :func:`~fedpdpo.client.trainer.autocast` (``FedPDPOModel.frozen_weights_as``), as in training."""
    config = decoder.config
    attention = config._attn_implementation
    config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = attention


@torch.no_grad()
def sample_responses(
    model: FedPDPOModel,
    prompt_ids: list[int],
    variant: Variant,
    n: int,
    sampling: SamplingConfig,
    stop: AbstractSet[int],
) -> list[list[int]]:
    """``n`` responses to one prompt from ``model``'s ``variant`` policy, sampled together in one batch (the prompt
    is the same in every row: it runs once, and the rows continue its key/value cache, so no padding); row ``k``
    draws from a generator seeded ``sampling.seed + k``.
    End tokens are not included. ``personalized`` uses the model's local head, adapter and LoRA gate as loaded;
    ``global`` the shared LoRA as aggregated with the original head; ``base`` the frozen backbone. With
    ``sampling.realign != 1`` (not for ``base``) the reference runs next to the policy on its own key/value cache and
    each token is drawn from :func:`realigned` logits."""
    device = next(model.parameters()).device
    gens = [torch.Generator().manual_seed(sampling.seed + k) for k in range(n)]
    personal = variant == "personalized"
    head = model.local["head"].get_parameter("weight") if personal and "head" in model.local else model.ref_head_weight
    head = cast_once_for_autocast(head)
    strength = 1.0 if variant == "base" else sampling.realign
    # the reference's head, cast only where the reference runs (the plain path keeps no second [V, H] copy)
    ref_head = cast_once_for_autocast(model.ref_head_weight) if strength != 1.0 else model.ref_head_weight
    ref_cache = None
    adapter = model.local["adapter"] if personal and "adapter" in model.local else None
    responses: list[list[int]] = [[] for _ in range(n)]
    open_rows = set(range(n))
    ids = torch.tensor([prompt_ids], device=device)  # the prompt runs once; every row continues its key/values
    cache = None
    ctx = {"base": model.peft.disable_adapter, "global": model.gates_off}.get(variant, contextlib.nullcontext)()
    rep = sampling.repetition_penalty
    penalty = RepetitionPenaltyLogitsProcessor(rep) if rep != 1 else None
    seen = ids.expand(n, -1)  # every row's tokens so far, prompt included (what the penalty looks at)
    with ctx, decoding(model.decoder):
        for _ in range(sampling.max_new_tokens):
            out = model.decoder(input_ids=ids, cache=cache, use_cache=True)
            if cache is None and n > 1:
                out.cache.batch_repeat_interleave(n)
            cache = out.cache
            hidden = out.last_hidden_state[:, -1].expand(n, -1)
            if adapter is not None:
                hidden = adapter(hidden)
            logits = hidden @ head.T
            if strength != 1.0:
                with model.peft.disable_adapter():
                    ref_out = model.decoder(input_ids=ids, cache=ref_cache, use_cache=True)
                if ref_cache is None and n > 1:
                    ref_out.cache.batch_repeat_interleave(n)
                ref_cache = ref_out.cache
                logits = realigned(logits, ref_out.last_hidden_state[:, -1].expand(n, -1) @ ref_head.T, strength)
            if penalty is not None:
                logits = penalty(seen, logits.float())
            tokens = []
            for k in range(n):
                token = sample_token(logits[k], sampling.temperature, sampling.top_p, gens[k]) if k in open_rows else 0
                if token in stop:
                    open_rows.discard(k)
                elif k in open_rows:
                    responses[k].append(token)
                tokens.append(token)
            if not open_rows:
                break
            ids = torch.tensor([[t] for t in tokens], device=device)
            if penalty is not None:
                seen = torch.cat([seen, ids], dim=1)
    return responses
