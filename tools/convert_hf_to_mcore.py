#!/usr/bin/env python
"""HF LLaDA (config.json + safetensors shards + index) -> megatron-core torch_dist checkpoint.

    python tools/convert_hf_to_mcore.py --hf DIR --out DIR [--tp 2 --pp 2] [--dtype bfloat16]

Streams tensor by tensor (a few tensors resident). The output loads at any TP/PP with
``rspo_mega.models.llada.load_model`` (or ``dist_checkpointing.load(model.sharded_state_dict())``
at the given --tp, whose vocab padding it carries). Pickle checkpoints (.bin) are refused.
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
    p.add_argument("--hf", required=True, help="HF LLaDA directory")
    p.add_argument("--out", required=True, help="output torch_dist checkpoint directory")
    p.add_argument("--tp", type=int, default=1, help="target tensor-parallel size (vocab padding)")
    p.add_argument("--pp", type=int, default=1, help="target pipeline-parallel size (validated)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"), default=None,
                   help="stored dtype (default: the source dtype)")
    p.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    add_debug_flag(p)
    return p.parse_args(argv)


def convert(args: argparse.Namespace) -> int:
    """Check the arguments, convert, say what was written; a mistake in them (a missing --hf,
    an existing --out, a tensor that does not fit) is one line naming the path."""
    from rspo_mega.errors import HFDirectoryError, OutputExistsError

    if not os.path.isdir(args.hf):
        raise HFDirectoryError(f"--hf {args.hf}: no such directory")
    from rspo_mega.models.llada.convert import convert_hf_to_mcore
    from rspo_mega.models.llada.fs import check_output_dir

    try:
        check_output_dir(args.out, args.overwrite)
        cfg = convert_hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype,
                                  overwrite=args.overwrite,
                                  make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    except FileExistsError as err:
        raise OutputExistsError(f"--out {args.out}: {err}") from err
    except (OSError, ValueError, KeyError) as err:
        raise HFDirectoryError(f"--hf {args.hf}: {err.args[0] if err.args else err}") from err
    print(f"wrote {args.out}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}")
    return 0


def main(argv: list[str] | None = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported
    args = parse_args(argv)
    setup_logging("INFO")
    return run_entry_point("convert_hf_to_mcore", lambda: convert(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
