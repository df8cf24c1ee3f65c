"""Imports inside ``rspo_mega.models.llada`` point one way, bottom first:

HF files and plain helpers; the per-call context a forward hands its layers; the TE padding
rotation; attention, then the layer that calls it, then the specs that name both; the probes of
the megatron internals those modules rely on; the model; then what uses a built model (the KV
cache sized by it, checkpoints, conversion, LoRA export); the package's public API last.
"""

from __future__ import annotations

import ast
from pathlib import Path

LLADA = Path(__file__).resolve().parents[2] / "rspo_mega" / "models" / "llada"
ORDER = [
    "fs", "hf_adapter", "hf_config", "hf_io", "config", "logits", "lora",
    "forward_context", "padding_rotation", "attention", "layer", "spec", "megatron_seams",
    "model", "kv_cache", "checkpoint", "hf_load", "convert", "lora_export", "__init__",
]
PREFIX = "rspo_mega.models.llada"


def _llada_imports(path: Path) -> set[str]:
    """The ``models/llada`` modules ``path`` imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == PREFIX:
            names.update(alias.name for alias in node.names
                         if (LLADA / f"{alias.name}.py").exists())
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PREFIX + "."):
            names.add(node.module.split(".")[3])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[3] for a in node.names if a.name.startswith(PREFIX + "."))
    return names


def test_every_module_is_placed():
    assert sorted(p.stem for p in LLADA.glob("*.py")) == sorted(ORDER)


def test_modules_import_only_modules_below_them():
    upward = [f"{name} imports {other}" for i, name in enumerate(ORDER)
              for other in sorted(_llada_imports(LLADA / f"{name}.py")) if other not in ORDER[:i]]
    assert not upward, upward
