"""The layering of docs/architecture.md and the one home of the parameter naming rules, checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedpdpo"

#: Layer -> the layers it may import (besides itself and ``BASE``), as docs/architecture.md lists them.
CORE = {"config", "data", "model", "losses", "instructions", "transfer", "sampling", "client"}
MAY_IMPORT = {
    "config": set(),
    "instructions": set(),
    "transfer": set(),
    "losses": set(),
    "data": {"config"},
    "model": {"config", "data"},
    "sampling": {"model"},  # the token-by-token loop: training's on-policy pairs and generate both use it
    "client": {"config", "data", "model", "losses", "instructions", "transfer", "sampling"},
    "strategies": {"config", "data", "model", "instructions"},
    "report": {"config", "client"},  # client.state's atomic_write: run files are written like client state
    "rundir": {"client"},  # the run-directory lock and replace; client.state's atomic file writes
    "engines": CORE | {"strategies", "report", "rundir"},
    "export": CORE | {"strategies", "engines", "rundir", "model_card"},
    "model_card": set(),  # pure rendering of facts export collected
    "generate": {"data", "export", "model", "sampling"},
    "judge": set(),
    "evaluation": CORE | {"engines", "generate", "judge"},
    "sweep": {"config", "engines", "report", "strategies", "workers"},
    "workers": set(),  # worker-process start: nothing that could touch CUDA before the GPU is chosen
    "tune": {"config", "client", "report", "sweep"},  # variants as comparisons, chosen on validation pairs
    "api": CORE | {"engines", "sweep", "rundir", "cli"},  # the Python API: what the commands do, as functions
}
#: Imported by any layer: the error types, the strict JSON writer and the phase clock.
BASE = {"errors", "jsonio", "timing"}


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedpdpo."):
            found.add(_layer(node.module))
        elif isinstance(node, ast.Import):
            found |= {_layer(a.name) for a in node.names if a.name.startswith("fedpdpo.")}
    return found


def _module_layer(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


@pytest.mark.parametrize("layer", sorted(MAY_IMPORT))
def test_layers_import_only_downwards(layer):
    files = [p for p in SRC.rglob("*.py") if _module_layer(p) == layer]
    assert files, f"no source for layer {layer}"
    for path in files:
        extra = _imports(path) - MAY_IMPORT[layer] - {layer} - BASE
        assert not extra, f"{path.relative_to(SRC)} imports {sorted(extra)}"


def test_core_does_not_know_flower():
    for path in SRC.rglob("*.py"):
        if _module_layer(path) in CORE | {"strategies"}:
            tree = ast.parse(path.read_text(encoding="utf-8"))
            modules = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            modules += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            assert not [m for m in modules if m.split(".")[0] == "flwr"], path.relative_to(SRC)


def _string_constants(tree: ast.AST) -> list[str]:
    """String literals that are values, not docstrings or comments-as-strings."""
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return [
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docstrings
    ]


def test_parameter_naming_rules_live_in_one_module():
    """Which tensors are LoRA, local or Ditto's personal copies is decided in model/naming.py only."""
    marks = (".lora_", "lora_A", "lora_B", "local.", "personal/")
    for path in SRC.rglob("*.py"):
        if path == SRC / "model" / "naming.py":
            continue
        literals = [
            s for s in _string_constants(ast.parse(path.read_text(encoding="utf-8"))) if s != "local.safetensors"
        ]
        offending = [s for s in literals if any(m in s for m in marks)]
        assert not offending, f"{path.relative_to(SRC)} spells a naming rule: {offending}"
