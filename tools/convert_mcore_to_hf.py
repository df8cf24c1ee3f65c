#!/usr/bin/env python
"""megatron-core torch_dist checkpoint (saved at any TP/PP) -> HF LLaDA directory.

    python tools/convert_mcore_to_hf.py --ckpt DIR --out DIR [--template HF_DIR]
        [--hf-config config.json] [--prefix model.] [--dtype bfloat16] [--max-shard-size 5GB]

    python tools/convert_mcore_to_hf.py --ckpt RUN/ckpt/iter_N --base BASE --out DIR [--peft DIR]

The HF tensors keep the checkpoint's dtype unless --dtype says otherwise.

A LoRA run's checkpoint (model.lora) holds its adapters only: --base names the weights they were
trained on (the run's checkpoint.init_from: an HF directory or a megatron checkpoint; default: the
one its metadata.json records), --out receives them merged, --peft the adapters alone in the
PEFT format.

Geometry comes from --hf-config, else the checkpoint's own hf_config.json (written by
convert_hf_to_mcore), else --template's config.json. Tokenizer and modeling files are copied
from --template. Model keys nested under a prefix (trainer checkpoints) are found automatically
or given with --prefix.
"""

from __future__ import annotations

import argparse
import os
import sys

from rspo_mega.console import (
    add_debug_flag, hide_library_warnings, run_entry_point, setup_logging,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--template", default=None, help="HF directory to copy tokenizer/modeling files from")
    p.add_argument("--hf-config", default=None, help="config.json giving the model geometry")
    p.add_argument("--prefix", default=None, help="key prefix of the model tensors (auto by default)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                   help="stored dtype of the HF tensors (default: the checkpoint's)")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--base", default=None,
                   help="a LoRA checkpoint's base (default: its run's checkpoint.init_from)")
    p.add_argument("--peft", default=None,
                   help="a LoRA checkpoint's adapters alone in the PEFT format, in this directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_debug_flag(p)
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> int:
    """Check the arguments, convert, say what was written; a mistake in them (a missing --ckpt
    or --template, an existing --out, a checkpoint of another model) is one line naming it."""
    from rspo_mega.errors import CheckpointError, HFDirectoryError, OutputExistsError

    if not os.path.isdir(args.ckpt):
        raise CheckpointError(f"--ckpt {args.ckpt}: no such directory")
    if args.template and not os.path.isdir(args.template):
        raise HFDirectoryError(f"--template {args.template}: no such directory")
    from rspo_mega.models.llada.convert import convert_mcore_to_hf
    from rspo_mega.models.llada.fs import check_output_dir

    try:
        check_output_dir(args.out, args.overwrite)
        lora = _lora_run_config(args.ckpt)
        if lora is not None:
            return _convert_lora(args, lora)
        cfg = convert_mcore_to_hf(args.ckpt, args.out, hf_config=args.hf_config,
                                  template=args.template, prefix=args.prefix, dtype=args.dtype,
                                  max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    except FileExistsError as err:
        raise OutputExistsError(f"--out {args.out}: {err}") from err
    except (OSError, ValueError, KeyError) as err:
        raise CheckpointError(f"--ckpt {args.ckpt}: {err.args[0] if err.args else err}") from err
    print(f"wrote {args.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    return 0


def _lora_run_config(ckpt: str) -> dict | None:
    """The run config a LoRA trainer checkpoint (``iter_N``) records, else None."""
    import json

    meta = os.path.join(ckpt, "metadata.json")
    if not os.path.isfile(meta):
        return None
    from pathlib import Path

    config = json.loads(Path(meta).read_text()).get("config") or {}
    return config if ((config.get("model") or {}).get("lora") or {}).get("enabled") else None


def _convert_lora(args: argparse.Namespace, run: dict) -> int:
    """A LoRA checkpoint: its adapters merged into --base (HF or megatron) in --out, and in the
    PEFT format in --peft."""
    import torch

    from rspo_mega.config.schema import LoRAConfig, ModelConfig
    from rspo_mega.errors import CheckpointError
    from rspo_mega.models.llada.convert import convert_mcore_to_hf
    from rspo_mega.models.llada.hf_config import hf_config_dict
    from rspo_mega.models.llada.hf_io import looks_like_hf_checkpoint
    from rspo_mega.models.llada.lora_export import (
        merge_hf_directory, read_adapters, write_peft_adapter,
    )

    base = args.base or (run.get("checkpoint") or {}).get("init_from")
    if not base or not os.path.isdir(base):
        raise CheckpointError(f"--ckpt {args.ckpt} holds LoRA adapters only: --base {base} must "
                              "name the weights they were trained on (a directory)")
    lora = LoRAConfig(**run["model"]["lora"])
    model = ModelConfig(**{k: v for k, v in run["model"].items() if k not in ("fp8", "lora")})
    dtype = args.dtype or model.params_dtype
    adapters = read_adapters(args.ckpt, model, lora, prefix=args.prefix or "")
    if looks_like_hf_checkpoint(base):
        merge_hf_directory(base, args.out, adapters, getattr(torch, dtype),
                           hf_config_dict(model, torch_dtype=dtype), args.max_shard_size)
    else:
        convert_mcore_to_hf(base, args.out, hf_config=args.hf_config, template=args.template,
                            dtype=dtype, max_shard_size=args.max_shard_size, overwrite=True,
                            update=adapters.merge)
    if args.peft:
        write_peft_adapter(adapters, args.peft, getattr(torch, dtype), base=base)
    print(f"wrote {args.out}: the adapters of {args.ckpt} (r={lora.rank}) merged into {base}"
          + (f"; {args.peft}: the adapters in the PEFT format" if args.peft else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported
    args = parse_args(argv)
    setup_logging("INFO")
    return run_entry_point("convert_mcore_to_hf", lambda: convert(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
