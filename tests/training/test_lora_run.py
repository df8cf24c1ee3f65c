"""LoRA runs in the trainer, from the shipped tiny instruct checkpoint (an HF directory, the base):
the checkpoint holds the adapters, their Adam state and the run's state and no base tensor; a run
resumed mid-way is bitwise the uninterrupted one; a checkpoint is refused with a base other than
the one its adapters were trained on; the HF export merges the adapters into the base and also
writes them in the PEFT format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rspo_mega.config import load_config, validate_config
from rspo_mega.models.llada.checkpoint import stored_tensor_shapes
from rspo_mega.train import TINY_DEFAULT
from tests.distributed import run_distributed
from tests.training.test_agrpo_run import SMALL, _comparable

SHIPPED = Path(__file__).resolve().parents[2] / "rspo_mega/checkpoints/tiny_sudoku_instruct"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8",
        "optimizer.lr=1e-3", "checkpoint.save_interval=1"]


def _run(rank: int, world: int, run_dir: str, steps: int, init: str = "") -> dict:
    """A LoRA RSPO run of ``steps`` steps in ``run_dir`` (resuming what it holds): its metrics
    rows and adapters, or the error a resume refused with."""
    from rspo_mega.training.checkpointing import CheckpointError
    from rspo_mega.training.trainer import Trainer

    cfg = load_config(TINY_DEFAULT, SMALL + LORA + [
        f"logging.output_dir={run_dir}", f"train_steps={steps}",
        f"checkpoint.save_dir={run_dir}/ckpt"] + ([f"checkpoint.init_from={init}"] if init else []))
    trainer = Trainer(cfg, validate_config(cfg, world_size=world))
    try:
        trainer.run()
    except CheckpointError as err:
        return {"refused": str(err)}
    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    adapters = {n: p.detach().clone() for c in trainer.policy.model
                for n, p in c.named_parameters() if p.requires_grad}
    return {"rows": [d for d in map(json.loads, lines) if "loss" in d], "adapters": adapters,
            "saved": str(trainer.saved)}


def _other_base(path: Path) -> str:
    """A copy of the shipped start with one norm weight changed: another base, same shapes."""
    shutil.copytree(SHIPPED, path)
    shard = next(path.glob("*.safetensors"))
    tensors = load_file(shard)
    key = "model.transformer.ln_f.weight"
    tensors[key] = tensors[key] * 1.01
    save_file(tensors, shard, metadata={"format": "pt"})
    return str(path)


@pytest.mark.timeout(900)
def test_lora_checkpoint_holds_adapters_resumes_bitwise_and_names_another_base(tmp_path):
    full = run_distributed(_run, 1, args=(str(tmp_path / "full"), 2), timeout=600)[0]
    assert [r["step"] for r in full["rows"]] == [1, 2]
    assert all(r["grad_norm"] > 0 for r in full["rows"]), full["rows"]
    assert any(n.endswith("lora_b") and p.abs().max() > 0 for n, p in full["adapters"].items())
    keys = set(stored_tensor_shapes(str(Path(full["saved"]) / "dist")))
    assert keys and all(".adapter.lora_" in k for k in keys), sorted(keys)[:5]  # no base tensor
    assert any(k.startswith("optimizer.") and "exp_avg" in k for k in keys), sorted(keys)[:5]
    part = str(tmp_path / "part")
    run_distributed(_run, 1, args=(part, 1), timeout=600)  # step 1, saved
    resumed = run_distributed(_run, 1, args=(part, 2), timeout=600)[0]
    assert _comparable(resumed["rows"][-1]) == _comparable(full["rows"][-1])
    assert full["adapters"].keys() == resumed["adapters"].keys()
    assert all(torch.equal(full["adapters"][n], resumed["adapters"][n]) for n in full["adapters"])
    other = _other_base(tmp_path / "other_base")
    refused = run_distributed(_run, 1, args=(part, 3, other), timeout=600)[0]["refused"]
    assert (f"trained its LoRA adapters on another base than checkpoint.init_from={other} "
            "(decoder.final_layernorm.weight differs") in refused, refused
    assert "\n" not in refused
