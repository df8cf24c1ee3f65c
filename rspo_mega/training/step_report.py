"""What a run prints per step, on rank 0: a progress bar on a terminal, plain lines elsewhere.

:func:`step_reporter` picks the form. With ``logging.progress_bar`` and both stdout and stderr on
a terminal it is a tqdm bar (on stderr) whose postfix shows the run kind's own figures
(:class:`StepPostfix`). Otherwise (output redirected to a file, as on a batch system, or
``progress_bar=false``) it is :class:`StepLines`: one line on stdout every
``logging.log_interval`` steps and at the last step, without carriage returns::

    step 3/250 | reward 0.743 | solved 27% | loss 0.0012 | held-out 31.2% | 3.41 s/step | 1204 tokens/s

Ranks other than 0 print nothing.
"""

from __future__ import annotations

import sys
from typing import Any, Mapping, Optional, TextIO

# Progress-bar fields of a step, by run kind: label -> (metric, format). RL shows what the
# rollouts earned (its loss is a centred surrogate near 0), SFT its loss.
STEP_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "rl": {"reward": ("reward", ".3f"), "solved": ("accuracy", ".0%")},
    "sft": {"loss": ("loss", ".4f")},
}
HELD_OUT_FIELD = ("held-out", "eval/accuracy", ".1%")  # kept from the latest evaluation
# Plain-line fields after the step's own: label -> (metric, format); the held-out accuracy only
# where the step measured it.
LINE_FIELDS: dict[str, dict[str, tuple[str, str]]] = {
    "rl": {**STEP_FIELDS["rl"], "loss": ("loss", ".4g")},
    "sft": STEP_FIELDS["sft"],
}


class StepPostfix:
    """The progress-bar postfix of each step of a run of ``kind`` (``"rl"`` or ``"sft"``): its
    :data:`STEP_FIELDS` the step logged and the latest held-out accuracy."""

    def __init__(self, kind: str) -> None:
        self.fields = STEP_FIELDS[kind]
        self.held_out: Optional[str] = None

    def __call__(self, metrics: Mapping[str, float]) -> dict[str, str]:
        out = {label: f"{metrics[key]:{fmt}}" for label, (key, fmt) in self.fields.items()
               if key in metrics}
        label, key, fmt = HELD_OUT_FIELD
        if metrics.get(key) is not None:
            self.held_out = f"{metrics[key]:{fmt}}"
        if self.held_out is not None:
            out[label] = self.held_out
        return out


def step_line(step: int, total: int, kind: str, metrics: Mapping[str, float]) -> str:
    """The plain line of ``step`` of ``total``: the run kind's figures, the held-out accuracy
    when measured at this step, seconds per step and tokens per second."""
    parts = [f"step {step}/{total}"]
    label, key, fmt = HELD_OUT_FIELD
    fields = {**LINE_FIELDS[kind], label: (key, fmt)}
    parts += [f"{name} {metrics[k]:{f}}" for name, (k, f) in fields.items()
              if metrics.get(k) is not None]
    if metrics.get("step_seconds") is not None:
        parts.append(f"{metrics['step_seconds']:.2f} s/step")
    if metrics.get("tokens_per_s") is not None:
        parts.append(f"{metrics['tokens_per_s']:.0f} tokens/s")
    return " | ".join(parts)


class StepLines:
    """One :func:`step_line` every ``interval`` steps and at the last one, on ``stream``."""

    def __init__(self, total: int, kind: str, interval: int, stream: TextIO) -> None:
        self.total, self.kind, self.interval, self.stream = total, kind, interval, stream

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        if step % self.interval == 0 or step == self.total:
            print(step_line(step, self.total, self.kind, metrics), file=self.stream, flush=True)

    def close(self) -> None:
        pass


class ProgressBar:
    """A tqdm bar over the run's steps with :class:`StepPostfix` figures."""

    def __init__(self, total: int, initial: int, kind: str, desc: str) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        self.postfix = StepPostfix(kind)

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(self.postfix(metrics))

    def close(self) -> None:
        self.bar.close()


class _Silent:
    """The reporter of ranks other than 0."""

    def step(self, step: int, metrics: Mapping[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def on_terminal(*streams: Any) -> bool:
    """Whether every stream is an interactive terminal."""
    return all(getattr(s, "isatty", lambda: False)() for s in streams)


def step_reporter(rank: int, total: int, initial: int, kind: str, desc: str, interval: int,
                  progress_bar: bool = True) -> ProgressBar | StepLines | _Silent:
    """The per-step output of a run of ``total`` steps resumed at ``initial`` (module doc)."""
    if rank != 0:
        return _Silent()
    if progress_bar and on_terminal(sys.stdout, sys.stderr):
        return ProgressBar(total, initial, kind, desc)
    return StepLines(total, kind, interval, sys.stdout)
