"""The end of a run, on rank 0: the final policy as an HF LLaDA directory, the curves, a summary.

:func:`finish_run` first takes the process groups down on every rank, so nothing after the last
collective (the final save) can wait for a peer; rank 0 then works alone.

* :func:`export_hf` converts a trainer checkpoint (its ``dist/`` torch_dist tensors, any TP/PP)
  with the project's converter into ``checkpoint.export_hf``: ``config.json`` from the run's
  resolved model config, safetensors shards, and the tokenizer the run used (the start's HF files
  when it started from an HF directory, else the run's own tokenizer files).
* :func:`plot_curves` draws the RL reward per step and the held-out accuracy (before, at every
  ``eval_interval``, after) into ``curves.png`` of the run directory.
* :func:`summary_lines` says before, after and gain, and where each file is.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from rspo_mega.config.schema import TrainConfig
from rspo_mega.training.metrics import METRICS_FILE, read_metrics

if TYPE_CHECKING:
    from rspo_mega.training.trainer import Trainer

CURVES_FILE = "curves.png"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model")


def _run_tokenizer_files(cfg: TrainConfig) -> list[Path]:
    """The tokenizer files the run loaded: ``data.tokenizer`` (a file or a directory) or the one
    trained into ``<output_dir>/tokenizer``."""
    source = Path(cfg.data.tokenizer) if cfg.data.tokenizer else \
        Path(cfg.logging.output_dir) / "tokenizer"
    folder = source if source.is_dir() else source.parent
    found = [folder / name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if not found:
        raise FileNotFoundError(f"export_hf: no tokenizer file ({', '.join(TOKENIZER_FILES)}) "
                                f"in {folder}")
    return found


def export_hf(cfg: TrainConfig, iter_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert the trainer checkpoint ``iter_dir`` into the HF LLaDA directory ``out_dir``."""
    from rspo_mega.models.llada.convert import convert_mcore_to_hf
    from rspo_mega.models.llada.hf_config import hf_config_dict
    from rspo_mega.models.llada.hf_io import looks_like_hf_checkpoint

    start = cfg.checkpoint.init_from
    template = start if start and looks_like_hf_checkpoint(start) else None
    if cfg.model.lora.enabled:
        return _export_lora(cfg, iter_dir, out_dir, template)
    with tempfile.TemporaryDirectory() as tmp:
        config_json = os.path.join(tmp, "config.json")
        Path(config_json).write_text(json.dumps(
            hf_config_dict(cfg.model, torch_dtype=cfg.model.params_dtype), indent=1))
        # the policy's tensors are stored under their own names (prefix ""), the optimizer's
        # and the reference's under theirs
        convert_mcore_to_hf(str(Path(iter_dir) / "dist"), str(out_dir), hf_config=config_json,
                            template=template, prefix="", dtype=cfg.model.params_dtype,
                            overwrite=True)
    if template is None:
        for path in _run_tokenizer_files(cfg):
            shutil.copy2(path, Path(out_dir) / path.name)
    return Path(out_dir)


def _export_lora(cfg: TrainConfig, iter_dir: str | Path, out_dir: str | Path,
                 hf_start: Optional[str]) -> Path:
    """A LoRA run's export: its adapters merged into the base (``checkpoint.init_from``, an HF
    directory ``hf_start`` or a megatron checkpoint) in ``out_dir``, and the adapters alone in
    the PEFT format in ``checkpoint.export_peft``."""
    from rspo_mega.models.llada.convert import convert_mcore_to_hf
    from rspo_mega.models.llada.hf_config import hf_config_dict
    from rspo_mega.models.llada.lora_export import (
        merge_hf_directory, read_adapters, write_peft_adapter,
    )
    from rspo_mega.training.checkpoint.init_from import resolve_model_checkpoint

    import torch

    adapters = read_adapters(str(iter_dir), cfg.model, cfg.model.lora)
    dtype = getattr(torch, cfg.model.params_dtype)
    config = hf_config_dict(cfg.model, torch_dtype=cfg.model.params_dtype)
    if hf_start is not None:
        merge_hf_directory(hf_start, out_dir, adapters, dtype, config)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            config_json = os.path.join(tmp, "config.json")
            Path(config_json).write_text(json.dumps(config, indent=1))
            convert_mcore_to_hf(resolve_model_checkpoint(cfg.checkpoint.init_from), str(out_dir),
                                hf_config=config_json, dtype=cfg.model.params_dtype,
                                overwrite=True, update=adapters.merge)
        for path in _run_tokenizer_files(cfg):
            shutil.copy2(path, Path(out_dir) / path.name)
    if cfg.checkpoint.export_peft:
        write_peft_adapter(adapters, cfg.checkpoint.export_peft, dtype,
                           base=cfg.checkpoint.init_from)
    return Path(out_dir)


def accuracy_points(records: list[dict]) -> list[tuple[int, float]]:
    """Held-out accuracy (%) by step: the first ``before/``, the periodic ones, the last
    ``after/``."""
    points: dict[int, float] = {}
    before = [r for r in records if r.get("before/eval/accuracy") is not None]
    if before:
        points[before[0]["step"]] = 100 * before[0]["before/eval/accuracy"]
    for r in records:
        if r.get("eval/accuracy") is not None:
            points[r["step"]] = 100 * r["eval/accuracy"]
    after = [r for r in records if r.get("after/eval/accuracy") is not None]
    if after:
        points[after[-1]["step"]] = 100 * after[-1]["after/eval/accuracy"]
    return sorted(points.items())


def training_seconds(records: list[dict]) -> dict[int, float]:
    """Training wall time (s, held-out evaluation excluded) by step: the running sum of the
    logged ``step_seconds`` (exact with ``logging.log_interval=1``)."""
    total, out = 0.0, {0: 0.0}
    for r in records:
        if r.get("step_seconds") is not None:
            total += r["step_seconds"]
            out[r["step"]] = total
    return out


def time_to_accuracy(records: list[dict], target: float) -> Optional[tuple[int, float]]:
    """``(step, training seconds)`` of the first held-out evaluation whose accuracy (%) reaches
    ``target``: the summed ``step_seconds`` of the logged steps up to it; None when none does."""
    seconds = training_seconds(records)
    for step, accuracy in accuracy_points(records):
        if accuracy >= target - 1e-9:
            return step, seconds[max(s for s in seconds if s <= step)]
    return None


def smoothing_window(n: int) -> int:
    """Points in the trailing mean of a curve of ``n`` points: about a 25th of it."""
    return max(1, n // 25)


def smooth(values: list[float]) -> list[float]:
    """Trailing mean of ``values`` over :func:`smoothing_window` points."""
    window = smoothing_window(len(values))
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
            for i in range(len(values))]


def plot_curves(run_dir: str | Path, title: str = "") -> Optional[Path]:
    """RL reward per step and held-out solved share (%) into ``run_dir/curves.png``; None when
    the run logged neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(Path(run_dir) / METRICS_FILE)
    reward = [(r["step"], r["reward"]) for r in records if r.get("reward") is not None]
    accuracy = accuracy_points(records)
    if not reward and not accuracy:
        return None
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    if reward:
        steps, values = zip(*reward)
        top.plot(steps, values, alpha=0.3, label="per step")
        top.plot(steps, smooth(list(values)), label=f"mean of {smoothing_window(len(values))}")
        top.legend(loc="lower right")
    top.set_ylabel("rollout reward")
    if accuracy:
        bottom.plot(*zip(*accuracy), marker="o")
    bottom.set_ylabel("held-out solved (%)")
    bottom.set_xlabel("step")
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    fig.suptitle(title or Path(run_dir).name)
    fig.tight_layout()
    out = Path(run_dir) / CURVES_FILE
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def resume_command(argv: Optional[list[str]] = None) -> str:
    """The command that continues this run: this process's arguments after ``rspo-train`` (or
    ``python -m rspo_mega.train``), or after the torchrun that launched it."""
    argv = sys.argv if argv is None else argv
    args = " ".join(shlex.quote(a) for a in argv[1:])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
        head = "torchrun " + (f"--nnodes {nodes} " if nodes != "1" else "") + \
            f"--nproc-per-node {os.environ.get('LOCAL_WORLD_SIZE', '1')} -m rspo_mega.train"
    else:
        head = "rspo-train" if Path(argv[0]).name == "rspo-train" else "python -m rspo_mega.train"
    return f"{head} {args}".strip()


def summary_lines(summary: dict[str, float], files: dict[str, Optional[Path]]) -> list[str]:
    """Before / after / gain of held-out accuracy (or where a stopped run stopped and how it
    resumes) and the run's files, as printable lines."""
    lines = []
    before, after = summary.get("before/eval/accuracy"), summary.get("after/eval/accuracy")
    examples = int(summary.get("after/eval/examples", summary.get("before/eval/examples", 0)))
    if summary.get("interrupted"):
        lines.append(f"interrupted at step {int(summary['step'])}, checkpoint saved; resume "
                     f"with: {resume_command()}")
    elif summary.get("preempted"):
        lines.append(f"preempted at step {int(summary['step'])}: the same command resumes from "
                     "the checkpoint below")
    elif before is not None and after is not None:
        lines.append(f"held-out accuracy on {examples} examples: {100 * before:.1f}% -> "
                     f"{100 * after:.1f}% ({100 * (after - before):+.1f} points)")
    elif after is not None:
        lines.append(f"held-out accuracy on {examples} examples: {100 * after:.1f}%")
    width = max((len(name) for name in files), default=0)
    lines += [f"  {name:<{width}}  {path}" for name, path in files.items() if path is not None]
    return lines


def _output_files(cfg: TrainConfig) -> dict[str, Optional[Path]]:
    """The files every run writes (rank 0), by name."""
    run_dir = Path(cfg.logging.output_dir)
    return {"config": run_dir / "config.yaml", "metrics": run_dir / METRICS_FILE,
            "tensorboard": run_dir / "tensorboard" if cfg.logging.tensorboard else None}


def finish_run(trainer: "Trainer", summary: dict[str, float]) -> None:
    """On every rank after ``trainer.run()``: tear down the process groups (the final save was
    the run's last collective); then rank 0 exports the checkpoint the run saved last into
    ``checkpoint.export_hf`` (reading it in a process group of its own), plots the curves and
    prints the summary.

    A stopped run (it resumes later) is neither exported nor plotted. ``summary.json`` in the
    run directory holds the summary; the printed lines name it and every other output.
    """
    from rspo_mega.parallel import destroy_parallel

    cfg, rank, final = trainer.cfg, trainer.rank, trainer.saved
    destroy_parallel()
    if rank != 0:
        return
    run_dir = Path(cfg.logging.output_dir)
    files = {**_output_files(cfg), "checkpoint": final}
    if not summary.get("preempted"):
        if cfg.checkpoint.export_hf and final is not None:
            files["policy (HF)"] = export_hf(cfg, final, cfg.checkpoint.export_hf)
        files["curves"] = plot_curves(run_dir, f"{cfg.algorithm.name}: {run_dir.name}")
    (run_dir / "summary.json").write_text(json.dumps({"final": summary}, indent=1) + "\n")
    files["summary"] = run_dir / "summary.json"
    print("\n".join(summary_lines(summary, files)), flush=True)
