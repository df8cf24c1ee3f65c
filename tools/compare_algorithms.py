#!/usr/bin/env python
"""RSPO, ESPO, diffu-GRPO and AGRPO side by side: same start, same rollout budget, several seeds.

    python tools/compare_algorithms.py [--out runs/compare] [--seeds 3] [--steps N]
        [--algorithms rspo,espo,diffu_grpo,agrpo] [--init-from DIR] [--config YAML]
        [--eval-interval 50] [section.key=value ...]

Every run is ``rspo-train`` (``python -m rspo_mega.train``) on the embedded task: the config
(default: the tiny default, ``rspo_mega/configs/tiny_sudoku.yaml``) with ``algorithm.name`` and
``seed`` set per run, the algorithm's settings below, then the given overrides. All runs start
from the same weights, the config's ``checkpoint.init_from`` unless ``--init-from`` names another
(an SFT run's save_dir, a trainer checkpoint or an HF LLaDA directory), and draw the same rollout
budget: the config's ``train_steps`` (or ``--steps``), prompts per step, group size and sampler.
Seeds are the config's seed, +1, +2, ... The runs go one after another, each in
``<out>/<algorithm>_seed<seed>/`` (its ``metrics.jsonl``, ``config.yaml`` and ``train.log``); a run
finished with the same command is reused, so an interrupted comparison continues where it
stopped. Ctrl-C (or SIGTERM) ends the running ``rspo-train`` and everything it started.

At the end: a table per algorithm (mean, sample standard deviation and range over seeds) of
held-out solved grids (``after/eval/accuracy``), held-out cells (``after/eval/reward``: the share
of empty cells filled correctly, the Sudoku reward), the gain in solved grids over
``before/eval/accuracy``, and wall time per run; ``<out>/comparison.json`` with every run's
figures; ``<out>/curves.png`` with the rollout reward and the held-out solved grids against the
step for every run.

Settings. RSPO runs the config as it is. ESPO, diffu-GRPO and AGRPO get their papers' algorithm
settings, applied to this task; the task's optimizer, batch, sampler and LR schedule stay the
config's for all four, so only the algorithm differs:

* ESPO (Ou et al., arXiv 2512.03759; the Sudoku recipe of its code): the coupled (antithetic)
  ELBO estimator with 2 Monte-Carlo pairs per completion, mean-centred advantages (rewards not
  scaled by their standard deviation), ratio clip 0.2, k2 penalty 0.01, 8 inner updates per
  rollout batch.
* diffu-GRPO (d1, Zhao et al., arXiv 2504.12216; its training config): one-step log-probs
  (completion fully masked, prompt tokens masked with probability 0.15), one sample per
  completion, standardized advantages (as GRPO), ratio clip 0.5, k3 penalty 0.04, 12 inner
  updates per rollout batch.
* AGRPO (Zhan, arXiv 2510.04019; the ``train.yaml`` of its code): the trajectory estimator,
  entropy-weighted stratified step sampling with the same share of the denoising steps as its
  24 of 128 (here 3 of the config's 16), each completion's own steps, mean-centred advantages,
  ratio clip 0.2, no KL penalty, one update per rollout batch. Its code also samples at
  temperature 0.6 with top-k/top-p and random unmasking: sampler settings, which stay the
  config's here.

ESPO and diffu-GRPO draw new masks for each inner update; here the masks of a rollout batch stay fixed
over its inner updates (``likelihood.fresh_masks_per_update`` is RSPO's only, see
``docs/OPTIONS.md``). More inner updates cost more optimizer work per step, which the wall-time
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
SETTINGS: dict[str, list[str]] = {
    "rspo": [],
    "espo": ["likelihood.mask_scheme=coupled", "likelihood.mc_samples=2",
             "algorithm.advantage=mean", "algorithm.clip_eps=0.2", "algorithm.kl_beta=0.01",
             "algorithm.inner_updates=8"],
    "diffu_grpo": ["likelihood.mask_scheme=one_step", "likelihood.one_step_prompt_mask_prob=0.15",
                   "likelihood.mc_samples=1", "algorithm.advantage=standardized",
                   "algorithm.clip_eps=0.5", "algorithm.kl_beta=0.04",
                   "algorithm.inner_updates=12"],
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
                   help="held-out evaluation every N steps for the curves (0: before/after only)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every run")
    return p.parse_args(argv)


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """One entry per run: algorithm, seed, directory and the ``rspo-train`` command."""
    algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    unknown = sorted(set(algorithms) - set(SETTINGS))
    if unknown or not algorithms:
        raise CompareError(f"--algorithms: {unknown or 'none given'}; choose from {list(SETTINGS)}")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1) or args.eval_interval < 0:
        raise CompareError("--seeds and --steps must be >= 1, --eval-interval >= 0")
    config = yaml.safe_load(Path(args.config).read_text()) or {}
    given = any(o.startswith("checkpoint.init_from=") for o in args.overrides)
    if not (args.init_from or given or (config.get("checkpoint") or {}).get("init_from")):
        raise CompareError(f"{args.config} has no checkpoint.init_from: name the start of every "
                           "run with --init-from DIR (an SFT run's save_dir or an HF directory)")
    common = [*FIXED, f"eval_interval={args.eval_interval}"]
    if args.init_from:
        common.append(f"checkpoint.init_from={Path(args.init_from).resolve()}")
    if args.steps:
        common.append(f"train_steps={args.steps}")
    if "seed" in config:
        base_seed = int(config["seed"])
    else:
        from rspo_mega.config.schema import TrainConfig  # imports megatron-core: only if needed

        base_seed = TrainConfig.seed
    train = [sys.executable, "-m", "rspo_mega.train", "--config", str(Path(args.config).resolve())]
    runs = []
    for algorithm in algorithms:
        for seed in range(base_seed, base_seed + args.seeds):
            run_dir = Path(args.out).resolve() / f"{algorithm}_seed{seed}"
            cmd = [*train, *SETTINGS[algorithm], *args.overrides, *common,
                   f"algorithm.name={algorithm}", f"seed={seed}", f"logging.output_dir={run_dir}"]
            runs.append({"algorithm": algorithm, "seed": seed, "dir": run_dir, "cmd": cmd})
    return runs


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
    """Before/after held-out figures of a finished run, from its ``metrics.jsonl``."""
    from rspo_mega.training.metrics import METRICS_FILE, read_metrics

    found: dict[str, float] = {}
    for record in read_metrics(run_dir / METRICS_FILE):
        for key in ("before/eval/accuracy", "before/eval/reward", "after/eval/accuracy",
                    "after/eval/reward"):
            if record.get(key) is not None:
                found[key] = float(record[key])
    if len(found) < 4:
        raise CompareError(f"{run_dir}: metrics.jsonl lacks held-out figures before and after "
                           "the run (is data.num_test_examples 0?)")
    return found


def run_one(run: dict) -> tuple[dict, bool]:
    """Run one comparison run, or reuse its finished result; (its record, whether reused)."""
    done = run["dir"] / RESULT
    if done.is_file():
        record = json.loads(done.read_text())
        if record.get("cmd") == run["cmd"][1:]:  # the interpreter may differ between sessions
            return record, True
    run["dir"].mkdir(parents=True, exist_ok=True)
    (run["dir"] / "metrics.jsonl").unlink(missing_ok=True)  # an unfinished earlier attempt
    start = time.monotonic()
    code = _run_logged(run["cmd"], run["dir"] / "train.log")
    if code != 0:
        tail = (run["dir"] / "train.log").read_text().splitlines()[-15:]
        raise CompareError(f"{run['algorithm']} seed {run['seed']} exited with code {code}; "
                           f"log {run['dir'] / 'train.log'}:\n" + "\n".join(tail))
    record = {"algorithm": run["algorithm"], "seed": run["seed"], "dir": str(run["dir"]),
              "wall_s": time.monotonic() - start, **_figures(run["dir"]), "cmd": run["cmd"][1:]}
    done.write_text(json.dumps(record, indent=1) + "\n")
    return record, False


def _spread(values: list[float]) -> str:
    """``mean ± sd [min, max]`` (the sd and range only with more than one value)."""
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return (f"{mean:.1f} ± {statistics.stdev(values):.1f} "
            f"[{min(values):.1f}, {max(values):.1f}]")


def summarize(records: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Per algorithm (in run order): solved grids and cells (%), gain (points), wall time (s)."""
    out: dict[str, dict[str, list[float]]] = {}
    for r in records:
        row = out.setdefault(r["algorithm"], {k: [] for k in (
            "solved_before", "solved_after", "gain", "cells_after", "cells_gain", "wall_s")})
        row["solved_before"].append(100 * r["before/eval/accuracy"])
        row["solved_after"].append(100 * r["after/eval/accuracy"])
        row["gain"].append(100 * (r["after/eval/accuracy"] - r["before/eval/accuracy"]))
        row["cells_after"].append(100 * r["after/eval/reward"])
        row["cells_gain"].append(100 * (r["after/eval/reward"] - r["before/eval/reward"]))
        row["wall_s"].append(r["wall_s"])
    return out


COLUMNS = (("solved before %", "solved_before"), ("solved after %", "solved_after"),
           ("gain (points)", "gain"), ("cells after %", "cells_after"),
           ("cells gain", "cells_gain"), ("wall s", "wall_s"))


def format_table(summary: dict[str, dict[str, list[float]]]) -> str:
    """The comparison table: one row per algorithm, mean ± sd [min, max] over its seeds."""
    rows = [["algorithm", "seeds", *(title for title, _ in COLUMNS)]]
    for algorithm, row in summary.items():
        rows.append([algorithm, str(len(row["gain"])), *(_spread(row[key]) for _, key in COLUMNS)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def plot_runs(records: list[dict], out_png: Path) -> Path:
    """Rollout reward (smoothed) and held-out solved grids (%) against the step, every run, one
    colour per algorithm, into ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rspo_mega.training.metrics import METRICS_FILE, read_metrics
    from rspo_mega.training.report import accuracy_points, smooth

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
        print(f"[{i}/{len(runs)}] {run['algorithm']} seed {run['seed']}: {run['dir']}", flush=True)
        r, reused = run_one(run)
        print(f"    solved {100 * r['before/eval/accuracy']:.1f}% -> "
              f"{100 * r['after/eval/accuracy']:.1f}%, cells {100 * r['after/eval/reward']:.1f}%, "
              f"{r['wall_s']:.0f} s{' (reused)' if reused else ''}", flush=True)
        records.append(r)
    return records


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    # SIGINT too: a shell's background job starts with SIGINT ignored, and Python then keeps it so
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runs = plan_runs(args)
    except (CompareError, OSError, yaml.YAMLError) as exc:
        print(f"compare_algorithms: {exc}", file=sys.stderr)
        return 2
    try:
        records = _run_all(runs)
    except CompareError as exc:
        print(f"compare_algorithms: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("compare_algorithms: interrupted; finished runs are kept and reused",
              file=sys.stderr)
        return 130
    out = Path(args.out)
    summary = summarize(records)
    (out / "comparison.json").write_text(json.dumps({"runs": records, "summary": summary},
                                                    indent=1) + "\n")
    print(format_table(summary))
    print(f"curves: {plot_runs(records, out / 'curves.png')}\nresults: {out / 'comparison.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
