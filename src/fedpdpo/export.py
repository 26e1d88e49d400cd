"""Take a client's personalized model out of a run: a standard PEFT adapter plus the client's local modules.

A finished run directory holds its ``config.toml``, the final global shared tensors
(``global.safetensors``, the LoRA) and each client's private tensors (``clients/client_<id>/``, read with
:class:`~fedpdpo.client.state.ClientStore`).
:func:`export_client` turns one client's view of that into a directory that the Hugging Face ecosystem understands::

    ADIR/README.md                                         the model card (:mod:`fedpdpo.model_card`)
    ADIR/adapter_config.json, adapter_model.safetensors   the shared LoRA, written by PEFT's own save_pretrained,
                                                          so ``PeftModel.from_pretrained(base, ADIR)`` loads it
    ADIR/local_modules.safetensors                         personalized head, reward head, adapter (FedPDPO only)
    ADIR/fedpdpo_client.json                               what is needed to rebuild the model around them
    ADIR/tokenizer files                                   the backbone's tokenizer
    ADIR/base/                                             the backbone (always for ``tiny``; ``save_base=True``)
                                                          named ``base`` in adapter_config.json: the export can move
    ADIR/merged/                                           optional plain causal LM (see :func:`save_merged`)

PEFT alone reproduces the *global* policy (backbone + shared LoRA + original head). The client's personalized
policy also needs the local modules, which :func:`load_personalized` puts back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fedpdpo.client.selection import load_final
from fedpdpo.client.state import ClientStore, read_checked
from fedpdpo.config import LoraSettings, MethodConfig, RunConfig, config_to_dict, load_config
from fedpdpo.data.prompts import PromptEncoder
from fedpdpo.engines.server import GLOBAL_FILE
from fedpdpo.errors import FedPDPOError
from fedpdpo.jsonio import dumps
from fedpdpo.model.backbone import base_model_info, load_backbone
from fedpdpo.model.naming import is_lora, personal_copies, without_personal_copies
from fedpdpo.model.policy import FedPDPOModel, fold_lora_gate
from fedpdpo.model_card import PROMPT, render_card
from fedpdpo.rundir import check_out_path, replace_dir
from fedpdpo.strategies import get_strategy

log = logging.getLogger(__name__)

EXPORT_INFO = "fedpdpo_client.json"
LOCAL_FILE = "local_modules.safetensors"
BASE_DIR = "base"  # the saved base model, named by this relative path in adapter_config.json
CARD_FILE = "README.md"  # the model card (replaces PEFT's blank template)
FORMAT = "fedpdpo-personalized"
FORMAT_VERSION = 1


@dataclass
class ClientModel:
    """A client's personalized model, ready for scoring and sampling."""

    model: FedPDPOModel
    tokenizer: Any
    client_id: int
    beta: float  # DPO beta of the run: implicit reward = beta * (log pi - log pi_ref)
    max_length: int  # the run's tokenization limits, so that scores are computed as in training
    max_prompt_length: int
    source: str  # run directory or export directory it came from


def _run_config(run_dir: Path) -> RunConfig:
    """The config the run's model was built from: its ``config.toml`` with its strategy's module switches."""
    if not (run_dir / "config.toml").is_file():
        raise FedPDPOError(f"--run {run_dir}: no config.toml here; point --run at the --out directory of a run")
    cfg = load_config(run_dir / "config.toml")
    return get_strategy(cfg.algorithm).configure(cfg)


def load_from_run(run_dir: str | Path, client_id: int) -> ClientModel:
    """Rebuild client ``client_id``'s personalized model from a finished run directory."""
    from fedpdpo.engines.setup import build_model

    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    if not 0 <= client_id < cfg.num_clients:
        raise FedPDPOError(f"--client {client_id}: the run has clients 0..{cfg.num_clients - 1}")
    global_path = run_dir / GLOBAL_FILE
    if not global_path.is_file():
        raise FedPDPOError(
            f"--run {run_dir}: no {GLOBAL_FILE} (the final global LoRA); the run did not finish, or was made by an "
            "older fedpdpo; run it again"
        )
    model, tokenizer = build_model(cfg)  # same seed as training, so untrained local tensors match round 0
    global_ = read_checked(global_path, load_file, "the run directory is damaged: run it again")
    store = ClientStore(run_dir / "clients", bases=model.delta_bases())
    state, shared = load_final(store, client_id, global_)  # select_round = "best_val": the round the client kept
    model.set_tensors(shared)
    local = state.local
    task = store.task_info(client_id) or {}
    max_length = int(task.get("max_length") or cfg.max_length)
    max_prompt_length = int(task.get("max_prompt_length") or cfg.data.max_prompt_length)
    if not (max_length and max_prompt_length):
        raise FedPDPOError(
            f"--run {run_dir}: client {client_id} has no {store.path(client_id) / 'task.json'} with the length limits "
            "it chose from its data; the run did not evaluate this client yet"
        )
    if local:
        model.set_tensors(without_personal_copies(local))
        model.set_tensors(personal_copies(local))  # Ditto: the client's model is its personal LoRA
    elif len(model.local):
        log.warning("client %d never trained in %s; its local modules are at their initial values", client_id, run_dir)
    model.eval()
    return ClientModel(model, tokenizer, client_id, cfg.beta, max_length, max_prompt_length, str(run_dir))


@dataclass
class ExportResult:
    out: Path
    files: list[str]
    merged: str  # "" (not written), "personalized" or "global": what the merged model computes


def export_client(
    run_dir: str | Path,
    client_id: int,
    out: str | Path,
    merged: bool = False,
    save_base: bool = False,
    overwrite: bool = False,
) -> ExportResult:
    """Write client ``client_id`` of ``run_dir`` as a PEFT adapter directory plus its local modules (see module doc).

    The export is written next to ``out`` and renamed into place when complete, so ``out`` (an earlier export with
    ``overwrite``) is replaced only by a whole new export, never left half-written.
    """
    run_dir, out = Path(run_dir).resolve(), Path(out).resolve()
    check_out_path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FedPDPOError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
        if not (out / EXPORT_INFO).is_file():  # --overwrite replaces an earlier export, never an arbitrary directory
            raise FedPDPOError(f"--out {out} is not a fedpdpo export (no {EXPORT_INFO}); refusing to replace it")
    cfg = _run_config(run_dir)
    cm = load_from_run(run_dir, client_id)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files, merged_kind = _write_export(tmp, out, run_dir, client_id, cfg, cm, merged, save_base)
        replace_dir(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out, files, merged_kind)


def _write_export(
    tmp: Path,
    out: Path,
    run_dir: Path,
    client_id: int,
    cfg: RunConfig,
    cm: ClientModel,
    merged: bool,
    save_base: bool,
) -> tuple[list[str], str]:
    """Write the export into ``tmp``; nothing in it names ``tmp`` or ``out``, so it can be moved and copied."""
    base = base_model_info(cfg.model)
    base_dir = ""
    if save_base or cfg.model == "tiny":
        # The tiny backbone exists only inside fedpdpo; saving it lets plain PEFT/transformers load the adapter.
        backbone, tokenizer = load_backbone(cfg.model)
        backbone.save_pretrained(tmp / BASE_DIR)
        tokenizer.save_pretrained(tmp / BASE_DIR)
        base_dir = BASE_DIR
    # What plain PEFT loads the adapter onto: the saved copy by its path relative to the export, else the Hub id users
    # know the model by, else the model as this machine has it. Embedding layers are never trained, so PEFT need not
    # look the base up to decide whether to save them.
    peft_base = base_dir or base["hub_id"] or cm.model.peft.get_base_model().config.name_or_path or cfg.model
    cm.model.peft.peft_config["default"].base_model_name_or_path = peft_base
    cm.model.peft.save_pretrained(tmp, save_embedding_layers=False)
    cm.tokenizer.save_pretrained(tmp)
    local = {k: v.detach().cpu().contiguous() for k, v in cm.model.local.state_dict().items()}
    if local:
        save_file(local, tmp / LOCAL_FILE)
    info = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "client": client_id,
        "run": str(run_dir),
        "algorithm": cfg.algorithm,
        "model": cfg.model,
        "base_model": base,
        "base_dir": base_dir,
        "beta": cfg.beta,
        "max_length": cm.max_length,
        "max_prompt_length": cm.max_prompt_length,
        "lora": dataclasses.asdict(cfg.lora),
        "method": dataclasses.asdict(cfg.method),
        "local_modules": sorted(cm.model.local.keys()),
    }
    base_spec = str(tmp / base_dir) if base_dir else cfg.model
    merged_kind = save_merged(tmp, cm, base_spec, tmp / "merged") if merged else ""
    info["merged"] = merged_kind
    (tmp / EXPORT_INFO).write_text(dumps(info, indent=2) + "\n", encoding="utf-8")
    card = info | {
        "run_name": run_dir.name,
        "peft_base": peft_base,
        "prompt": prompt_info(cm.tokenizer),
        "local_module_groups": [m for m in ("head", "reward_head", "adapter", "lora_gate") if m in cm.model.local],
    }
    (tmp / CARD_FILE).write_text(render_card(card, _run_facts(run_dir, cfg, client_id)), encoding="utf-8")
    files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
    return files, merged_kind


def prompt_info(tokenizer: Any) -> dict[str, Any]:
    """How training builds a prompt for ``tokenizer``: with its chat template or not, an example rendering with the
    user's text as :data:`~fedpdpo.model_card.PROMPT`, and the token that ends a response."""
    encoder = PromptEncoder(tokenizer)
    head = encoder.encode(PROMPT).head
    if encoder.use_chat_template:
        messages = [{"role": "user", "content": PROMPT}]
        example = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:
        example = tokenizer.decode(list(head)) + PROMPT
    end = encoder.end_id
    return {
        "chat_template": encoder.use_chat_template,
        "example": example,
        "head_ids": list(head),
        "end_token": None if end is None else tokenizer.convert_ids_to_tokens(end),
    }


def _run_facts(run_dir: Path, cfg: RunConfig, client_id: int) -> dict[str, Any]:
    """What the model card says about the run: its config, summary and this client's entry (empty where missing or
    unreadable: a card is written for any run that can be exported)."""
    facts: dict[str, Any] = {"config": config_to_dict(cfg)}
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return facts
    if isinstance(summary, dict):
        facts["summary"] = summary
        clients = summary.get("clients")
        clients = clients if isinstance(clients, list) else []
        facts["client"] = next((c for c in clients if isinstance(c, dict) and c.get("id") == client_id), {})
    return facts


#: Keys of fedpdpo_client.json that loading an export reads.
INFO_KEYS = ("client", "model", "beta", "max_length", "max_prompt_length", "lora", "method")
DAMAGED = "the export is damaged: export the client again"


def _read_info(adir: Path) -> dict[str, Any]:
    path = adir / EXPORT_INFO
    if not path.is_file():
        raise FedPDPOError(f"{adir}: no {EXPORT_INFO}; it is not a directory written by `fedpdpo export`")
    info = read_checked(path, lambda p: json.loads(p.read_text(encoding="utf-8")), DAMAGED)
    if not isinstance(info, dict) or info.get("format") != FORMAT or info.get("format_version") != FORMAT_VERSION:
        found = (info.get("format"), info.get("format_version")) if isinstance(info, dict) else (None, None)
        raise FedPDPOError(f"{path}: unsupported export format {found[0]!r} v{found[1]}")
    if missing := [k for k in INFO_KEYS if k not in info]:
        raise FedPDPOError(f"{path}: no '{missing[0]}' field; {DAMAGED}")
    return info


def _base_spec(adir: Path, info: dict[str, Any]) -> str:
    return str(adir / info["base_dir"]) if info.get("base_dir") else info["model"]


def load_personalized(adir: str | Path) -> ClientModel:
    """Rebuild a client's full personalized model (backbone + shared LoRA + local modules) from an export directory."""
    from peft.utils import set_peft_model_state_dict

    adir = Path(adir).resolve()
    info = _read_info(adir)
    backbone, tokenizer = load_backbone(_base_spec(adir, info))
    model = FedPDPOModel(backbone, LoraSettings(**info["lora"]), MethodConfig(**info["method"]))
    adapter = read_checked(adir / "adapter_model.safetensors", load_file, DAMAGED)
    result = set_peft_model_state_dict(model.peft, adapter)
    missing = [k for k in result.missing_keys if is_lora(k)]
    if missing or result.unexpected_keys:
        raise FedPDPOError(
            f"{adir}: adapter does not fit the model (missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]})"
        )
    if len(model.local):
        model.local.load_state_dict(read_checked(adir / LOCAL_FILE, load_file, DAMAGED), strict=True)
    model.eval()
    return ClientModel(
        model,
        tokenizer,
        int(info["client"]),
        float(info["beta"]),
        int(info["max_length"]),
        int(info["max_prompt_length"]),
        str(adir),
    )


@torch.no_grad()
def save_merged(adir: Path, cm: ClientModel, base_spec: str, target: Path) -> str:
    """Save a plain causal LM (``from_pretrained``-loadable) to ``target`` and return what it computes.

    The shared LoRA is merged into the backbone with PEFT's ``merge_and_unload`` (loading the adapter just written
    to ``adir``, which also proves that PEFT reads it). A personalized head is a plain output projection, so it
    replaces ``lm_head`` (untied from the embeddings): without a bottleneck adapter the merged model *is* the
    client's personalized policy ("personalized"). The gated bottleneck adapter sits between the last hidden state
    and the head and has no place in a standard causal LM, so with an adapter the merged model is the global policy
    (backbone + shared LoRA + original head; "global"); use :func:`load_personalized` for the full client model.
    A LoRA gate is a scale of each LoRA update, so the personalized merge folds it into ``B`` first.
    The explicit reward head is a scorer, not part of any causal LM, and is never merged.
    """
    from peft import PeftModel

    backbone, tokenizer = load_backbone(base_spec)
    local = cm.model.local
    peft_model = PeftModel.from_pretrained(backbone, adir)
    if cm.model.gated and "adapter" not in local:
        fold_lora_gate(peft_model, cm.model.gate_weight.detach().cpu())
    merged = peft_model.merge_and_unload()
    if "adapter" in local:
        log.warning(
            "client %d has a bottleneck adapter, which a plain causal LM cannot hold: the merged model is the "
            "global policy (backbone + shared LoRA); load the full client model with fedpdpo.load_personalized",
            cm.client_id,
        )
        kind = "global"
    else:
        if "head" in local:
            merged.config.tie_word_embeddings = False
            head = local["head"].get_parameter("weight").detach().cpu().clone()
            merged.get_output_embeddings().weight = torch.nn.Parameter(head, requires_grad=False)
        kind = "personalized"
    merged.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return kind
