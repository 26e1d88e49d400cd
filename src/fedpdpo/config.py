"""Run configuration: dataclasses loaded from TOML, overridable with ``--set key=value``.

The TOML file mirrors the dataclasses: top-level keys are :class:`RunConfig` fields and the tables ``[lora]``,
``[method]``, ``[data]`` and ``[partition]`` map to the nested dataclasses. Unknown keys and wrongly typed values
are errors that name the dotted key, because a silently ignored typo (``lr`` vs ``lr_``) wastes an hour of training.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from fedpdpo.errors import ConfigError

#: The experiment trackers ``report_to`` may name (fedpdpo/report/tracking.py).
TRACKERS = ("tensorboard", "trackio", "wandb")


@dataclass
class LoraSettings:
    """The globally shared LoRA adapter (mirrors ``peft.LoraConfig``)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Apply LoRA only to the last N transformer layers (0 = all layers). Frozen layers below the lowest LoRA layer
    # need no backward pass and their output is cached across steps, so this is the main knob for CPU training
    # speed; every result in docs/results.md since 29 November used 4.
    last_n_layers: int = 4


@dataclass
class MethodConfig:
    """The FedPDPO objective and the per-client (local) modules.

    Baselines and ablations are the same objective with some modules switched off; see docs/method.md.
    """

    loss_type: Literal["sigmoid", "ipo"] = "sigmoid"
    label_smoothing: float = 0.0
    # lambda: weight of the explicit-reward Bradley-Terry loss.
    reward_weight: float = 1.0
    # gamma: weight of the DPO loss of the global policy (shared LoRA with the original head, no local modules),
    # trained next to the client's own so that the shared tensors stay a good policy by themselves (0 = off).
    global_weight: float = 0.0
    # rpo_alpha: weight of the chosen responses' per-token NLL added to the loss (RPO; TRL's DPOConfig.rpo_alpha). Keeps
    # the policies generating fluent text of the kind each client chose (docs/method.md, "Objective").
    rpo_alpha: float = 0.1
    # Which tensors that NLL trains: "all" (TRL's RPO: the shared LoRA too) or "local" (only the client's own modules,
    # so the shared LoRA is trained by DPO alone and the clients' NLL on opposite kinds of text does not pull it
    # towards the majority's kind; docs/method.md, "Objective").
    rpo_scope: Literal["all", "local"] = "all"
    # dpop_lambda: DPOP's weight (Pal et al. 2024, "DPO-Positive"; 50 in the paper): inside the DPO loss, a penalty
    # of dpop_lambda nats of margin per nat that the chosen response falls below the reference, against the
    # likelihood displacement that takes the policy's mass off both sides (docs/method.md, "Objective"). 0 = off.
    dpop_lambda: float = 0.0
    # alpha: weight of the explicit reward margin in the combined evaluation score.
    eval_reward_weight: float = 1.0
    personal_head: bool = True
    reward_head: bool = True
    adapter: bool = True
    adapter_dim: int = 64
    reward_pooling: Literal["mean", "last"] = "mean"
    # Which hidden state the explicit reward head reads. 0: the final one, after the bottleneck adapter (the method
    # as specified). k > 0: the output of decoder layer k (hidden_states[k] in transformers' numbering), which must
    # lie in the frozen prefix below the first LoRA layer (docs/method.md, "Reward layer").
    reward_layer: int = 0
    # Which score ranks chosen vs rejected for the headline accuracy.
    eval_score: Literal["auto", "implicit", "explicit", "combined"] = "auto"
    # With eval_score = "auto": how many paired standard errors another score (or, for generating, the global policy)
    # must beat the client's own on its validation pairs before the client switches to it (0: any strict gain;
    # 1.645: a one-sided paired test at 5 %). With a few dozen validation pairs the plain most accurate candidate is
    # often a lucky one; cross-fitted on validation pairs the guard ranks held-out pairs better (docs/method.md).
    switch_z: float = 1.645
    # Learning rate multiplier for the local modules (the adapter; the personal head too unless head_lr_scale > 0).
    local_lr_scale: float = 1.0
    # Learning rate multiplier for the explicit reward head (a linear probe: it needs a larger step).
    reward_lr_scale: float = 10.0
    # Learning rate multiplier for the personalized LM head alone (0: local_lr_scale, as the adapter). Adam moves
    # every one of the head's vocabulary rows by about lr per step, however small its gradient, so a step that
    # suits the 74k-weight adapter distorts the 28M-weight head's whole output distribution (docs/method.md).
    head_lr_scale: float = 0.05
    # FedPDPO: a learned per-client scale of each shared LoRA update (``W x + g_m * B_m A_m x``, one scalar g_m per
    # adapted module, starting at 1, kept on the client). A client whose preferences oppose the majority's can turn
    # the shared direction down or around in its own policy (docs/method.md, "LoRA gate"). Its step is
    # ``lr * gate_lr_scale``: one scalar per module needs a step near the scale of the change it makes.
    lora_gate: bool = False
    gate_lr_scale: float = 50.0
    # On-policy pairs (docs/method.md, "On-policy pairs"): after its DPO steps on its own pairs, each round the
    # client samples online_pairs pairs of responses from its personalized policy (two per prompt, prompts drawn
    # from its training pairs, at online_temperature), labels each pair by its own score (the explicit reward
    # head; the implicit reward without one) and takes online_steps DPO steps on them (0: one pass, i.e.
    # ceil(online_pairs / batch_size)). Why: the offline pairs are human text the policy would not write, and
    # what it learns on them barely moves what it samples; these pairs are what it writes. 0 = off.
    online_pairs: int = 0
    online_steps: int = 0
    online_temperature: float = 1.0
    # Samples per prompt for the on-policy pairs: with N > 2 a pair is the one of N the client's own score ranks
    # first against the one it ranks last. Why: a reward head trained on a hundred human reviews orders two similar
    # samples of the policy little better than chance (docs/results.md), while its best of N leans clearly to its
    # client's side (the judge's best_of row); the extremes of N give the pair that difference.
    online_candidates: int = 2
    # A sampled response whose share of repeated token trigrams exceeds online_max_repeat is a loop: never the
    # chosen side of an on-policy pair, and the rejected side first (the lowest-scored loop of the N). Why: a
    # reward head trained on a hundred human reviews can rank loops above the policy's fluent samples, and DPO then
    # teaches them (docs/results.md, "On-policy pairs from the best and the worst of 8"). 1 = off.
    online_max_repeat: float = 1.0
    # Whether the on-policy steps train only the client's local modules (the shared LoRA frozen, as in the
    # personal-first steps). Why: the client is sampled and judged with the *aggregated* LoRA, so a shift its
    # on-policy steps put into its local LoRA is averaged away with the other clients'; a client in the minority
    # (a conflict client) keeps only what its adapter and head learned. False = every tensor the round trains.
    online_local_only: bool = False
    # Parameters of the strategies that use them (others ignore them); the strategy sends them to its clients
    # with each round's instructions. FedProx: proximal term weight mu on the shared parameters (0 = its default).
    proximal_mu: float = 0.0
    # FedRep: the first head_steps local steps of a round train only the local modules, the rest only the shared
    # tensors (0 = its default, half of local_steps).
    head_steps: int = 0
    # FedPDPO: extra steps at the start of each round that train only the local modules against the global shared
    # tensors just received, before the joint steps (0 = off; docs/method.md, "Personal-first steps").
    personal_first_steps: int = 0
    # Ditto: weight lambda of the pull of each client's personal copy of the shared tensors towards the global ones
    # (0 = its default).
    ditto_lambda: float = 0.0


@dataclass
class DataConfig:
    path: str = ""
    # More files whose records are appended (e.g. a second domain for the cross-domain setting).
    extra_paths: list[str] = field(default_factory=list)
    # Optional separate test file; otherwise the records' ``split`` field ("test") or a random test_fraction.
    test_path: str = ""
    test_fraction: float = 0.2
    max_train_per_client: int = 0  # 0 = no cap
    max_test_per_client: int = 0
    on_bad_record: Literal["error", "skip"] = "error"
    # Prompt budget in tokens, chat template included (0 = chosen per client from its data, see data/lengths.py).
    # Longer prompts lose tokens from the start of their content; the template is never cut.
    max_prompt_length: int = 0
    # Share of each client's training pairs held out as its validation pairs (decisions on the client's own data).
    validation_fraction: float = 0.2
    # Column names of the data, by standard name: {prompt = "question", chosen = "good", rejected = "bad"}.
    fields: dict[str, str] = field(default_factory=dict)
    # Which ``split`` value (or split of a datasets.DatasetDict) holds the held-out test pairs.
    test_split: str = "test"
    # partition.method = "by_file": the test file of each of extra_paths, in the same order ("" = none: that file's
    # split field or test_fraction); test_path is then the test file of path.
    extra_test_paths: list[str] = field(default_factory=list)


@dataclass
class PartitionConfig:
    # by_file: one client per data file (data.path, then data.extra_paths), each file its client's whole data, as
    # in a deployment where every node holds its own file (data/files.py).
    method: Literal["iid", "dirichlet", "by_domain", "by_file"] = "iid"
    alpha: float = 0.5
    label: str = "domain"
    # by_domain: explicit domain groups, one list per client; empty = one domain (sorted) per client.
    domains: list[list[str]] = field(default_factory=list)
    # Fraction of clients whose preferences are swapped (they prefer the rejected side).
    conflict_fraction: float = 0.0


@dataclass
class PrivacyConfig:
    """Central differential privacy on the shared update (Flower engines; see docs/deployment.md).

    Each client's update of the shared tensors is clipped to L2 norm ``clipping_norm`` on its node (Flower's
    ``fixedclipping_mod``) and the server adds Gaussian noise of std ``noise_multiplier * clipping_norm / n_sampled``
    to the aggregate. 0 switches each part off.
    """

    clipping_norm: float = 0.0
    noise_multiplier: float = 0.0
    # Flower's SecAgg+: the server only sees the sum of the sampled clients' shared tensors (Flower engines).
    secagg: bool = False


@dataclass
class PerfSettings:
    """Switches for the local-training optimizations, each on by default (see docs/performance.md for what each
    one gives). They change speed and memory only: results match the switched-off path up to float rounding."""

    # Run the frozen layers below the lowest LoRA layer once per batch, under no_grad, and feed their output to
    # both the reference (adapter off) and the policy (adapter on). Needs lora.last_n_layers > 0.
    shared_prefix: bool = True
    # Compute a training pair's reference log-probs inside the first training step that sees it (from the shared
    # prefix) instead of in a separate pass over the whole training split before training.
    fused_reference: bool = True
    # Project only response positions through the output head (off: every non-padding position, as TRL does).
    response_only_logits: bool = True
    # Run the output head's log-softmax forward (fp32 logsumexp) and backward (softmax gradient of the logits) as
    # one torch.compile'd loop each instead of autograd's several passes over the [tokens, vocabulary] logits; the
    # same formulas run eagerly where compilation fails (fedpdpo.model.head_logps).
    compiled_head: bool = True
    # Keep each sequence's frozen-prefix hidden states in memory (per process, keyed by token ids) and reuse them
    # in later steps, rounds and evaluations: only the LoRA layers and the heads run again. Needs shared_prefix.
    # CPU only: on a GPU the frozen layers run batched every step, which is faster there (FrozenPrefix.caches).
    prefix_cache: bool = True
    # Memory bound of that cache in MiB (fp32 SmolLM2: about 0.22 MiB per 100-token sequence); when full, further
    # sequences are recomputed each time, with the same values.
    prefix_cache_mb: int = 2048
    # Evaluate a policy that is still the reference bit for bit (round 0 of every strategy that starts from it: zero
    # LoRA update, personal head = original head, adapter and reward head zero) from the cached reference log-probs
    # instead of running it: same metrics, no policy forward.
    skip_reference_eval: bool = True
    # Under bf16 autocast, run the frozen Linear layers on bf16 copies of their weights made once per model, instead
    # of letting autocast cast each fp32 weight at every call (its cast cache keeps only trainable tensors). The
    # copies are the values autocast would compute, so results are bit for bit the same; costs half the frozen
    # Linear weights' fp32 size in memory.
    frozen_low_precision_copy: bool = True


@dataclass
class RunConfig:
    algorithm: str = "fedpdpo"
    model: str = "smollm2"
    seed: int = 0
    device: str = "auto"
    # Arithmetic of the forward passes: "auto" = bf16 autocast where the hardware has bf16 units (CUDA, CPUs with
    # AVX512-BF16 / AMX), else fp32; "fp32"; "bf16" (forced). Weights, optimizer and reductions stay fp32.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # Storage of the frozen backbone's linear layers: "none" (fp32) or "4bit" (NF4 via bitsandbytes, CUDA only: how
    # federated LLM clients fit 7B backbones on one GPU; LoRA, heads and optimizer stay fp32). Needs the `quant` extra.
    model_quantization: Literal["none", "4bit"] = "none"
    num_clients: int = 3
    rounds: int = 3
    local_steps: int = 16
    batch_size: int = 8
    eval_batch_size: int = 16
    # Prompt + response tokens (0 = chosen per client from its data, see data/lengths.py).
    max_length: int = 0
    lr: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    beta: float = 0.1
    client_fraction: float = 1.0
    threads: int = 0  # 0 = torch default
    # Which round's model each client ends with (the summary's accuracies, `evaluate`, `export`, `generate`): "last",
    # or "best_val": the round whose model did best on the client's own validation pairs (mean of the accuracy of
    # the score it ranks by and of its policy's implicit reward; ties: the later round), kept as the shared tensors
    # it received then plus its local modules of then. Early stopping per client on its own held-out training pairs
    # (fedpdpo/client/selection.py).
    select_round: Literal["last", "best_val"] = "best_val"
    # Precision of the shared tensors on the wire, both directions (see fedpdpo/transfer.py).
    transfer_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    # Experiment trackers the run logs to, as transformers' and TRL's ``report_to``: "tensorboard", "trackio",
    # "wandb" (each an optional package; empty = none). See fedpdpo/report/tracking.py.
    report_to: list[str] = field(default_factory=list)
    lora: LoraSettings = field(default_factory=LoraSettings)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    perf: PerfSettings = field(default_factory=PerfSettings)

    # The data and model paths as written in the config file or on the command line, before ``load_config`` made
    # them absolute (dotted key -> text). Not a setting: saved as comments in config.toml, for the reader.
    given_paths: dict[str, str] = field(default_factory=dict, compare=False, repr=False, metadata={"saved": False})

    def validate(self) -> None:
        """Check every value's range; raise :class:`ConfigError` naming the key.

        NaN and infinity are never valid: ``lr = nan`` would otherwise pass every ``<=`` check and only fail rounds
        later, after the run directory was written.
        """
        for key, value in _flatten_values(self):
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
        for key, allowed in RANGES.items():
            value = _get(self, key)
            if not allowed.contains(value):
                raise ConfigError(f"config key '{key}' must be {allowed.describe()}, got {value}")
        for key in ("model", "partition.label"):
            if not _get(self, key).strip():
                raise ConfigError(f"config key '{key}' is empty")
        unknown_trackers = [name for name in self.report_to if name not in TRACKERS]
        if unknown_trackers:
            raise ConfigError(
                f"config key 'report_to' names {unknown_trackers[0]!r}; known: {', '.join(TRACKERS)} (or [] for none)"
            )
        if not self.lora.target_modules or not all(m.strip() for m in self.lora.target_modules):
            raise ConfigError(
                f"config key 'lora.target_modules' must name at least one module, got {self.lora.target_modules}"
            )
        unknown = sorted(set(self.data.fields) - {"prompt", "chosen", "rejected", "domain", "split"})
        if unknown:
            raise ConfigError(
                f"config key 'data.fields' maps unknown field(s) {unknown}; map prompt, chosen, rejected, domain, split"
            )
        if self.max_length and self.data.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"config key 'data.max_prompt_length' ({self.data.max_prompt_length}) must be smaller than "
                f"'max_length' ({self.max_length}) so that responses keep at least one token"
            )
        if self.privacy.noise_multiplier > 0 and self.privacy.clipping_norm <= 0:
            raise ConfigError("config key 'privacy.noise_multiplier' > 0 needs 'privacy.clipping_norm' > 0")
        if self.privacy.secagg and self.privacy.clipping_norm > 0:
            raise ConfigError("config keys 'privacy.secagg' and 'privacy.clipping_norm' cannot be combined (yet)")
        if self.transfer_dtype != "float32" and (self.privacy.secagg or self.privacy.clipping_norm > 0):
            raise ConfigError(
                "config key 'transfer_dtype' must be 'float32' with 'privacy.secagg' or 'privacy.clipping_norm' "
                "(Flower's SecAgg+ and clipping mods work on fp32 arrays)"
            )
        if self.privacy.secagg and round(self.client_fraction * self.num_clients) < 2:
            raise ConfigError("config key 'privacy.secagg' needs at least 2 clients per round")
        if any(not p for p in self.data.extra_paths):
            raise ConfigError("config key 'data.extra_paths' holds an empty path")
        if self.data.extra_paths and not self.data.path:
            raise ConfigError("config key 'data.extra_paths' is set but 'data.path' is empty")
        self._validate_by_file()
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"config key 'device' must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.method.eval_score in ("explicit", "combined") and not self.method.reward_head:
            raise ConfigError(
                f"config key 'method.eval_score' is {self.method.eval_score!r} but 'method.reward_head' is false; "
                'use eval_score = "implicit"'
            )

    def _validate_by_file(self) -> None:
        """``partition.method = "by_file"``: one client per file; files are participants, not a simulation."""
        extra_tests = self.data.extra_test_paths
        if self.partition.method != "by_file":
            if extra_tests:
                raise ConfigError("config key 'data.extra_test_paths' needs partition.method = \"by_file\"")
            return
        n_files = 1 + len(self.data.extra_paths) if self.data.path else 0
        if self.num_clients != n_files:
            raise ConfigError(
                f"partition.method = \"by_file\" makes one client per data file, but 'num_clients' is "
                f"{self.num_clients} and data.path + data.extra_paths name {n_files} file(s)"
            )
        if extra_tests and len(extra_tests) != len(self.data.extra_paths):
            raise ConfigError(
                f"config key 'data.extra_test_paths' must hold one entry per data.extra_paths file "
                f'({len(self.data.extra_paths)}, "" for none), got {len(extra_tests)}'
            )
        if self.partition.conflict_fraction > 0:
            raise ConfigError(
                "config key 'partition.conflict_fraction' must be 0 with partition.method = \"by_file\": each "
                "file already holds its participant's own preferences"
            )


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` bounds are open to infinity."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        low, high = _number(self.low), _number(self.high)
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {low}"
        return f"in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


def _number(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else f"{x}"


POSITIVE = Range(0, low_open=True)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)

#: The allowed range of every numeric config key (a test checks that none is missing).
RANGES: dict[str, Range] = {
    "seed": Range(0, 2**32, high_open=True),  # what every RNG accepts (numpy's limit)
    "num_clients": POSITIVE,
    "rounds": POSITIVE,
    "local_steps": POSITIVE,
    "batch_size": POSITIVE,
    "eval_batch_size": POSITIVE,
    "max_length": NON_NEGATIVE,  # 0 = chosen per client from its data
    "lr": POSITIVE,
    "weight_decay": NON_NEGATIVE,
    "max_grad_norm": POSITIVE,
    "beta": POSITIVE,
    "client_fraction": Range(0, 1, low_open=True),
    "threads": NON_NEGATIVE,
    "lora.r": POSITIVE,
    "lora.alpha": POSITIVE,
    "lora.dropout": Range(0, 1, high_open=True),
    "lora.last_n_layers": NON_NEGATIVE,
    "method.label_smoothing": Range(0, 0.5, high_open=True),  # at 0.5 the DPO loss ignores the labels
    "method.reward_weight": NON_NEGATIVE,
    "method.switch_z": NON_NEGATIVE,
    "method.eval_reward_weight": NON_NEGATIVE,
    "method.global_weight": NON_NEGATIVE,
    "method.rpo_alpha": NON_NEGATIVE,
    "method.dpop_lambda": NON_NEGATIVE,
    "method.online_pairs": NON_NEGATIVE,
    "method.online_steps": NON_NEGATIVE,
    "method.online_temperature": POSITIVE,
    "method.online_candidates": Range(2),
    "method.online_max_repeat": FRACTION,
    "method.adapter_dim": POSITIVE,
    "method.reward_layer": NON_NEGATIVE,
    "method.local_lr_scale": POSITIVE,
    "method.head_lr_scale": NON_NEGATIVE,
    "method.gate_lr_scale": POSITIVE,
    "method.reward_lr_scale": POSITIVE,
    "method.proximal_mu": NON_NEGATIVE,
    "method.head_steps": NON_NEGATIVE,
    "method.personal_first_steps": NON_NEGATIVE,
    "method.ditto_lambda": NON_NEGATIVE,
    "data.test_fraction": Range(0, 1, low_open=True, high_open=True),
    "data.max_train_per_client": NON_NEGATIVE,
    "data.max_test_per_client": NON_NEGATIVE,
    "data.max_prompt_length": NON_NEGATIVE,  # 0 = chosen per client from its data
    "data.validation_fraction": Range(0, 1, high_open=True),
    "partition.alpha": POSITIVE,
    "partition.conflict_fraction": FRACTION,
    "privacy.clipping_norm": NON_NEGATIVE,
    "privacy.noise_multiplier": NON_NEGATIVE,
    "perf.prefix_cache_mb": NON_NEGATIVE,
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _flatten_values(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every saved setting, nested dataclasses flattened."""
    items = []
    for f in dataclasses.fields(obj):
        if not f.metadata.get("saved", True):
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            items.extend(_flatten_values(value, f"{prefix}{f.name}."))
        else:
            items.append((f"{prefix}{f.name}", value))
    return items


def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce ``value`` to annotation ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {value!r}")
        return value
    if origin is dict:
        key_tp, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a table, got {type(value).__name__} {value!r}")
        return {_check_type(key, k, key_tp): _check_type(f"{key}.{k}", v, value_tp) for k, v in value.items()}
    if origin in (list,):
        (inner,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        return [_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
    if origin in (types.UnionType, typing.Union):
        raise ConfigError(f"internal: unsupported union annotation for '{key}'")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp in (int, float, str) and (not isinstance(value, tp) or isinstance(value, bool)):
        raise ConfigError(f"config key '{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("saved", True)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            known = ", ".join(sorted(names))
            raise ConfigError(f"unknown config key '{dotted}' (known keys here: {known})")
        tp = hints[key]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' must be a table [{dotted}]")
            kwargs[key] = _build(tp, value, prefix=f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, tp)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse ``key.sub=value``; the value is read as a TOML literal, else taken as a bare string."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    """Build and validate a config from TOML data plus ``--set`` overrides.

    Relative paths still in ``data`` after the overrides (those given on the command line) are made absolute
    against the working directory, which is what they meant when given: a saved run must not depend on where it is
    resumed from.
    """
    merged = _deep_copy(data)
    for text in overrides or []:
        path, value = parse_override(text)
        node = merged
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: '{part}' is not a table")
        node[path[-1]] = value
    given = _resolve_paths(merged, Path.cwd(), f"relative to the working directory {Path.cwd()}")
    cfg = _build(RunConfig, merged)
    cfg.validate()
    cfg.given_paths = given
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Load a TOML config file; relative ``data.*`` paths are resolved against the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    given = _resolve_paths(data, path.resolve().parent, f"in {path.resolve()}", model=False)
    cfg = config_from_dict(data, overrides)
    cfg.given_paths = _read_notes(text) | given | cfg.given_paths
    return cfg


def _absolute(text: str, base: Path) -> str:
    p = Path(text).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _resolve_paths(data: dict[str, Any], base: Path, where: str, model: bool = True) -> dict[str, str]:
    """Make the relative data paths (and, with ``model``, a relative model path) in ``data`` absolute against
    ``base``, in place; return the original text of each, by dotted key, as a note saying where it was given.

    A model path in a config file stays relative to the working directory (as it always was), so only the command
    line's pass resolves it; a built-in model name (no separator, no ``.gguf``) is not a path.
    """
    given: dict[str, str] = {}

    def resolve(key: str, value: Any) -> Any:
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            return value
        given[key] = f"{value!r} {where}"
        return _absolute(value, base)

    section = data.get("data")
    if isinstance(section, dict):
        for attr in ("path", "test_path"):
            if attr in section:
                section[attr] = resolve(f"data.{attr}", section[attr])
        for attr in ("extra_paths", "extra_test_paths"):
            if isinstance(section.get(attr), list):
                section[attr] = [resolve(f"data.{attr}[{i}]", v) for i, v in enumerate(section[attr])]
    name = data.get("model")
    if model and isinstance(name, str) and ("/" in name or name.endswith(".gguf")):
        data["model"] = resolve("model", name)
    return given


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The saved settings (what config.toml holds), as nested dicts."""
    return {key: value for key, value in dataclasses.asdict(cfg).items() if key != "given_paths"}


NOTES_HEADER = "# Paths as given, before they were made absolute:"


def dump_config(cfg: RunConfig) -> str:
    """``cfg`` as TOML (every key, defaults included), with the original text of paths it made absolute as comments
    at the top."""
    notes = [f"#   {key} = {text}" for key, text in sorted(cfg.given_paths.items())]
    header = [NOTES_HEADER, *notes, ""] if notes else []
    return "\n".join(header) + tomli_w.dumps(config_to_dict(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(dump_config(cfg), encoding="utf-8")


def _read_notes(text: str) -> dict[str, str]:
    """The notes :func:`save_config` wrote, so that a saved config keeps them when it is saved again."""
    lines = text.splitlines()
    if not lines or lines[0] != NOTES_HEADER:
        return {}
    notes = {}
    for line in lines[1:]:
        if not line.startswith("#   "):
            break
        key, _, note = line[4:].partition(" = ")
        notes[key] = note
    return notes


def _deep_copy(data: dict[str, Any]) -> dict[str, Any]:
    return {k: _deep_copy(v) if isinstance(v, dict) else v for k, v in data.items()}
