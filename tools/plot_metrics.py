"""Plot a run's ``metrics.jsonl`` into a PNG (one panel per metric).

    python tools/plot_metrics.py runs/countdown/metrics.jsonl -o countdown.png \
        --keys reward accuracy loss relative_score_mean tokens_per_s
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from rspo_mega.training.metrics import DEFAULT_PLOT_KEYS, plot_metrics


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Plot metrics.jsonl of an rspo_mega run.")
    parser.add_argument("jsonl", help="path to metrics.jsonl")
    parser.add_argument("-o", "--out", default=None, help="PNG path (default: next to the jsonl)")
    parser.add_argument("--keys", nargs="+", default=list(DEFAULT_PLOT_KEYS),
                        help="metrics to plot, one panel each")
    args = parser.parse_args(argv)
    out = args.out or str(args.jsonl).rsplit(".", 1)[0] + ".png"
    try:
        plotted = plot_metrics(args.jsonl, out, args.keys)
    except (OSError, ValueError) as exc:
        print(f"plot_metrics: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({', '.join(plotted)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
