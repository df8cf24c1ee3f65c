"""A LoRA run's adapters in HF terms: merged into the base's HF tensors, or alone in the PEFT format.

A trainer checkpoint stores each adapter like its base linear, stacked over the global layer axis:
``decoder.layers.<sub>.<linear>.adapter.lora_a [L, r, in]`` and ``lora_b [L, out, r]`` in
megatron's global row order. The HF model has one linear per projection, so the fused factors
are split by the base weight's own row mapping (:func:`hf_adapter.from_mcore`, a pure row
reshuffle, hence exact for ``B``); ``A`` is shared:

* ``linear_qkv`` -> ``q_proj``, ``k_proj``, ``v_proj`` (``B`` rows by KV group, ``A`` shared);
* ``linear_fc1`` -> ``ff_proj`` (the gate), ``up_proj`` (``B`` halves, ``A`` shared);
* ``linear_proj`` -> ``attn_out``, ``linear_fc2`` -> ``ff_out`` (unchanged).

Merged: ``W + (alpha / r) B A`` per HF weight, computed in float32. PEFT: ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight [r, in]`` / ``lora_B.weight [out, r]`` and
``adapter_config.json`` (``peft_type`` LORA, ``r``, ``lora_alpha``, ``target_modules`` as a regular
expression over the blocks' linears, so the output head, also named ``ff_out``, is not one).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save_file

from rspo_mega.config.schema import LoRAConfig, ModelConfig
from rspo_mega.models.llada import checkpoint as ckpt
from rspo_mega.models.llada import hf_adapter as A
from rspo_mega.models.llada.fs import atomic_output_dir

SUBLAYER = {"linear_qkv": "self_attention", "linear_proj": "self_attention",
            "linear_fc1": "mlp", "linear_fc2": "mlp"}
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper path in front of the HF module names
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


@dataclass
class HFAdapters:
    """``factors``: HF linear module (``model.transformer.blocks.3.q_proj``) -> ``(A [r, in],
    B [out, r])`` in float32; the update of its weight is ``scaling * B @ A``."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    lora: LoRAConfig

    @property
    def scaling(self) -> float:
        return self.lora.alpha / self.lora.rank

    def merge(self, hf_key: str, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` of ``hf_key`` with its adapter's update added (float32), or as it is."""
        factors = self.factors.get(hf_key.removesuffix(".weight"))
        if factors is None:
            return weight
        a, b = factors
        return weight.float() + self.scaling * (b @ a)


def read_adapters(ckpt_dir: str, cfg: ModelConfig, lora: LoRAConfig,
                  prefix: str = "") -> HFAdapters:
    """The adapters of the trainer checkpoint ``ckpt_dir`` (an ``iter_*`` or its ``dist/``;
    ``prefix``: the model's key prefix) as HF-module factors."""
    if os.path.isdir(os.path.join(ckpt_dir, "dist")):
        ckpt_dir = os.path.join(ckpt_dir, "dist")
    shapes = ckpt.stored_tensor_shapes(ckpt_dir)
    params = {p.key: p for p in A.PARAMS}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for target in lora.target_modules:
        stem = f"decoder.layers.{SUBLAYER[target]}.{target}"
        key_a, key_b = f"{prefix}{stem}.adapter.lora_a", f"{prefix}{stem}.adapter.lora_b"
        loaded = ckpt.read_global_tensors(ckpt_dir, {key_a: None, key_b: None}, shapes)
        for layer in range(cfg.num_layers):
            a = loaded[key_a][layer].float()
            for hf_key, b in A.from_mcore(params[f"{stem}.weight"], loaded[key_b][layer].float(),
                                          cfg, layer):
                factors[hf_key.removesuffix(".weight")] = (a, b)
    return HFAdapters(factors, lora)


def peft_target_regex(lora: LoRAConfig) -> str:
    """PEFT's ``target_modules`` (a full-match regular expression) for ``lora.target_modules``."""
    leaves = [leaf.removesuffix(".weight") for t in lora.target_modules
              for leaf in _hf_names(t)]
    return rf".*\.blocks\.\d+\.({'|'.join(leaves)})"


def _hf_names(target: str) -> tuple[str, ...]:
    stem = f"decoder.layers.{SUBLAYER[target]}.{target}.weight"
    return next(p.hf_names for p in A.PARAMS if p.key == stem)


def write_peft_adapter(adapters: HFAdapters, out_dir: str | Path, dtype: torch.dtype,
                       base: Optional[str] = None) -> Path:
    """The adapter-only directory ``out_dir`` in the PEFT format (replaced atomically);
    ``base``: the base model it applies to (``base_model_name_or_path``)."""
    tensors = {}  # each module its own copy of a shared A (safetensors stores no aliases)
    for module, (a, b) in sorted(adapters.factors.items()):
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.to(dtype).clone()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.to(dtype).clone()
    lora = adapters.lora
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
        "target_modules": peft_target_regex(lora), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None,
    }
    with atomic_output_dir(str(out_dir), overwrite=True) as tmp:
        save_file(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
        Path(tmp, ADAPTER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return Path(out_dir)


def merge_hf_directory(base_dir: str, out_dir: str | Path, adapters: HFAdapters,
                       dtype: torch.dtype, config: dict, max_shard_size: str | int = "5GB") -> Path:
    """The HF LLaDA directory ``base_dir`` with ``adapters`` merged, written to ``out_dir``
    (streamed a tensor at a time, in ``dtype``; ``config``: its config.json; the base's
    tokenizer and modeling files copied)."""
    from rspo_mega.models.llada.convert import _not_copied
    from rspo_mega.models.llada.hf_io import (
        HFCheckpointReader, copy_template_files, parse_size, write_hf_checkpoint,
    )

    reader = HFCheckpointReader(base_dir)
    keys = sorted(reader.keys())
    missing = sorted(m for m in adapters.factors if f"{m}.weight" not in reader.keys())
    if missing:
        raise KeyError(f"{base_dir}: the base has no tensor {missing[0]}.weight for its adapter")
    entries = [(k, dtype, reader.shape(k)) for k in keys]
    tensors = ((k, adapters.merge(k, reader.get(k)).to(dtype)) for k in keys)
    with atomic_output_dir(str(out_dir), overwrite=True) as tmp:
        write_hf_checkpoint(tmp, entries, tensors, parse_size(max_shard_size), config)
        copy_template_files(base_dir, tmp, skip=_not_copied)
    return Path(out_dir)
