"""The end of a run: the final policy exported to HF (logits of the independent reference forward
on the exported files equal the trained model's), the curves PNG, the summary and its JSON."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config, validate_run
from tests.distributed import run_distributed
from tests.reference.llada_forward import llada_reference_logits
from tests.training.test_hf_start import RUN, hf_sp  # noqa: F401 - the fixture

IDS = torch.arange(24).reshape(2, 12) % 50 + 5


def _run_body(rank: int, world: int, hf: str, out: str) -> dict:
    from rspo_mega.models.llada import llada_forward
    from rspo_mega.training.run_outputs import finish_run
    from rspo_mega.training.trainer import Trainer

    # SFT: its steps always move the weights (2 RL steps of an untrained start may have no reward)
    cfg = load_run_config(None, RUN + ["algorithm.name=sft", "likelihood.mask_scheme=coupled",
                                   f"checkpoint.init_from={hf}", f"logging.output_dir={out}",
                                   f"checkpoint.save_dir={out}/ckpt",
                                   f"checkpoint.export_hf={out}/hf"])
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    summary = trainer.run()
    with torch.no_grad():  # before finish_run, which takes the process groups down
        logits = llada_forward(trainer.policy.model[0].eval(), IDS)
    printed = io.StringIO()  # the rank's stdout is the forkserver's, not the test's
    with contextlib.redirect_stdout(printed):
        finish_run(trainer, summary)
    return {"summary": summary, "logits": logits, "printed": printed.getvalue()}


def test_the_final_policy_is_exported_plotted_and_summarised(hf_sp, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    result = run_distributed(_run_body, 1, args=(hf_sp, str(out)), timeout=280)[0]
    hf = out / "hf"
    sd = {k: v for f in sorted(glob.glob(str(hf / "*.safetensors"))) for k, v in load_file(f).items()}
    raw = json.loads((hf / "config.json").read_text())
    ref = llada_reference_logits(sd, raw, IDS, torch.ones_like(IDS, dtype=torch.bool))
    got = result["logits"].double()
    assert (got - ref).abs().max() < 1e-4  # the trained weights, not the start's
    start = {k: v for f in glob.glob(os.path.join(hf_sp, "*.safetensors")) for k, v in load_file(f).items()}
    assert any(not torch.equal(start[k], sd[k]) for k in sd)
    assert (hf / "tokenizer.model").is_file()  # the start's tokenizer travels with the policy
    assert (out / "curves.png").stat().st_size > 0
    printed = result["printed"]
    final = json.loads((out / "summary.json").read_text())["final"]
    assert final == result["summary"]
    assert "after/eval/accuracy" in final
    assert "held-out accuracy on 4 examples" in printed and str(hf) in printed


def test_summary_lines_say_before_after_and_gain():
    from rspo_mega.training.run_outputs import summary_lines

    lines = summary_lines({"before/eval/accuracy": 0.2, "after/eval/accuracy": 0.335,
                           "after/eval/examples": 512.0}, {"curves": Path("r/curves.png"),
                                                           "policy (HF)": None})
    assert lines == ["held-out accuracy on 512 examples: 20.0% -> 33.5% (+13.5 points)",
                     "  curves       r/curves.png"]


def test_export_needs_a_checkpoint_directory():
    cfg = load_run_config(None, ["checkpoint.export_hf=/tmp/x", "checkpoint.save_dir=null"])
    with pytest.raises(ConfigError, match="checkpoint.export_hf .* needs checkpoint.save_dir"):
        validate_run(cfg, world_size=1)


def test_the_accuracy_curve_takes_before_periodic_and_after_once():
    from rspo_mega.training.run_outputs import accuracy_points

    records = [{"step": 0, "before/eval/accuracy": 0.2}, {"step": 50, "eval/accuracy": 0.25},
               {"step": 100, "eval/accuracy": 0.3},
               {"step": 100, "before/eval/accuracy": 0.2, "after/eval/accuracy": 0.3}]
    assert accuracy_points(records) == [(0, 20.0), (50, 25.0), (100, 30.0)]
