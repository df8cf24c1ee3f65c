#!/usr/bin/env python
"""RSPO, ESPO, diffu-GRPO and AGRPO side by side: same start, same rollout budget, several seeds,
each at its own learning rate.

    python tools/compare_algorithms.py [--out runs/compare] [--seeds 3] [--steps N]
        [--algorithms rspo,espo,diffu_grpo,agrpo] [--init-from DIR] [--config YAML]
        [--eval-interval 50] [--lr-grid 3e-5,1e-4,3e-4,1e-3 [--validation 256]]
        [--target-gain 5] [section.key=value ...]

Every run is ``rspo-train`` (``python -m rspo_mega.train``) on the embedded task: the config
(default: the tiny default, ``rspo_mega/configs/tiny_sudoku.yaml``) with ``algorithm.name`` and
``seed`` set per run, the algorithm's settings below, then the given overrides. All runs start
from the same weights, the config's ``checkpoint.init_from`` unless ``--init-from`` names another
(an SFT run's save_dir, a trainer checkpoint or an HF LLaDA directory), and draw the same rollout
budget: the config's ``train_steps`` (or ``--steps``), prompts per step, group size and sampler.
Seeds are the config's seed, +1, +2, ... The runs go one after another, each in its own
directory under ``--out`` (``<algorithm>_seed<seed>``, with a grid ``<algorithm>_lr<rate>_seed<seed>``:
its ``metrics.jsonl``, ``config.yaml`` and ``train.log``); a run finished with the same command
is reused, so an interrupted comparison continues where it stopped. Ctrl-C (or SIGTERM) ends the
running ``rspo-train`` and everything it started.

Learning rates. Without ``--lr-grid`` every run uses the config's ``optimizer.lr``. With it,
each algorithm first runs once (the first seed) at every rate of the grid, on a config with a
validation split (``data.num_validation_examples``, ``--validation`` puzzles from solution grids
held out of both train and test, see docs/DATA.md); its rate is the one with the most validation
puzzles solved after the run (ties: the most validation cells). Then it runs every seed at that
rate (the first seed's run is the grid's). Test figures never enter the choice.

At the end: a table per algorithm (mean, sample standard deviation and range over seeds) of
held-out solved grids (``after/eval/accuracy``), held-out cells (``after/eval/reward``: the share
of empty cells filled correctly, the Sudoku reward), the gain in solved grids over
``before/eval/accuracy``, wall time per run, and time to accuracy: the first held-out evaluation
(every ``--eval-interval`` steps) at which solved grids reach the start + ``--target-gain``
points, as steps, rollouts consumed (completions generated) and training seconds (the summed
``step_seconds`` of the steps up to it, evaluations excluded). With a grid, the grid's validation
figures too. ``<out>/comparison.json`` holds every run's figures; ``<out>/curves.png`` the rollout
reward and the held-out solved grids against the step for every run.

Settings. RSPO runs the config as it is. ESPO, diffu-GRPO and AGRPO get the algorithm settings of
their papers' code, applied to this task; the task's optimizer, batch, sampler and LR schedule
stay the config's for all four, so only the algorithm (and, with a grid, the rate) differs:

* ESPO (Ou et al., arXiv 2512.03759; the Sudoku recipe of its code): the coupled (antithetic)
  ELBO estimator with 2 Monte-Carlo pairs per completion, leave-one-out advantages not scaled by
  the group's standard deviation (its trainer's), ratio clip 0.2, k2 penalty 0.01, 8 inner
  updates per rollout batch, each on its own mask draw.
* diffu-GRPO (d1, Zhao et al., arXiv 2504.12216; its training config): one-step log-probs
  (completion fully masked, prompt tokens masked with probability 0.15), one sample per
  completion, standardized advantages (as GRPO), ratio clip 0.5, k3 penalty 0.04, 12 inner
  updates per rollout batch, each on its own mask draw.
* AGRPO (Zhan, arXiv 2510.04019; the ``train.yaml`` of its code): the trajectory estimator,
  entropy-weighted stratified step sampling with the same share of the denoising steps as its
  24 of 128 (here 3 of the config's 16), each completion's own steps, mean-centred advantages,
  ratio clip 0.2, no KL penalty, one update per rollout batch. Its code also samples at
  temperature 0.6 with top-k/top-p and random unmasking: sampler settings, which stay the
  config's here.

ESPO's and diffu-GRPO's trainers draw new masks for every inner update and score the rollout
policy (and the reference) on them (``likelihood.fresh_masks_per_update=true``, see
docs/OPTIONS.md); ``likelihood.fresh_masks_per_update=false`` among the overrides keeps one draw
per rollout batch. More inner updates cost more optimizer work per step, which the wall-time
column shows.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_DEFAULT = ROOT / "rspo_mega" / "configs" / "tiny_sudoku.yaml"
FRESH = "likelihood.fresh_masks_per_update=true"
SETTINGS: dict[str, list[str]] = {
    "rspo": [],
    "espo": ["likelihood.mask_scheme=coupled", "likelihood.mc_samples=2",
             "algorithm.advantage=leave_one_out", "algorithm.clip_eps=0.2",
             "algorithm.kl_beta=0.01", "algorithm.inner_updates=8", FRESH],
    "diffu_grpo": ["likelihood.mask_scheme=one_step", "likelihood.one_step_prompt_mask_prob=0.15",
                   "likelihood.mc_samples=1", "algorithm.advantage=standardized",
                   "algorithm.clip_eps=0.5", "algorithm.kl_beta=0.04",
                   "algorithm.inner_updates=12", FRESH],
    "agrpo": ["likelihood.mask_scheme=trajectory", "likelihood.step_sampling=entropy",
              "likelihood.stratified_steps=true", "likelihood.mc_samples=3",
              "likelihood.mask_sharing=completion", "algorithm.advantage=mean",
              "algorithm.clip_eps=0.2", "algorithm.kl_beta=0.0", "algorithm.inner_updates=1"],
}
# Every run: its own directory, no checkpoints or export (a shared save_dir would be resumed).
FIXED = ["logging.progress_bar=false", "logging.tensorboard=false", "checkpoint.save_dir=null",
         "checkpoint.export_hf=null"]
RESULT = "result.json"
STOP_WAIT_S = 30.0  # after SIGTERM (rspo-train stops after its current step), then SIGKILL
HELD_OUT = ("before/eval/accuracy", "before/eval/reward", "after/eval/accuracy",
            "after/eval/reward")
VALIDATION = ("before/val/accuracy", "before/val/reward", "after/val/accuracy",
              "after/val/reward")


class CompareError(RuntimeError):
    """A problem the comparison reports in one line (bad arguments, a failed run)."""


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_algorithms", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare", help="directory of the runs and results")
    p.add_argument("--config", default=str(TINY_DEFAULT), help="run config (default: tiny default)")
    p.add_argument("--algorithms", default=",".join(SETTINGS),
                   help=f"comma-separated, from {', '.join(SETTINGS)}")
    p.add_argument("--seeds", type=int, default=3, help="runs per algorithm (default 3)")
    p.add_argument("--steps", type=int, default=None, help="train_steps of every run")
    p.add_argument("--init-from", default=None, help="start of every run (default: the config's)")
    p.add_argument("--eval-interval", type=int, default=50,
                   help="held-out evaluation every N steps (curves, time to accuracy; 0: "
                        "before/after only)")
    p.add_argument("--lr-grid", default=None,
                   help="comma-separated learning rates searched per algorithm on validation")
    p.add_argument("--validation", type=int, default=256,
                   help="validation puzzles of every run with --lr-grid (default 256)")
    p.add_argument("--target-gain", type=float, default=5.0,
                   help="time to accuracy: held-out solved grids of the start + this many points")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p.parse_args(argv)


def learning_rates(args: argparse.Namespace) -> Optional[list[float]]:
    """The ``--lr-grid`` rates, ascending (None without a grid)."""
    if args.lr_grid is None:
        return None
    try:
        rates = sorted({float(x) for x in args.lr_grid.split(",") if x.strip()})
    except ValueError:
        raise CompareError(f"--lr-grid {args.lr_grid!r}: expected comma-separated numbers") \
            from None
    if not rates or rates[0] <= 0:
        raise CompareError(f"--lr-grid {args.lr_grid!r}: expected learning rates > 0")
    if any(o.startswith("optimizer.lr=") for o in args.overrides):
        raise CompareError("optimizer.lr is set per run by --lr-grid; drop the override")
    if args.validation < 1:
        raise CompareError("--validation must be >= 1 with --lr-grid")
    return rates


def _check_args(args: argparse.Namespace, config: dict) -> list[str]:
    """The algorithms; raises on a bad argument or a config without a start."""
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(SETTINGS))
    if unknown or not algorithms:
        raise CompareError(f"--algorithms: {unknown or 'none given'}; choose from {list(SETTINGS)}")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1) or args.eval_interval < 0:
        raise CompareError("--seeds and --steps must be >= 1, --eval-interval >= 0")
    given = any(o.startswith("checkpoint.init_from=") for o in args.overrides)
    if not (args.init_from or given or (config.get("checkpoint") or {}).get("init_from")):
        raise CompareError(f"{args.config} has no checkpoint.init_from: name the start of every "
                           "run with --init-from DIR (an SFT run's save_dir or an HF directory)")
    return algorithms


class Planner:
    """The ``rspo-train`` command and directory of every (algorithm, rate, seed)."""

    def __init__(self, args: argparse.Namespace) -> None:
        config = yaml.safe_load(Path(args.config).read_text()) or {}
        self.algorithms = _check_args(args, config)
        self.rates = learning_rates(args)
        self.out, self.overrides, self.seeds = Path(args.out).resolve(), args.overrides, args.seeds
        self.common = [*FIXED, f"eval_interval={args.eval_interval}"]
        if args.init_from:
            self.common.append(f"checkpoint.init_from={Path(args.init_from).resolve()}")
        if args.steps:
            self.common.append(f"train_steps={args.steps}")
        if self.rates:
            self.common.append(f"data.num_validation_examples={args.validation}")
        if "seed" in config:
            self.base_seed = int(config["seed"])
        else:
            from rspo_mega.config.schema import TrainConfig  # imports megatron-core: only if needed

            self.base_seed = TrainConfig.seed
        self.train = [sys.executable, "-m", "rspo_mega.train", "--config",
                      str(Path(args.config).resolve())]

    def run(self, algorithm: str, seed: int, lr: Optional[float] = None) -> dict:
        """One run: algorithm, seed, rate (None: the config's), directory, command."""
        name = f"{algorithm}_seed{seed}" if lr is None else f"{algorithm}_lr{lr:g}_seed{seed}"
        run_dir = self.out / name
        rate = [] if lr is None else [f"optimizer.lr={lr:g}"]
        cmd = [*self.train, *SETTINGS[algorithm], *self.overrides, *self.common, *rate,
               f"algorithm.name={algorithm}", f"seed={seed}", f"logging.output_dir={run_dir}"]
        return {"algorithm": algorithm, "seed": seed, "lr": lr, "dir": run_dir, "cmd": cmd}

    def grid(self) -> list[dict]:
        """Every algorithm at every rate of the grid, first seed (empty without a grid)."""
        return [self.run(a, self.base_seed, lr) for a in self.algorithms for lr in self.rates or []]

    def seeded(self, best: dict[str, Optional[float]]) -> list[dict]:
        """Every algorithm's seeds at its rate (``best``; None: the config's)."""
        return [self.run(a, seed, best.get(a)) for a in self.algorithms
                for seed in range(self.base_seed, self.base_seed + self.seeds)]


def choose_rates(records: list[dict]) -> dict[str, float]:
    """Per algorithm, the grid rate with the most validation puzzles solved after the run (ties:
    the most validation cells, then the smaller rate)."""
    best: dict[str, dict] = {}
    for r in records:
        key = (r["after/val/accuracy"], r["after/val/reward"], -r["lr"])
        held = best.get(r["algorithm"])
        if held is None or key > (held["after/val/accuracy"], held["after/val/reward"],
                                  -held["lr"]):
            best[r["algorithm"]] = r
    return {a: r["lr"] for a, r in best.items()}


def _exited(proc: subprocess.Popen, timeout: Optional[float]) -> bool:
    """Whether ``proc`` exited within ``timeout`` seconds (None: wait until it does). It is not
    reaped, so its pid, the id of its process group, stays reserved for :func:`_end_group`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        flags = os.WEXITED | os.WNOWAIT | (0 if deadline is None else os.WNOHANG)
        if os.waitid(os.P_PID, proc.pid, flags) is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)


def _end_group(proc: subprocess.Popen) -> None:
    """End ``proc`` and the rest of its process group: SIGTERM and up to ``STOP_WAIT_S`` for it
    to stop (a second Ctrl-C skips the wait), then SIGKILL to whatever of the group is left."""
    try:
        if not _exited(proc, 0):
            os.killpg(proc.pid, signal.SIGTERM)
            _exited(proc, STOP_WAIT_S)
    except KeyboardInterrupt:
        pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _run_logged(cmd: list[str], log_path: Path) -> int:
    """Run ``cmd`` in its own process group, output into ``log_path``; its exit code. Whatever
    it started ends with it, also on Ctrl-C."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _exited(proc, None)
        finally:
            _end_group(proc)
    return proc.returncode


def _figures(run_dir: Path) -> dict[str, float]:
    """Before/after held-out (and validation) figures of a finished run and its completions per
    step, from its ``metrics.jsonl`` and ``config.yaml``."""
    from rspo_mega.training.metrics import METRICS_FILE, read_metrics

    found: dict[str, float] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        for key in HELD_OUT + VALIDATION:
            if record.get(key) is not None:
                found[key] = float(record[key])
    if any(key not in found for key in HELD_OUT):
        raise CompareError(f"{run_dir}: metrics.jsonl lacks held-out figures before and after "
                           "the run (is data.num_test_examples 0?)")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    found["completions_per_step"] = int(config["global_batch_size"])
    found["train_steps"] = int(config["train_steps"])
    return found


def run_one(run: dict) -> tuple[dict, bool]:
    """Run one comparison run, or reuse its finished result; (its record, whether reused)."""
    done = run["dir"] / RESULT
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("cmd") == run["cmd"][1:]:  # the interpreter may differ between sessions
            return {**record, "lr": run["lr"], **_figures(run["dir"])}, True
    run["dir"].mkdir(parents=True, exist_ok=True)
    (run["dir"] / "metrics.jsonl").unlink(missing_ok=True)  # an unfinished earlier attempt
    start = time.monotonic()
    code = _run_logged(run["cmd"], run["dir"] / "train.log")
    if code != 0:
        tail = (run["dir"] / "train.log").read_text().splitlines()[-15:]
        raise CompareError(f"{run['algorithm']} seed {run['seed']} exited with code {code}; "
                           f"log {run['dir'] / 'train.log'}:\n" + "\n".join(tail))
    record = {"algorithm": run["algorithm"], "seed": run["seed"], "lr": run["lr"],
              "dir": str(run["dir"]), "wall_s": time.monotonic() - start,
              **_figures(run["dir"]), "cmd": run["cmd"][1:]}
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record, False


def time_to_target(records: list[dict], target: float) -> Optional[dict[str, float]]:
    """The first held-out evaluation of a run's ``metrics.jsonl`` records whose solved share
    reaches ``target`` (a fraction): its ``step``, and ``train_s``, the summed ``step_seconds``
    of the steps up to it; None if none does."""
    from rspo_mega.training.run_outputs import time_to_accuracy

    hit = time_to_accuracy(records, 100 * target)
    return None if hit is None else {"step": hit[0], "train_s": hit[1]}


def with_time_to_target(record: dict, gain_points: float) -> dict:
    """``record`` with ``target`` (start + ``gain_points``) and ``to_target`` (see
    :func:`time_to_target`, plus the rollouts consumed by then)."""
    from rspo_mega.training.metrics import METRICS_FILE, read_metrics

    target = record["before/eval/accuracy"] + gain_points / 100
    hit = time_to_target(read_metrics(Path(record["dir"]) / METRICS_FILE), target)
    if hit is not None:
        hit["rollouts"] = hit["step"] * record["completions_per_step"]
    return {**record, "target": target, "to_target": hit}


def _spread(values: list[float], digits: int = 1) -> str:
    """``mean ± sd [min, max]`` (only the value when all are equal, ``-`` without any)."""
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if min(values) == max(values):
        return f"{mean:.{digits}f}"
    return (f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f} "
            f"[{min(values):.{digits}f}, {max(values):.{digits}f}]")


ROW_KEYS = ("solved_before", "solved_after", "gain", "cells_after", "cells_gain", "wall_s",
            "rollouts", "reached", "steps_to_target", "rollouts_to_target", "train_s_to_target")


def summarize(records: list[dict]) -> dict[str, dict]:
    """Per algorithm (in run order): its rate, solved grids and cells (%), gain (points), wall
    time (s), rollouts per run and, over the seeds that reached the target, the steps, rollouts
    and training seconds it took (``reached``: one 0/1 per seed)."""
    out: dict[str, dict] = {}
    for r in records:
        row = out.setdefault(r["algorithm"], {"lr": r.get("lr"), **{k: [] for k in ROW_KEYS}})
        row["solved_before"].append(100 * r["before/eval/accuracy"])
        row["solved_after"].append(100 * r["after/eval/accuracy"])
        row["gain"].append(100 * (r["after/eval/accuracy"] - r["before/eval/accuracy"]))
        row["cells_after"].append(100 * r["after/eval/reward"])
        row["cells_gain"].append(100 * (r["after/eval/reward"] - r["before/eval/reward"]))
        row["wall_s"].append(r["wall_s"])
        row["rollouts"].append(r["train_steps"] * r["completions_per_step"])
        hit = r.get("to_target")
        row["reached"].append(float(hit is not None))
        if hit is not None:
            row["steps_to_target"].append(hit["step"])
            row["rollouts_to_target"].append(hit["rollouts"])
            row["train_s_to_target"].append(hit["train_s"])
    return out


COLUMNS = (("solved before %", "solved_before", 1), ("solved after %", "solved_after", 1),
           ("gain (points)", "gain", 1), ("cells after %", "cells_after", 1),
           ("cells gain", "cells_gain", 1), ("wall s", "wall_s", 0), ("rollouts", "rollouts", 0),
           ("steps to target", "steps_to_target", 0),
           ("rollouts to target", "rollouts_to_target", 0),
           ("train s to target", "train_s_to_target", 0))


def _aligned(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def format_table(summary: dict[str, dict]) -> str:
    """The comparison table: one row per algorithm, mean ± sd [min, max] over its seeds; the
    target columns over the seeds that reached it (``reached``: how many)."""
    rows = [["algorithm", "lr", "seeds", "reached", *(title for title, _, _ in COLUMNS)]]
    for algorithm, row in summary.items():
        lr = "config" if row["lr"] is None else f"{row['lr']:g}"
        reached = f"{int(sum(row['reached']))}/{len(row['reached'])}"
        rows.append([algorithm, lr, str(len(row["gain"])), reached,
                     *(_spread(row[key], digits) for _, key, digits in COLUMNS)])
    return _aligned(rows)


def format_grid(records: list[dict], best: dict[str, float]) -> str:
    """The learning-rate search: validation solved grids and cells before and after each run."""
    rows = [["algorithm", "lr", "val solved before %", "val solved after %", "val cells after %",
             "chosen"]]
    for r in records:
        rows.append([r["algorithm"], f"{r['lr']:g}", f"{100 * r['before/val/accuracy']:.1f}",
                     f"{100 * r['after/val/accuracy']:.1f}", f"{100 * r['after/val/reward']:.1f}",
                     "*" if best.get(r["algorithm"]) == r["lr"] else ""])
    return _aligned(rows)


def plot_runs(records: list[dict], out_png: Path) -> Path:
    """Rollout reward (smoothed) and held-out solved grids (%) against the step, every run, one
    colour per algorithm, into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rspo_mega.training.metrics import METRICS_FILE, read_metrics
    from rspo_mega.training.run_outputs import accuracy_points, smooth

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    colours = {a: f"C{i}" for i, a in enumerate(dict.fromkeys(r["algorithm"] for r in records))}
    labelled: set[str] = set()
    for r in records:
        rows = read_metrics(Path(r["dir"]) / METRICS_FILE)
        reward = [(x["step"], x["reward"]) for x in rows if x.get("reward") is not None]
        held = accuracy_points(rows)
        label = None if r["algorithm"] in labelled else r["algorithm"]
        labelled.add(r["algorithm"])
        colour = colours[r["algorithm"]]
        if reward:
            top.plot([s for s, _ in reward], smooth([v for _, v in reward]), color=colour,
                     alpha=0.8, label=label)
        bottom.plot([s for s, _ in held], [v for _, v in held], color=colour, marker="o",
                    markersize=3, alpha=0.8, label=label)
    top.set_ylabel("rollout reward (cells)")
    bottom.set_ylabel("held-out solved grids (%)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    fig.suptitle(f"{' / '.join(colours)}, one line per seed")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_all(runs: list[dict]) -> list[dict]:
    """Every run in order (printing one line before and one after each); their records."""
    records = []
    for i, run in enumerate(runs, 1):
        rate = "" if run["lr"] is None else f" lr {run['lr']:g}"
        print(f"[{i}/{len(runs)}] {run['algorithm']}{rate} seed {run['seed']}: {run['dir']}",
              flush=True)
        r, reused = run_one(run)
        val = f", validation {100 * r['after/val/accuracy']:.1f}%" \
            if "after/val/accuracy" in r else ""
        print(f"    solved {100 * r['before/eval/accuracy']:.1f}% -> "
              f"{100 * r['after/eval/accuracy']:.1f}%, cells {100 * r['after/eval/reward']:.1f}%"
              f"{val}, {r['wall_s']:.0f} s{' (reused)' if reused else ''}", flush=True)
        records.append(r)
    return records


def _compare(planner: Planner, target_gain: float) -> dict:
    """The grid (if any), then every seed at each algorithm's rate; the results."""
    grid = _run_all(planner.grid())
    best = choose_rates(grid) if grid else {}
    if grid:
        print(format_grid(grid, best), flush=True)
    records = [with_time_to_target(r, target_gain) for r in _run_all(planner.seeded(best))]
    return {"grid": grid, "chosen_lr": best, "target_gain": target_gain, "runs": records,
            "summary": summarize(records)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # SIGINT too: a shell's background job starts with SIGINT ignored, and Python then keeps it so
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        planner = Planner(args)
    except (CompareError, OSError, yaml.YAMLError) as exc:
        print(f"compare_algorithms: {exc}", file=sys.stderr)
        return 2
    try:
        result = _compare(planner, args.target_gain)
    except CompareError as exc:
        print(f"compare_algorithms: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare_algorithms: interrupted; finished runs are kept and reused",
              file=sys.stderr)
        return 130
    out = Path(args.out)
    (out / "comparison.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(format_table(result["summary"]))
    print(f"target: the start + {args.target_gain:g} points of held-out solved grids")
    print(f"curves: {plot_runs(result['runs'], out / 'curves.png')}\n"
          f"results: {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
