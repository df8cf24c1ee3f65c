"""``rspo-train`` / ``torchrun ... -m rspo_mega.train``: the main entry point.

    rspo-train [--config run.yaml] [section.key=value ...]

With no ``--config`` the embedded tiny default runs (``rspo_mega/configs/tiny_sudoku.yaml``:
generated 4x4 Sudoku, RSPO from ``checkpoint.init_from``); a ``--config`` file overlays the defaults
of :mod:`rspo_mega.config.schema`. The config is loaded and validated against the launched world
size and its input paths are checked *before* any process group or model exists; so are the
output directories, the checkpoint a restart would resume (:mod:`rspo_mega.training.
checkpoint.compat`) and the run's memory plan on the hardware it was launched on
(:mod:`rspo_mega.plan.launch`; ``--no-plan-check`` skips it). The resolved config is saved in the
run's output directory once the trainer is built. ``--dry-run`` prints it after the config and
input checks, also on a login node without a launcher.

A config, data-file, checkpoint or HF-directory error prints one line ``rspo-train: <kind> error:
...`` on rank 0 and exits with code 2 (``--debug`` adds the traceback); the console at the
default ``logging.level`` hides megatron-core's INFO records and warnings (:mod:`rspo_mega.console`).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

from rspo_mega.config.paths import TINY_DEFAULT
from rspo_mega.config.schema import algorithm_titles
from rspo_mega.console import (
    INTERRUPT_EXIT_CODE, add_debug_flag, hide_library_warnings, run_entry_point, setup_logging,
)

if TYPE_CHECKING:
    from rspo_mega.config import Layout, TrainConfig

log = logging.getLogger("rspo_mega")



def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rspo-train", description=(
        "RL and SFT for masked diffusion LMs: algorithm.name = "
        + ", ".join(f"{name} ({title})" for name, title in algorithm_titles().items()) + "."))
    parser.add_argument("--config", default=None,
                        help=f"YAML run config (default: the embedded tiny default, {TINY_DEFAULT.name})")
    parser.add_argument(
        "--dry-run", action="store_true",
        help="validate the config (and layout, without a launcher: the config's world size), "
             "check that every input path exists, print the resolved config, then exit")
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


def launched_world_size(dry_run: bool) -> Optional[int]:
    """The world size torchrun launched (``WORLD_SIZE``); 1 for a plain process, and None for a
    dry run without a launcher (a login node: the layout is the config's)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    return None if dry_run else 1


def check_machine(cfg: TrainConfig) -> None:
    """What the run needs from this machine's layer spec (Transformer Engine on a GPU, or the
    local spec): sequence parallelism and FP8 need TE."""
    from rspo_mega.config import ConfigError
    from rspo_mega.config.validate import check_layer_spec
    from rspo_mega.models.llada.spec import te_available

    te = te_available()
    if cfg.model.transformer_impl == "transformer_engine" and not te:
        raise ConfigError("model.transformer_impl=transformer_engine needs Transformer Engine "
                          "and a GPU, which this machine lacks: set model.transformer_impl=auto")
    use_te = te and cfg.model.transformer_impl != "local"
    check_layer_spec(cfg, "transformer_engine" if use_te else "local")


def run(args: argparse.Namespace) -> int:
    """Load and check the config, train, export and summarise; the process's exit code.

    Checks that need no process group come first (config, input paths; then for a launch the
    machine, the output directories, the checkpoint a resume would continue and the memory
    plan); ``config.yaml`` is written only once the trainer is built, so a run that fails
    before leaves a previous run's file as it was."""
    from rspo_mega.config import dump_config, save_config
    from rspo_mega.config.paths import check_inputs, check_outputs
    from rspo_mega.setup import load_run_config, validate_run

    cfg = load_run_config(args.config or TINY_DEFAULT, args.overrides)
    layout = validate_run(cfg, world_size=launched_world_size(args.dry_run))
    setup_logging(cfg.logging.level)
    check_inputs(cfg)
    rank = int(os.environ.get("RANK", "0"))
    if args.dry_run:
        if rank == 0:
            print(dump_config(cfg), flush=True)
        return 0
    from rspo_mega.training.checkpoint.compat import check_run_dir

    check_machine(cfg)
    check_outputs(cfg)
    check_run_dir(cfg)
    if not args.no_plan_check and not plan_check(cfg, layout, rank):
        return 2
    from rspo_mega.training.run_outputs import finish_run
    from rspo_mega.training.trainer import Trainer

    trainer = Trainer(cfg, layout)
    if rank == 0:  # what actually runs (the tokenizer may have filled the model's ids)
        log.debug("resolved config:\n%s", dump_config(cfg))
        log.info("config %s, layout %s", save_config(cfg, cfg.logging.output_dir), layout)
    summary = trainer.run()
    finish_run(trainer, summary)  # tears the process groups down; then HF export, curves, summary
    trainer.trackers.finish(cfg.logging.output_dir,  # W&B / MLflow: artifacts, run status
                            "preempted" if summary.get("preempted") or summary.get("interrupted")
                            else "finished")
    from rspo_mega.training.signals import preemption_exit_code

    if summary.get("interrupted"):
        return INTERRUPT_EXIT_CODE
    if summary.get("preempted"):  # saved: 143, or 0 and a marker file for the launcher
        return preemption_exit_code(int(summary["step"]), rank)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported (rspo_mega.setup imports it)
    args = parse_args(argv)
    return run_entry_point("rspo-train", lambda: run(args), debug=args.debug)


if __name__ == "__main__":  # a spawn-context child re-imports __main__: main() must not run there
    sys.exit(main())
