"""``rspo-eval`` / ``torchrun ... -m rspo_mega.evaluate``: held-out accuracy of a model.

    rspo-eval --config run.yaml checkpoint.save_dir=runs/x/ckpt [--temperature 0]
              [--samples out.jsonl] [--start] [key=value ...]

Loads the policy's weights (no optimizer, no DDP) from the newest valid checkpoint of
``checkpoint.save_dir`` (a ``save_dir`` without one is an error), or with ``--start`` (or
``checkpoint.save_dir=null``) from ``checkpoint.init_from``, generates one completion per test
example with the ``rollout`` settings (``rollout.eval_steps`` denoising steps when set,
temperature from ``--temperature``), sharded over data-parallel ranks, and prints the task's
mean reward and accuracy (reward == 1) as JSON on rank 0. ``--samples`` also writes every
completion (uid, prompt, completion, reward; one JSON object per line, in test-set order) to a
file, written whole or not at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from rspo_mega.console import add_debug_flag, hide_library_warnings, run_entry_point, setup_logging


def main(argv: Optional[Sequence[str]] = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported (rspo_mega.setup imports it)
    parser = argparse.ArgumentParser(prog="rspo-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="YAML run config (default: tiny default)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature")
    parser.add_argument("--samples", default=None, metavar="PATH",
                        help="also write each test completion and its reward to this JSONL file")
    parser.add_argument("--start", action="store_true",
                        help="evaluate the start weights (checkpoint.init_from), not the newest "
                             "checkpoint of checkpoint.save_dir")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    return run_entry_point("rspo-eval", lambda: evaluate(args), debug=args.debug)


def evaluate(args: argparse.Namespace) -> int:
    """Check the config, load the model, evaluate and print the result; the exit code."""
    from rspo_mega.config.paths import TINY_DEFAULT, check_inputs
    from rspo_mega.errors import ConfigError
    from rspo_mega.setup import load_run_config, validate_run

    cfg = load_run_config(args.config or TINY_DEFAULT, args.overrides)
    validate_run(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    if not (cfg.checkpoint.save_dir or cfg.checkpoint.init_from):
        raise ConfigError("rspo-eval needs checkpoint.save_dir or checkpoint.init_from")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.samples and not Path(args.samples).resolve().parent.is_dir():
        raise ConfigError(f"--samples {args.samples}: directory "
                          f"{Path(args.samples).resolve().parent} does not exist")
    setup_logging(cfg.logging.level)
    check_inputs(cfg)
    from rspo_mega.parallel import destroy_parallel
    from rspo_mega.training.evaluator import build_evaluator

    evaluator, step = build_evaluator(cfg, start=args.start)
    samples: Optional[list] = [] if args.samples else None
    result = evaluator.evaluate(temperature=args.temperature, samples=samples)
    if int(os.environ.get("RANK", "0")) == 0:
        if args.samples:
            from rspo_mega.training.checkpoint.files import atomic_write_text

            atomic_write_text(Path(args.samples), "".join(json.dumps(r) + "\n" for r in samples))
        print(json.dumps({"step": step, **result}), flush=True)  # one line, last on stdout
    destroy_parallel()
    return 0


if __name__ == "__main__":
    sys.exit(main())
