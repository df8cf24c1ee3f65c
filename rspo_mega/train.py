"""``rspo-train`` / ``torchrun ... -m rspo_mega.train``: the main entry point.

    rspo-train [--config run.yaml] [section.key=value ...]

With no ``--config`` the embedded tiny default runs (``rspo_mega/configs/tiny_sudoku.yaml``:
generated 4x4 Sudoku, RSPO from ``checkpoint.init_from``); a ``--config`` file overlays the defaults
of :mod:`rspo_mega.config.schema`. The config is loaded and validated against the launched world
size *before* any process group or model exists, and the run's memory plan is checked against
the hardware it was launched on (:mod:`rspo_mega.plan.launch`; ``--no-plan-check`` skips it); the
resolved config is saved in the run's output directory (``--dry-run`` prints it).

A config, data-file, checkpoint or HF-directory error prints one line ``rspo-train: <kind> error:
...`` on rank 0 and exits with code 2 (``--debug`` adds the traceback); the console at the
default ``logging.level`` hides megatron-core's INFO records and warnings (:mod:`rspo_mega.console`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from rspo_mega.console import add_debug_flag, hide_library_warnings, run_entry_point, setup_logging

if TYPE_CHECKING:
    from rspo_mega.config import Layout, TrainConfig

log = logging.getLogger("rspo_mega")

TINY_DEFAULT = Path(__file__).parent / "configs" / "tiny_sudoku.yaml"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="rspo-train", description="RL (RSPO, ESPO, diffu-GRPO) for masked diffusion LMs."
    )
    parser.add_argument("--config", default=None,
                        help=f"YAML run config (default: the embedded tiny default, {TINY_DEFAULT.name})")
    parser.add_argument(
        "--dry-run", action="store_true", help="validate and print the resolved config, then exit"
    )
    parser.add_argument("--no-plan-check", action="store_true",
                        help="launch even where the memory plan says a rank does not fit")
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    return parser.parse_intermixed_args(argv)  # options may follow the overrides


def plan_check(cfg: TrainConfig, layout: Layout, rank: int) -> bool:
    """Whether every rank's memory plan fits the hardware of this launch (rank 0 says why not)."""
    from rspo_mega.config import ConfigError
    from rspo_mega.plan import check_before_launch

    try:
        reason = check_before_launch(cfg, layout)
    except ConfigError as exc:
        reason = f"config error: {exc}"
    if reason and rank == 0:
        print(f"rspo-train: plan check: {reason} (--no-plan-check launches anyway)",
              file=sys.stderr)
    return reason is None


def run(args: argparse.Namespace) -> int:
    """Load and check the config, train, export and summarise; the process's exit code."""
    from rspo_mega.config import dump_config, load_config, save_config, validate_config

    cfg = load_config(args.config or TINY_DEFAULT, args.overrides)
    layout = validate_config(cfg, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    setup_logging(cfg.logging.level)
    rank = int(os.environ.get("RANK", "0"))
    if not (args.dry_run or args.no_plan_check) and not plan_check(cfg, layout, rank):
        return 2
    if rank == 0:
        path = save_config(cfg, cfg.logging.output_dir)
        if args.dry_run:
            print(dump_config(cfg), flush=True)
        else:
            log.debug("resolved config:\n%s", dump_config(cfg))
            log.info("config %s, layout %s", path, layout)
    if args.dry_run:
        return 0
    from rspo_mega.training.report import finish_run
    from rspo_mega.training.trainer import Trainer

    trainer = Trainer(cfg, layout)
    if rank == 0:  # the tokenizer may have filled the model's ids: save what actually runs
        save_config(cfg, cfg.logging.output_dir)
    summary = trainer.run()
    finish_run(trainer, summary)  # HF export, curves, summary (rank 0)
    from rspo_mega.parallel import destroy_parallel
    from rspo_mega.training.signals import preemption_exit_code

    destroy_parallel()
    if summary.get("preempted"):  # saved: 143, or 0 and a marker file for the launcher
        return preemption_exit_code(int(summary["step"]), rank)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported (the config imports it)
    args = parse_args(argv)
    return run_entry_point("rspo-train", lambda: run(args), debug=args.debug)


if __name__ == "__main__":  # a spawn-context child re-imports __main__: main() must not run there
    sys.exit(main())
