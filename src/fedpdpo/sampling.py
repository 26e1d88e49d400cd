"""Sampling responses token by token from a FedPDPO model: the personalized, global or base policy.

Used by ``fedpdpo generate`` and the judge (through :mod:`fedpdpo.generate`) and by training's on-policy pairs
(:mod:`fedpdpo.client.online`), so it imports nothing above the model: the loop runs the same path as training,
``decoder (+ shared LoRA) -> bottleneck adapter -> personalized head``, with a key/value cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Hashable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import AttentionInterface, PreTrainedModel, RepetitionPenaltyLogitsProcessor
from transformers.masking_utils import AttentionMaskInterface, eager_mask

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


def repeated_ngrams(items: Sequence[Hashable], n: int = 3) -> float:
    """Share of the ``n``-grams of ``items`` (words or token ids) that already occurred earlier in them: about 0 for
    fluent text, near 1 for a policy caught in a loop ("noir noir noir ..."). The judge reports it next to its
    scores (a judge reads loops as neutral), and on-policy pairs keep loops off their chosen side with it."""
    grams = list(zip(*(items[i:] for i in range(n)), strict=False))
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator]) -> list[int]:
    """One token id per row of ``logits`` [n, V], row ``k`` drawing from ``gens[k]``: greedy at temperature 0, else
    nucleus (top-p) sampling.

    The nucleus (the smallest set of most probable tokens whose mass reaches ``top_p``) is found among the
    :data:`NUCLEUS_CANDIDATES` most probable tokens, and only for a row whose mass there falls short of ``top_p`` by
    sorting its whole vocabulary: the same set either way, without a sort of 49k-262k probabilities per token and
    row. The softmax and the candidates of all rows are one batched call; each row draws with its own generator, so
    what a row draws does not depend on the other rows in its batch."""
    if temperature <= 0:
        return logits.argmax(dim=-1).tolist()
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return [int(torch.multinomial(row, 1, generator=gen)) for row, gen in zip(probs.cpu(), gens, strict=True)]
    tops, orders = probs.topk(min(NUCLEUS_CANDIDATES, probs.shape[-1]), dim=-1)  # descending
    whole = tops.shape[-1] == probs.shape[-1]
    short = [False] * len(gens) if whole else (tops.sum(dim=-1) < top_p).tolist()
    tops, orders = tops.cpu(), orders.cpu()
    out = []
    for k, gen in enumerate(gens):
        top, order = [t.cpu() for t in probs[k].sort(descending=True)] if short[k] else (tops[k], orders[k])
        keep = top.cumsum(0) - top < top_p  # the first token always stays
        out.append(int(order[keep][torch.multinomial(top[keep], 1, generator=gen)]))
    return out


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> int:
    """One token id from ``logits`` [V]: :func:`sample_tokens` for one row."""
    return sample_tokens(logits[None], temperature, top_p, [gen])[0]


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


GROUPED = "fedpdpo_grouped"  # the attention implementation registered below
# model types whose eager attention is plain grouped-query attention (no soft-capping or sliding window), so that
# :func:`grouped_attention` computes exactly what it does
GROUPED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def grouped_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' eager attention without ``repeat_kv``: query heads [B, H, Q, D] are grouped by the key/value
    head they share, [B, KV, H / KV * Q, D], and multiply the cached keys and values as they are.

    Why: eager attention copies every key and value of the cache H / KV times per layer and step (3x for SmolLM2),
    so decoding a long sample moves several times the cache through memory at every token; here nothing is
    copied. Same sums as eager attention (a reshape, no new rounding); used only for decoding (:func:`decoding`)."""
    b, h, q, d = query.shape
    kv = key.shape[1]
    groups = h // kv
    scores = torch.matmul(query.reshape(b, kv, groups * q, d), key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # [B, 1, Q, L] -> each group's rows
        scores = (scores.view(b, kv, groups, q, -1) + attention_mask[:, :, None]).view(b, kv, groups * q, -1)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    out = torch.matmul(weights, value).view(b, h, q, d)
    return out.transpose(1, 2).contiguous(), weights.view(b, h, q, -1)


AttentionInterface.register(GROUPED, grouped_attention)
AttentionMaskInterface.register(GROUPED, eager_mask)


@contextlib.contextmanager
def decoding(decoder: PreTrainedModel) -> Iterator[None]:
    """Within the block, ``decoder`` runs eager attention, or :func:`grouped_attention` where that is the same
    (restored on exit, also on error).

    Why: a decoding step attends with a one-token query, where PyTorch's CPU SDPA kernel is several times slower
    than plain matmul + softmax (2.5 against 0.4 ms per call, batch 48 x 9 heads x 80 keys, bf16). It rounds
    differently, so samples differ from SDPA's draws. The frozen weights' bf16 copies come from the caller's
    :func:`~fedpdpo.client.trainer.autocast` (``FedPDPOModel.frozen_weights_as``), as in training."""
    config = decoder.config
    attention = config._attn_implementation
    config._attn_implementation = GROUPED if config.model_type in GROUPED_MODEL_TYPES else "eager"
    try:
        yield
    finally:
        config._attn_implementation = attention


MAX_ROWS = 64  # rows decoded together: a 135M model's decoding step costs about the same at 1 row as at dozens


@torch.no_grad()
def sample_batch(
    model: FedPDPOModel,
    prompts: list[list[int]],
    seeds: list[int],
    variant: Variant,
    sampling: SamplingConfig,
    stop: AbstractSet[int],
    max_rows: int = MAX_ROWS,
) -> list[list[int]]:
    """One response per row from ``model``'s ``variant`` policy: row ``i`` continues ``prompts[i]`` and draws from a
    generator seeded ``seeds[i]`` (``sampling.seed`` is not used here). Rows are decoded ``max_rows`` at a time.

    Why batched: on a CPU one decoding step of a small model costs about as much for one row as for dozens, so the
    judge's samples (a few per prompt, dozens of prompts) are drawn together. Within a batch each distinct prompt
    runs once, left-padded to the longest (masked, with positions counted from its first real token), and its rows
    continue its key/value cache. End tokens are not included. ``personalized`` uses the model's local head, adapter
    and LoRA gate as loaded; ``global`` the shared LoRA as aggregated with the original head; ``base`` the frozen
    backbone. With ``sampling.realign != 1`` (not for ``base``) the reference runs next to the policy on its own
    key/value cache and each token is drawn from :func:`realigned` logits."""
    if len(prompts) != len(seeds):
        raise ValueError(f"one seed per prompt row expected, got {len(seeds)} for {len(prompts)}")
    out: list[list[int]] = []
    for start in range(0, len(prompts), max_rows):
        rows = slice(start, start + max_rows)
        out.extend(_sample_rows(model, prompts[rows], seeds[rows], variant, sampling, stop))
    return out


def sample_responses(
    model: FedPDPOModel,
    prompt_ids: list[int],
    variant: Variant,
    n: int,
    sampling: SamplingConfig,
    stop: AbstractSet[int],
) -> list[list[int]]:
    """``n`` responses to one prompt (:func:`sample_batch`); response ``k`` draws with seed ``sampling.seed + k``."""
    return sample_batch(model, [prompt_ids] * n, [sampling.seed + k for k in range(n)], variant, sampling, stop)


def _sample_rows(
    model: FedPDPOModel,
    prompts: list[list[int]],
    seeds: list[int],
    variant: Variant,
    sampling: SamplingConfig,
    stop: AbstractSet[int],
) -> list[list[int]]:
    """:func:`sample_batch` for rows decoded together."""
    device = next(model.parameters()).device
    n = len(prompts)
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    where = {p: i for i, p in enumerate(dict.fromkeys(tuple(p) for p in prompts))}  # distinct prompt -> its row
    distinct = list(where)
    source = torch.tensor([where[tuple(p)] for p in prompts], device=device)  # row -> its prompt's row
    width = max(len(p) for p in distinct)
    # left padding repeats a prompt's first token (masked out; and the repetition penalty's set of seen tokens stays
    # the prompt's own)
    ids = torch.tensor([[p[0]] * (width - len(p)) + list(p) for p in distinct], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in distinct], device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    personal = variant == "personalized"
    head = model.local["head"].get_parameter("weight") if personal and "head" in model.local else model.ref_head_weight
    head = cast_once_for_autocast(head)
    strength = 1.0 if variant == "base" else sampling.realign
    # the reference's head, cast only where the reference runs (the plain path keeps no second [V, H] copy)
    ref_head = cast_once_for_autocast(model.ref_head_weight) if strength != 1.0 else model.ref_head_weight
    adapter = model.local["adapter"] if personal and "adapter" in model.local else None
    responses: list[list[int]] = [[] for _ in range(n)]
    open_rows = set(range(n))
    cache = ref_cache = None
    ctx = {"base": model.peft.disable_adapter, "global": model.gates_off}.get(variant, contextlib.nullcontext)()
    rep = sampling.repetition_penalty
    penalty = RepetitionPenaltyLogitsProcessor(rep) if rep != 1 else None
    seen = ids[source]  # every row's tokens so far, prompt included (what the penalty looks at)
    with ctx, decoding(model.decoder):
        for step in range(sampling.max_new_tokens):
            prefill = step == 0
            inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, "use_cache": True}
            out = model.decoder(**inputs, cache=cache)
            cache = out.cache
            hidden = out.last_hidden_state[:, -1]
            if prefill:  # every row continues its prompt's keys and values
                cache.reorder_cache(source)
                hidden, mask, positions = hidden[source], mask[source], positions[source]
            if adapter is not None:
                hidden = adapter(hidden)
            logits = hidden @ head.T
            if strength != 1.0:
                with model.peft.disable_adapter():
                    ref_out = model.decoder(**inputs, cache=ref_cache)
                ref_cache = ref_out.cache
                ref_hidden = ref_out.last_hidden_state[:, -1]
                if prefill:
                    ref_cache.reorder_cache(source)
                    ref_hidden = ref_hidden[source]
                logits = realigned(logits, ref_hidden @ ref_head.T, strength)
            if penalty is not None:
                logits = penalty(seen, logits.float())
            tokens = sample_tokens(logits, sampling.temperature, sampling.top_p, gens)
            for k in sorted(open_rows):
                if tokens[k] in stop:
                    open_rows.discard(k)
                else:
                    responses[k].append(tokens[k])
            if not open_rows:
                break
            ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
            positions = positions[:, -1:] + 1
            if penalty is not None:
                seen = torch.cat([seen, ids], dim=1)
    return responses
