#!/usr/bin/env python
"""RL with exact rollouts against the fast path, side by side: same start, same budget, seeds.

    python tools/compare_rollouts.py [--out runs/compare_rollouts] [--seeds 3]
        [--config rspo_mega/configs/tiny_sudoku_long.yaml] [--variants exact,cache,fast]
        [--parallel 3] [section.key=value ...]

Every run is ``rspo-train`` on the config (default: the multi-block recipe) with one variant's
rollout settings, ``seed`` set per run (the config's seed, +1, ...), then the given overrides:

* ``exact``: the exact sampler (no KV cache, no threshold decoding);
* ``cache``: the dual block KV cache with the guard, exact schedule (no threshold);
* ``fast``: the config's rollouts as they are (the recipe's dual cache + threshold + guard).

Held-out evaluation decodes exactly in every run, so the variants are measured alike. The runs of
one seed go together (``--parallel``, one thread each, so they share the machine's load alike);
each in ``<out>/<variant>_seed<seed>/``; a run finished with the same command is reused.

At the end: per variant (mean ± standard error over seeds) held-out solved grids after the run
and the gain, rollout seconds per step, RL step seconds, and time-to-accuracy: training seconds
(the running sum of ``step_seconds``, evaluation excluded) until held-out accuracy first reaches
the ``exact`` runs' final mean (``--target`` sets another); ``<out>/rollouts.json`` with every
figure and ``<out>/accuracy_vs_time.png`` (held-out accuracy against training seconds).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import compare_algorithms as runs_lib  # noqa: E402  (run_one, CompareError)

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "rspo_mega" / "configs" / "tiny_sudoku_long.yaml"
VARIANTS: dict[str, list[str]] = {
    "exact": ["rollout.cache=none", "rollout.confidence_threshold=null",
              "rollout.cache_check_rate=0", "rollout.guard.enabled=false"],
    "cache": ["rollout.cache=dual", "rollout.confidence_threshold=null"],
    "fast": [],
}
FIXED = [*runs_lib.FIXED, "logging.log_interval=1"]  # every step's time is logged


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="compare_rollouts", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/compare_rollouts")
    p.add_argument("--config", default=str(RECIPE))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--parallel", type=int, default=3, help="runs at once, one thread each")
    p.add_argument("--target", type=float, default=None,
                   help="held-out solved grids (%%) of time-to-accuracy (default: exact's mean)")
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def plan_runs(args: argparse.Namespace) -> list[dict]:
    """One entry per run: variant (under ``algorithm``, the key runs_lib reads), seed, command;
    ``lr`` None: the rate is the config's (or an override's), as runs_lib records it."""
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown or not variants or args.seeds < 1 or args.parallel < 1:
        raise runs_lib.CompareError(f"--variants from {list(VARIANTS)} (got {unknown or 'none'}),"
                                    " --seeds and --parallel >= 1")
    config = yaml.safe_load(Path(args.config).read_text()) or {}
    base_seed = int(config.get("seed", 1234))
    train = [sys.executable, "-m", "rspo_mega.train", "--config", str(Path(args.config).resolve())]
    out = []
    for seed in range(base_seed, base_seed + args.seeds):
        for variant in variants:
            run_dir = Path(args.out).resolve() / f"{variant}_seed{seed}"
            cmd = [*train, *VARIANTS[variant], *args.overrides, *FIXED, f"seed={seed}",
                   f"logging.output_dir={run_dir}"]
            out.append({"algorithm": variant, "seed": seed, "lr": None, "dir": run_dir, "cmd": cmd})
    return out


def run_all(runs: list[dict], parallel: int) -> list[dict]:
    """The runs, ``parallel`` at a time with one thread each; their records in run order."""
    os.environ["OMP_NUM_THREADS"] = "1"
    pool = ThreadPoolExecutor(parallel)
    try:
        records = [record for record, _ in pool.map(runs_lib.run_one, runs)]
    except KeyboardInterrupt:  # end the running trainers; each worker then reaps its own
        import psutil

        for child in psutil.Process().children(recursive=True):
            child.terminate()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    for r in records:
        print(f"{r['algorithm']} seed {r['seed']}: solved {100 * r['before/eval/accuracy']:.1f}% "
              f"-> {100 * r['after/eval/accuracy']:.1f}%, {r['wall_s']:.0f} s", flush=True)
    return records


def _run_figures(record: dict, target: float) -> dict[str, Optional[float]]:
    """Per-step times and time-to-accuracy of one run, from its metrics."""
    from rspo_mega.training.metrics import METRICS_FILE, read_metrics
    from rspo_mega.training.run_outputs import time_to_accuracy, training_seconds

    rows = read_metrics(Path(record["dir"]) / METRICS_FILE)
    steps = [r for r in rows if r.get("step_seconds") is not None]
    reached = time_to_accuracy(rows, target)
    return {"rollout_s": statistics.fmean(r.get("time/rollout", 0.0) for r in steps),
            "step_s": statistics.fmean(r["step_seconds"] for r in steps),
            "train_s": max(training_seconds(rows).values()),
            "tta_s": None if reached is None else reached[1],
            "tta_step": None if reached is None else reached[0]}


def _mean_se(values: list[float]) -> str:
    if not values:
        return "not reached"
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
    return f"{mean:.2f} ± {se:.2f}" if mean < 10 else f"{mean:.1f} ± {se:.1f}"


def summarize(records: list[dict], target: Optional[float]) -> tuple[float, dict]:
    """The target (%) and per variant: every run's figures and the table's cells."""
    exact = [100 * r["after/eval/accuracy"] for r in records if r["algorithm"] == "exact"]
    if target is None:
        if not exact:
            raise runs_lib.CompareError("--target is needed without exact runs")
        target = statistics.fmean(exact)
    table: dict[str, dict] = {}
    for r in records:
        row = table.setdefault(r["algorithm"], {"runs": []})
        row["runs"].append({"seed": r["seed"], "solved_after": 100 * r["after/eval/accuracy"],
                            "gain": 100 * (r["after/eval/accuracy"] - r["before/eval/accuracy"]),
                            **_run_figures(r, target)})
    return target, table


def format_table(target: float, table: dict) -> str:
    head = ["variant", "seeds", "solved after %", "gain", "rollout s/step", "step s",
            f"time to {target:.1f}% (s)", "reached"]
    lines = [head]
    for variant, row in table.items():
        runs = row["runs"]
        tta = [r["tta_s"] for r in runs if r["tta_s"] is not None]
        lines.append([variant, str(len(runs))] + [
            _mean_se([r[k] for r in runs]) for k in ("solved_after", "gain", "rollout_s", "step_s")
        ] + [_mean_se(tta), f"{len(tta)}/{len(runs)}"])
    return runs_lib._aligned(lines)


def plot(records: list[dict], target: float, out_png: Path) -> Path:
    """Held-out solved grids against training seconds, one line per run, a colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rspo_mega.training.metrics import METRICS_FILE, read_metrics
    from rspo_mega.training.run_outputs import accuracy_points, training_seconds

    fig, ax = plt.subplots(figsize=(7, 4))
    colours = {v: f"C{i}" for i, v in enumerate(dict.fromkeys(r["algorithm"] for r in records))}
    labelled: set[str] = set()
    for r in records:
        rows = read_metrics(Path(r["dir"]) / METRICS_FILE)
        seconds = training_seconds(rows)
        points = [(seconds[s], a) for s, a in accuracy_points(rows) if s in seconds]
        label = None if r["algorithm"] in labelled else r["algorithm"]
        labelled.add(r["algorithm"])
        ax.plot(*zip(*points), marker="o", markersize=3, color=colours[r["algorithm"]],
                alpha=0.8, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.1f}%")
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("held-out solved grids (%)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGINT, runs_lib._raise_interrupt)
    signal.signal(signal.SIGTERM, runs_lib._raise_interrupt)
    try:
        records = run_all(plan_runs(args), args.parallel)
        target, table = summarize(records, args.target)
    except (runs_lib.CompareError, OSError, yaml.YAMLError) as exc:
        print(f"compare_rollouts: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("compare_rollouts: interrupted; finished runs are kept and reused", file=sys.stderr)
        return 130
    out = Path(args.out)
    (out / "rollouts.json").write_text(json.dumps({"target": target, "variants": table},
                                                  indent=1) + "\n")
    print(format_table(target, table))
    print(f"figure: {plot(records, target, out / 'accuracy_vs_time.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
