#!/usr/bin/env python
"""megatron-core torch_dist checkpoint (saved at any TP/PP) -> HF LLaDA directory.

    python tools/convert_mcore_to_hf.py --ckpt DIR --out DIR [--template HF_DIR]
        [--hf-config config.json] [--prefix model.] [--dtype bfloat16] [--max-shard-size 5GB]

Geometry comes from --hf-config, else the checkpoint's own hf_config.json (written by
convert_hf_to_mcore), else --template's config.json. Tokenizer and modeling files are copied
from --template. Model keys nested under a prefix (trainer checkpoints) are found automatically
or given with --prefix.
"""

from __future__ import annotations

import argparse
import sys

from rspo_mega.console import hide_library_warnings, setup_logging


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out", required=True, help="output HF directory")
    p.add_argument("--template", default=None, help="HF directory to copy tokenizer/modeling files from")
    p.add_argument("--hf-config", default=None, help="config.json giving the model geometry")
    p.add_argument("--prefix", default=None, help="key prefix of the model tensors (auto by default)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default="bfloat16")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hide_library_warnings()  # before megatron-core is first imported
    setup_logging("INFO")
    from rspo_mega.models.llada.convert import convert_mcore_to_hf

    cfg = convert_mcore_to_hf(args.ckpt, args.out, hf_config=args.hf_config, template=args.template,
                              prefix=args.prefix, dtype=args.dtype,
                              max_shard_size=args.max_shard_size, overwrite=args.overwrite)
    print(f"wrote {args.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
