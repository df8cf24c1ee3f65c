"""``rspo-train`` / ``torchrun ... -m rspo_mega.train``: the main entry point.

    rspo-train [--config run.yaml] [section.key=value ...]

With no ``--config`` the embedded tiny default runs (the dataclass defaults of
:mod:`rspo_mega.config.schema`). The config is loaded and validated against the launched world
size *before* any process group or model exists; the resolved config is printed and saved in the
run's output directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Optional, Sequence

from rspo_mega.config import ConfigError, dump_config, load_config, save_config, validate_config

log = logging.getLogger("rspo_mega")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rspo-train", description="RL (RSPO, ESPO, diffu-GRPO) for masked diffusion LMs."
    )
    parser.add_argument("--config", default=None, help="YAML run config (default: tiny default)")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config, then exit"
    )
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        layout = validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as exc:
        print(f"rspo-train: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=cfg.logging.level, format="%(asctime)s %(name)s: %(message)s")
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        print(dump_config(cfg), flush=True)
        save_config(cfg, cfg.logging.output_dir)
        log.info("layout: %s", layout)
    if args.dry_run:
        return 0
    print(
        "rspo-train: the config is valid, but the RL trainer (issue 7: rollout -> rewards -> "
        "ELBO -> RSPO -> optimizer) has not landed yet; only --dry-run is available.",
        file=sys.stderr,
    )
    return 3


if __name__ == "__main__":  # required: dist-checkpointing's async saver spawns and re-imports
    sys.exit(main())
