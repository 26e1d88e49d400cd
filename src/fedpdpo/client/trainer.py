"""Local training and evaluation of one client: the algorithm core that every engine calls unchanged.

``fit`` and ``evaluate`` are plain functions of (model, client data, client state, shared tensors, config); they
know nothing about Flower, Ray or the run directory. All randomness in a round is derived from
``(seed, round, client_id)``, so the result does not depend on which engine runs the client, in which order, or
after a restart.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedpdpo.client.online import own_pairs
from fedpdpo.client.state import ClientState
from fedpdpo.config import RunConfig
from fedpdpo.data.task import ClientTask
from fedpdpo.data.tokenize import PairBatch, TokenizedPair, collate, length_bucketed_batches
from fedpdpo.instructions import FitPlan
from fedpdpo.losses import LossOutput, fedpdpo_objective, pairwise_accuracy, pairwise_correct, read_scalars
from fedpdpo.model.naming import PERSONAL, optimizer_groups, personal_copies
from fedpdpo.model.policy import FedPDPOModel, PolicyOutput
from fedpdpo.timing import phase
from fedpdpo.transfer import to_wire

#: Key of the whole back-propagated loss (proximal term included) in a step's one read; checked, not logged.
OBJECTIVE = "_objective"


@dataclass
class FitResult:
    shared: dict[str, torch.Tensor]  # updated shared tensors: the only thing sent to the server
    num_examples: int
    metrics: dict[str, float]
    state: ClientState = field(repr=False)  # stays on the client


def derive_seed(*parts: int) -> int:
    """A stable 63-bit seed from integers (no Python ``hash`` randomisation)."""
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return value


def device_of(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def has_bf16(device: torch.device) -> bool:
    """Whether ``device`` has bf16 arithmetic units (CUDA: Ampere or newer; CPU: AVX512-BF16 or AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def compute_dtype(cfg: RunConfig) -> torch.dtype | None:
    """The autocast dtype of ``cfg.precision`` on this machine: bf16, or None for plain fp32.

    ``auto`` takes bf16 only where the hardware computes it natively (elsewhere emulated bf16 is slower than fp32);
    ``bf16`` forces it. Master weights, optimizer state, log-softmax, sequence sums and the DPO margin stay fp32.
    """
    if cfg.precision == "fp32":
        return None
    if cfg.precision == "bf16" or has_bf16(device_of(cfg)):
        return torch.bfloat16
    return None


def precision_used(cfg: RunConfig) -> str:
    """What ``cfg.precision`` resolves to on this machine: ``"bf16"`` (autocast) or ``"fp32"``."""
    return "fp32" if compute_dtype(cfg) is None else "bf16"


@contextlib.contextmanager
def autocast(cfg: RunConfig, model: FedPDPOModel):
    """Mixed precision for the forward passes of training, evaluation and the reference (see ``compute_dtype``),
    with the model's frozen weights already in that precision (``FedPDPOModel.frozen_weights_as``)."""
    dtype = compute_dtype(cfg)
    if dtype is None:
        yield
        return
    with torch.autocast(device_of(cfg).type, dtype=dtype), model.frozen_weights_as(dtype):
        yield


def adamw(params, cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW at ``cfg.lr``, fused on CPU and CUDA: one pass over each tensor instead of one per operation. The
    personal LM head is a [vocabulary, hidden] matrix updated every step; on a 2-core CPU the unfused update of
    SmolLM2's head took 89 ms a step, the fused one 7 ms (docs/performance.md); the same update up to float rounding."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def _batches(pairs: list[TokenizedPair], batch_size: int, pad_id: int, device: torch.device):
    for chunk in length_bucketed_batches(pairs, batch_size):
        yield collate(chunk, pad_id).to(device)


@torch.no_grad()
def _fill_reference(
    model: FedPDPOModel, pairs: list[TokenizedPair], table: torch.Tensor, cfg: RunConfig, pad_id: int
) -> None:
    """Write the reference log-probs (chosen, rejected) of ``pairs`` into rows ``pair.index`` of ``table``."""
    device = device_of(cfg)
    model.to(device)  # as fit and evaluate do: a caller may ask for the reference before either ran (a no-op after)
    with phase("reference pass"), autocast(cfg, model):
        for batch in _batches(pairs, cfg.eval_batch_size, pad_id, device):
            ref = model.reference_logps(batch).float().cpu()
            b = batch.num_pairs
            table[batch.index, 0] = ref[:b]
            table[batch.index, 1] = ref[b:]


def reference_logps(model: FedPDPOModel, pairs: list[TokenizedPair], cfg: RunConfig, pad_id: int) -> torch.Tensor:
    """``[n, 2]`` reference log-probs (chosen, rejected) of every pair."""
    out = torch.zeros(len(pairs), 2, dtype=torch.float32)
    _fill_reference(model, pairs, out, cfg, pad_id)
    return out


def reference_table(state: ClientState, split: str, n: int) -> torch.Tensor:
    """The cached ``[n, 2]`` reference table of a split; rows not computed yet are NaN."""
    table = state.reference.get(split)
    if table is None or table.shape[0] != n:
        table = state.reference[split] = torch.full((n, 2), float("nan"))
    return table


def ensure_reference(
    model: FedPDPOModel, task: ClientTask, state: ClientState, cfg: RunConfig, splits=("train", "test")
) -> None:
    """Fill the missing rows of the reference cache: the reference is frozen, so each pair is computed once."""
    for split in splits:
        pairs = task.split(split)
        table = reference_table(state, split, len(pairs))
        missing = torch.isnan(table).any(1).nonzero().flatten().tolist()
        if missing:
            _fill_reference(model, [pairs[i] for i in missing], table, cfg, task.pad_id)


def _store_reference(batch: PairBatch, ref: torch.Tensor, table: torch.Tensor) -> None:
    """Cache reference log-probs computed inside a training step (only rows still missing)."""
    idx = batch.index
    b = idx.shape[0]
    rows = torch.stack([ref[:b], ref[b:]], 1).detach().float().cpu()
    missing = torch.isnan(table[idx]).any(1)
    table[idx[missing]] = rows[missing]


def _ref_for(batch: PairBatch, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    rows = table[batch.index]
    return torch.cat([rows[:, 0], rows[:, 1]]).to(device)


def objective(
    logps: torch.Tensor,
    ref: torch.Tensor,
    rewards: torch.Tensor | None,
    cfg: RunConfig,
    global_logps: torch.Tensor | None = None,
    n_tokens: torch.Tensor | None = None,
) -> LossOutput:
    """The run's objective on pairs laid out [chosen..., rejected...]: what training minimises and what evaluation
    reports, through the same function (as TRL computes train and eval losses), so both honour ``loss_type``,
    ``label_smoothing``, ``rpo_alpha`` and ``dpop_lambda`` and carry the same metric names."""
    return fedpdpo_objective(
        logps.float(),
        ref,
        None if rewards is None else rewards.float(),
        cfg.beta,
        cfg.method.reward_weight,
        cfg.method.loss_type,
        cfg.method.label_smoothing,
        None if global_logps is None else global_logps.float(),
        cfg.method.global_weight,
        None if n_tokens is None else n_tokens.float(),
        cfg.method.rpo_alpha,
        cfg.method.rpo_scope,
        cfg.method.dpop_lambda,
    )


def load_client(
    model: FedPDPOModel,
    shared: dict[str, torch.Tensor],
    state: ClientState,
    initial,
    personal: bool = False,
) -> None:
    """Put the global shared tensors and this client's local tensors (or the initial ones) into ``model``; with
    ``personal``, the client's personal copies of shared tensors (Ditto: kept in the client state, used by the
    client's own model for evaluation and export) replace the global ones."""
    local_names = [n for n in model.trainable() if n not in shared]
    model.set_tensors({n: state.local.get(n, initial[n]) for n in local_names})
    model.set_tensors(shared)
    if personal:
        model.set_tensors(personal_copies(state.local))


@dataclass
class _Steps:
    """One run of local steps: what to optimise, how long, the pull towards an anchor, the batch order's seed."""

    optimizer: torch.optim.Optimizer
    params: dict[str, torch.nn.Parameter]
    shared_names: set[str]
    seed: int
    steps: int
    anchor: dict[str, torch.Tensor] | None = None  # proximal term mu/2 * ||w - anchor||^2 on these tensors
    mu: float = 0.0
    # The first local_only_steps train only the local tensors (FedRep's head phase, FedPDPO's personal-first steps);
    # the rest train all of them, or only the shared ones with shared_only_after (FedRep's representation phase).
    local_only_steps: int = 0
    shared_only_after: bool = False


def backpropagate(loss: torch.Tensor, local_loss: torch.Tensor | None, local_params: Sequence[torch.Tensor]) -> None:
    """Gradients of ``loss`` for every trainable tensor, plus those of ``local_loss`` (the NLL with ``rpo_scope =
    "local"``) for the client's local tensors only: an extra backward through the head and the adapter, so that the
    shared LoRA's gradient is exactly the one without that term."""
    if local_loss is not None and local_params:
        local_loss.backward(inputs=list(local_params), retain_graph=True)
    loss.backward()


def _run_steps(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    cfg: RunConfig,
    run: _Steps,
    on_step: Callable[[int, dict[str, float]], None] | None,
) -> dict[str, float]:
    """``run.steps`` DPO steps on the client's training pairs; returns the mean of each step metric."""
    device = device_of(cfg)
    torch.manual_seed(run.seed)
    gen = torch.Generator().manual_seed(run.seed)
    shared_params = [p for n, p in run.params.items() if n in run.shared_names]
    local_params = [p for n, p in run.params.items() if n not in run.shared_names]
    anchor = None if run.anchor is None else [(run.params[n], a.to(device)) for n, a in run.anchor.items()]
    model.train()
    n = len(task.train)
    order: list[int] = []
    sums: dict[str, float] = {}
    ref_table = reference_table(state, "train", n)
    for step in range(run.steps):
        while len(order) < cfg.batch_size:
            order.extend(torch.randperm(n, generator=gen).tolist())
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        # de-duplicate when the client has fewer pairs than the batch size
        batch = collate([task.train[i] for i in dict.fromkeys(idx)], task.pad_id).to(device)
        with autocast(cfg, model):
            need_ref = cfg.perf.fused_reference and bool(torch.isnan(ref_table[batch.index]).any())
            # a cached reference goes to the device with the batch, before the forward pass is queued (a copy to
            # a GPU after it would wait for it to finish)
            ref = None if need_ref else _ref_for(batch, ref_table, device)
            out = model(batch, with_reference=need_ref)
            if ref is None:
                _store_reference(batch, out.ref_logps, ref_table)
                ref = _ref_for(batch, ref_table, device)
            result = objective(out.logps, ref, out.rewards, cfg, out.global_logps, out.n_tokens)
        loss = result.loss
        if anchor is not None:
            loss = loss + 0.5 * run.mu * sum(((p - a) ** 2).sum() for p, a in anchor)
        run.optimizer.zero_grad(set_to_none=True)
        backpropagate(loss, result.local_loss, local_params)
        frozen = shared_params if step < run.local_only_steps else local_params if run.shared_only_after else []
        for p in frozen:
            p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(list(run.params.values()), cfg.max_grad_norm)
        # the step's only wait for the device: every metric, the loss and the gradient norm in one copy
        metrics = read_scalars(result.values | {"grad_norm": grad_norm, OBJECTIVE: loss})
        if not math.isfinite(metrics.pop(OBJECTIVE)) or not math.isfinite(metrics["grad_norm"]):
            raise FloatingPointError(f"client {task.client_id}: non-finite loss or gradient at step {step}")
        run.optimizer.step()
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + v
        if on_step is not None:
            on_step(step, metrics)
    model.eval()
    return {k: v / run.steps for k, v in sums.items()}


def fit(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    shared: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    instructions: Mapping[str, int | float] | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train the client starting from the global ``shared`` tensors, as the strategy's ``instructions`` for the
    round say (:mod:`fedpdpo.instructions`; none: ``cfg.local_steps`` plain DPO steps).

    With ``ditto-lambda`` (Ditto) the client then trains its personal copy of the shared tensors for another
    ``personal-steps`` steps, pulled towards this round's global tensors; only the first result is sent. The
    metrics include ``steps``, the gradient steps the client ran in the round (both passes).
    """
    plan = FitPlan.parse(instructions, cfg.local_steps)
    device = device_of(cfg)
    model.to(device)
    load_client(model, shared, state, initial)
    # With perf.fused_reference the training pairs' reference is computed inside the steps that first see them.
    ensure_reference(model, task, state, cfg, ("test",) if cfg.perf.fused_reference else ("train", "test"))

    params = model.trainable()
    optimizer = adamw(optimizer_groups(params, cfg), cfg, device)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    seed = derive_seed(cfg.seed, server_round, task.client_id)
    anchor = {n: params[n].detach().clone() for n in shared} if plan.proximal_mu > 0 else None
    run = _Steps(
        optimizer,
        params,
        set(shared),
        seed,
        plan.pass_steps,
        anchor,
        plan.proximal_mu,
        local_only_steps=plan.head_steps or plan.personal_first_steps,
        shared_only_after=plan.head_steps > 0,
    )
    metrics = _run_steps(model, task, state, cfg, run, on_step)
    online_steps = 0
    if cfg.method.online_pairs > 0:
        online, online_steps = _fit_online(
            model, task, cfg, run, derive_seed(cfg.seed, server_round, task.client_id, 2)
        )
        metrics |= online
    if model.gated:  # where the client's scales of the shared LoRA stand after the round (docs/method.md)
        gate = model.gate_weight.detach()
        metrics |= read_scalars({f"lora_gate/{stat}": getattr(gate, stat)() for stat in ("mean", "min", "max")})
    update = to_wire(model.get_tensors(list(shared)), cfg.transfer_dtype)
    personal = personal_copies(state.local)  # Ditto's copies, kept aside: state.local is rebuilt below
    state.local = model.get_tensors([n for n in params if n not in shared])
    state.optimizer = optimizer.state_dict()
    if plan.ditto_lambda > 0:
        metrics.update(_fit_personal(model, task, state, shared, personal, cfg, server_round, plan))
    metrics["steps"] = float(plan.total_steps + online_steps)
    state.rounds_trained += 1
    return FitResult(update, len(task.train), metrics, state)


def _fit_online(model: FedPDPOModel, task: ClientTask, cfg: RunConfig, run: _Steps, seed: int) -> tuple[dict, int]:
    """DPO steps on pairs of the client's own samples labelled by its own score (:mod:`fedpdpo.client.online`),
    with the round's optimizer, on every tensor the round trains (only the local ones with
    ``method.online_local_only``). The explicit reward loss and the NLL are off for
    these pairs: the reward head would only learn its own labels back, and an NLL on the policy's own samples would
    reinforce whatever it writes, loops included. Returns the metrics (``online/...``) and the steps taken."""
    model.eval()
    with autocast(cfg, model):
        own = own_pairs(model, task, cfg, seed)
    if not own.pairs:
        return own.metrics, 0
    steps = cfg.method.online_steps or math.ceil(len(own.pairs) / cfg.batch_size)
    pairs_task = dataclasses.replace(task, train=own.pairs, val=[], test=[])
    pairs_state = ClientState(reference={"train": own.reference})
    method = dataclasses.replace(cfg.method, reward_weight=0.0, rpo_alpha=0.0)
    local_only = steps if cfg.method.online_local_only else 0
    steps_run = dataclasses.replace(
        run, seed=derive_seed(seed, 1), steps=steps, local_only_steps=local_only, anchor=None
    )
    metrics = _run_steps(model, pairs_task, pairs_state, dataclasses.replace(cfg, method=method), steps_run, None)
    keep = ("loss", "rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    return own.metrics | {f"online/{k}": v for k, v in metrics.items() if k in keep}, steps


def _fit_personal(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    shared: dict[str, torch.Tensor],
    personal: dict[str, torch.Tensor],
    cfg: RunConfig,
    server_round: int,
    plan: FitPlan,
) -> dict[str, float]:
    """Ditto's personal solver: ``min_v L_DPO(v) + lambda/2 * ||v - w_global||^2`` over the personal copy ``v`` of
    the shared tensors (initialised from the global ones), with the client's local tensors as just trained.

    The personal copies and their optimizer state are stored in the client state; the optimizer is AdamW at
    ``lr`` over the shared tensors' names only (the local modules were trained by the federated pass)."""
    copies = {n: personal.get(n, shared[n]) for n in shared}
    model.set_tensors(copies)
    params = {n: p for n, p in model.trainable().items() if n in shared}
    optimizer = adamw(params.values(), cfg, device_of(cfg))
    if state.personal_optimizer is not None:
        optimizer.load_state_dict(state.personal_optimizer)
    seed = derive_seed(cfg.seed, server_round, task.client_id, 1)
    run = _Steps(optimizer, params, set(shared), seed, plan.personal_steps, dict(shared), plan.ditto_lambda)
    metrics = _run_steps(model, task, state, cfg, run, None)
    state.local.update({PERSONAL + n: v for n, v in model.get_tensors(list(params)).items()})
    state.personal_optimizer = optimizer.state_dict()
    return {f"personal_{k}": v for k, v in metrics.items() if k in ("loss", "rewards/accuracies")}


#: The scores a client can rank pairs by (see :func:`evaluate`); ``selected_score`` in the metrics is an index here.
SCORES = ("implicit", "combined", "explicit", "global")


@dataclass
class _SplitScores:
    """Per-pair margins of one split under the client's models, and the objective's metrics on it."""

    margins: dict[str, torch.Tensor]  # score name -> [n] margin (chosen minus rejected)
    metrics: dict[str, float]
    logp: torch.Tensor  # length-normalised policy log-prob margin


def _reference_output(model: FedPDPOModel, batch: PairBatch, ref_table: torch.Tensor) -> PolicyOutput:
    """What ``model(batch, with_global=True)`` gives while the policy is the reference
    (:meth:`FedPDPOModel.at_reference`), without running it: the cached reference log-probs (computed on the same
    batches) for the policy and the global policy, and the zero reward head's zeros."""
    logps = _ref_for(batch, ref_table, batch.input_ids.device)
    rewards = torch.zeros_like(logps) if "reward_head" in model.local else None
    return PolicyOutput(logps, rewards, batch.response_mask[:, 1:].sum(1), global_logps=logps)


def _implicit_margin(logps: torch.Tensor, ref: torch.Tensor, num_pairs: int, beta: float) -> torch.Tensor:
    """``beta * ((pi - ref)_chosen - (pi - ref)_rejected)`` of a batch laid out [chosen..., rejected...]."""
    b = num_pairs
    return (beta * ((logps[:b] - ref[:b]) - (logps[b:] - ref[b:]))).cpu()


def _score_split(
    model: FedPDPOModel,
    pairs: list[TokenizedPair],
    ref_table: torch.Tensor,
    cfg: RunConfig,
    pad_id: int,
    at_reference: bool = False,
    with_global: bool = False,
) -> _SplitScores:
    """The personalized model's implicit, explicit and combined margins on ``pairs`` (and the objective); with
    ``at_reference`` (the policy is the reference) from the cached reference alone; with ``with_global`` also the
    global policy's implicit margins (``global``), from the same forward call: only valid while the client's LoRA is
    the global one (no personal copies), and identical to :func:`_global_margins` then."""
    device = device_of(cfg)
    sides: dict[str, list[torch.Tensor]] = {"logps": [], "ref": [], "rewards": [], "n_tokens": []}  # per batch
    logp_margin, explicit, global_margin = [], [], []
    for batch in _batches(pairs, cfg.eval_batch_size, pad_id, device):
        if at_reference:
            out = _reference_output(model, batch, ref_table)
        else:
            with autocast(cfg, model):
                out = model(batch, with_global=with_global)
        b = batch.num_pairs
        logps = out.logps.float()
        ref = _ref_for(batch, ref_table, device)
        sides["logps"].append(logps.cpu())
        sides["ref"].append(ref.cpu())
        sides["n_tokens"].append(out.n_tokens.cpu())
        if with_global:
            assert out.global_logps is not None
            global_margin.append(_implicit_margin(out.global_logps.float(), ref, b, cfg.beta))
        per_tok = logps / out.n_tokens.clamp_min(1).float()
        logp_margin.append((per_tok[:b] - per_tok[b:]).cpu())
        if out.rewards is not None:
            sides["rewards"].append(out.rewards.float().cpu())
            explicit.append((out.rewards[:b] - out.rewards[b:]).float().cpu())

    def laid_out(key: str) -> torch.Tensor:
        """All pairs laid out [chosen..., rejected...], as the objective takes a batch."""
        halves = [t.chunk(2) for t in sides[key]]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])

    rewards = laid_out("rewards") if explicit else None
    result = objective(laid_out("logps"), laid_out("ref"), rewards, cfg, n_tokens=laid_out("n_tokens"))
    margins = {"implicit": result.margins}
    if explicit:
        exp = torch.cat(explicit)
        margins |= {"explicit": exp, "combined": result.margins + cfg.method.eval_reward_weight * exp}
    if with_global:
        margins["global"] = torch.cat(global_margin)
    # pairs are visited in length-bucketed order; the margins above follow that order consistently
    return _SplitScores(margins, result.metrics, torch.cat(logp_margin))


@torch.no_grad()
def _global_margins(
    model: FedPDPOModel,
    pairs: list[TokenizedPair],
    ref_table: torch.Tensor,
    cfg: RunConfig,
    pad_id: int,
    at_reference: bool = False,
) -> torch.Tensor:
    """Implicit margins of the global policy (shared tensors as loaded, no local modules, original head); with
    ``at_reference`` (zero LoRA: the global policy is the reference) from the cached reference alone."""
    device = device_of(cfg)
    margins = []
    for batch in _batches(pairs, cfg.eval_batch_size, pad_id, device):
        ref = _ref_for(batch, ref_table, device)
        if at_reference:
            logps = ref
        else:
            with autocast(cfg, model):
                logps = model.global_logps(batch).float()
        margins.append(_implicit_margin(logps, ref, batch.num_pairs, cfg.beta))
    return torch.cat(margins)


def _choose(val: dict[str, torch.Tensor], eval_score: str, switch_z: float = 1.645) -> str:
    """The score a client ranks by: ``eval_score`` when fixed; with ``auto`` its own score (combined with a reward
    head, else implicit) unless another candidate ranks the client's validation pairs better by more than
    ``switch_z`` paired standard errors, and then the most accurate of those (ties go to the own score, then to the
    earlier of :data:`SCORES`). Without validation pairs, its own score.

    The paired statistic of candidate ``c`` against the own score ``o``: with ``d_i`` the difference of their
    correctness on pair ``i`` (1, 0.5 for a margin of exactly 0, or 0 each), ``sum(d) / sqrt(sum(d^2))``, McNemar's
    statistic over the pairs on which the two disagree. Why a guard: with a few dozen validation pairs the plain
    most-accurate candidate is often a lucky one (docs/results.md, "Choosing the score on few validation pairs");
    ``switch_z = 0`` switches on any strict gain."""
    if eval_score != "auto":
        return eval_score
    candidates = [name for name in SCORES if name in val]
    own = "combined" if "combined" in candidates else "implicit"
    if not val or next(iter(val.values())).numel() == 0:
        return own
    correct = {name: pairwise_correct(val[name]) for name in candidates}
    eligible = [own]
    for name in candidates:
        d = correct[name] - correct[own]
        spread = d.pow(2).sum().sqrt()
        if name != own and spread > 0 and (d.sum() / spread).item() > switch_z:
            eligible.append(name)
    return max(eligible, key=lambda name: (correct[name].mean().item(), name == own, -SCORES.index(name)))


@torch.no_grad()
def evaluate(
    model: FedPDPOModel,
    task: ClientTask,
    state: ClientState,
    shared: dict[str, torch.Tensor],
    initial: dict[str, torch.Tensor],
    cfg: RunConfig,
    score: str | None = None,
    global_policy: bool = True,
) -> dict[str, float]:
    """Held-out metrics of the client's model: the training objective's metrics under the same names
    (:func:`objective` over all test pairs: ``loss``, ``loss/dpo``, ``rewards/margins``, ...) and the preference
    accuracy by each score, on the test pairs and (``val/`` keys) on the client's validation pairs.

    Scores: ``implicit`` ``beta * h`` of the personalized policy (DPO's reward margin); ``explicit``
    ``r(x, y_w) - r(x, y_l)``; ``combined`` ``beta * h + alpha * (r(x, y_w) - r(x, y_l))``; ``global`` the implicit
    margin of the global policy (shared tensors, no local modules: what the client gets without personalizing);
    ``logp`` the length-normalised policy log-prob margin (reported, never chosen). ``accuracy`` is the test accuracy
    of the score chosen by ``method.eval_score``; ``auto`` chooses on the client's validation pairs, so a client
    whose own modules do not beat the global model on its data falls back to it. ``score`` (one of :data:`SCORES`)
    overrides that choice, e.g. to rank another client's pairs by the score this client chose. Ties count half.
    ``global_policy = False`` leaves the global policy's margins out (no ``accuracy_global``; the policy the client
    would generate with is then its own): a pass less where only the client's own model is asked about.
    """
    device = device_of(cfg)
    model.to(device)
    load_client(model, shared, state, initial, personal=True)
    splits = ("test", "val") if task.val else ("test",)
    ensure_reference(model, task, state, cfg, splits)
    model.eval()
    # Round 0 of a strategy whose policy starts at the reference: the policy's log-probs are the reference's, bit
    # for bit, so they are taken from the cache (same metrics, no forward pass; see _reference_output).
    skip = cfg.perf.skip_reference_eval and model.at_reference()
    copies = bool(personal_copies(state.local))
    # the global policy differs from the client's own: score it too, in the same forward call unless Ditto's
    # personal copies replace the global LoRA in the client's model
    fused = global_policy and bool(len(model.local)) and bool(shared) and not copies
    scores = {s: _score_split(model, task.split(s), state.reference[s], cfg, task.pad_id, skip, fused) for s in splits}
    if global_policy and copies and shared:
        load_client(model, shared, state, initial)  # global shared tensors (Ditto: not the personal copies)
        skip = cfg.perf.skip_reference_eval and model.lora_is_zero()
        for s in splits:
            ref = state.reference[s]
            scores[s].margins["global"] = _global_margins(model, task.split(s), ref, cfg, task.pad_id, skip)
    test = scores["test"]
    metrics = test.metrics | {
        f"accuracy_{name}": pairwise_accuracy(margin).item() for name, margin in test.margins.items()
    }
    metrics |= {"accuracy_logp": pairwise_accuracy(test.logp).item(), "reward_margin": test.metrics["rewards/margins"]}
    if "explicit" in test.margins:
        metrics["explicit_margin"] = test.margins["explicit"].mean().item()
    val = scores["val"].margins if "val" in scores else {}
    metrics |= {f"val/accuracy_{name}": pairwise_accuracy(margin).item() for name, margin in val.items()}
    chosen = score or _choose(val, cfg.method.eval_score, cfg.method.switch_z)
    metrics["selected_score"] = float(SCORES.index(chosen))
    metrics["accuracy"] = metrics[f"accuracy_{chosen}"]
    # The policy the client would generate with: its own, unless the global one ranks its validation pairs clearly
    # better (the same guard).
    policy = _choose({k: v for k, v in val.items() if k in ("implicit", "global")}, "auto", cfg.method.switch_z)
    metrics["selected_policy"] = float(policy == "implicit")  # 1: the client's own policy, 0: the global one
    metrics["accuracy_policy"] = metrics[f"accuracy_{policy}"]
    return metrics
