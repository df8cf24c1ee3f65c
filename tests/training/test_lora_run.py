"""LoRA runs in the trainer, from the shipped tiny instruct checkpoint (an HF directory, the base):
the checkpoint holds the adapters, their Adam state and the run's state and no base tensor; a run
resumed mid-way is bitwise the uninterrupted one; a checkpoint is refused with a base other than
the one its adapters were trained on; the HF export merges the adapters into the base and also
writes them in the PEFT format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rspo_mega.setup import load_run_config, validate_run
from rspo_mega.models.llada.checkpoint import stored_tensor_shapes
from rspo_mega.config.paths import TINY_DEFAULT
from tests.distributed import run_distributed
from tests.training.test_agrpo_run import SMALL, _comparable

SHIPPED = Path(__file__).resolve().parents[2] / "rspo_mega/checkpoints/tiny_sudoku_instruct"
LORA = ["model.lora.enabled=true", "model.lora.rank=4", "model.lora.alpha=8",
        "optimizer.lr=1e-3", "checkpoint.save_interval=1"]


def _run(rank: int, world: int, run_dir: str, steps: int, init: str = "") -> dict:
    """A LoRA RSPO run of ``steps`` steps in ``run_dir`` (resuming what it holds): its metrics
    rows and adapters, or the error a resume refused with."""
    from rspo_mega.errors import CheckpointError
    from rspo_mega.training.trainer import Trainer

    cfg = load_run_config(TINY_DEFAULT, SMALL + LORA + [
        f"logging.output_dir={run_dir}", f"train_steps={steps}",
        f"checkpoint.save_dir={run_dir}/ckpt"] + ([f"checkpoint.init_from={init}"] if init else []))
    trainer = Trainer(cfg, validate_run(cfg, world_size=world))
    try:
        trainer.run()
    except CheckpointError as err:
        return {"refused": str(err)}
    from rspo_mega.models.llada import llada_forward

    lines = Path(run_dir, "metrics.jsonl").read_text().splitlines()
    adapters = {n: p.detach().clone() for c in trainer.policy.model
                for n, p in c.named_parameters() if p.requires_grad}
    with torch.no_grad():
        logits = llada_forward(trainer.policy.model[0], IDS)[..., :cfg.model.vocab_size]
    return {"rows": [d for d in map(json.loads, lines) if "loss" in d], "adapters": adapters,
            "saved": str(trainer.saved), "logits": logits.double()}


IDS = torch.arange(2 * 24).reshape(2, 24) % 40 + 3  # tokens of the tiny vocabulary


def _evaluated(rank: int, world: int, run_dir: str) -> tuple[int, torch.Tensor]:
    """rspo-eval's policy for the LoRA run in ``run_dir`` (the base of ``checkpoint.init_from``,
    then the newest checkpoint's adapters): its step and logits of ``IDS``."""
    from rspo_mega.models.llada import llada_forward
    from rspo_mega.training.evaluator import build_evaluator

    cfg = load_run_config(TINY_DEFAULT, SMALL + LORA + [f"logging.output_dir={run_dir}/eval",
                                                    f"checkpoint.save_dir={run_dir}/ckpt"])
    validate_run(cfg, world_size=world)
    evaluator, step = build_evaluator(cfg)
    with torch.no_grad():
        logits = llada_forward(evaluator.engine.chunks[0], IDS)[..., :cfg.model.vocab_size]
    return step, logits.double()


def _export(tmp_path: Path, saved: str, init_from: str) -> tuple[Path, Path]:
    """The run's export (as ``finish_run`` does it) from the base ``init_from``: merged, PEFT."""
    from rspo_mega.training.run_outputs import export_hf

    out = tmp_path / f"export_{Path(init_from).name}"
    cfg = load_run_config(TINY_DEFAULT, SMALL + LORA + [
        f"logging.output_dir={out}", f"checkpoint.init_from={init_from}",
        f"checkpoint.export_hf={out}/hf", f"checkpoint.export_peft={out}/hf_adapter"])
    if init_from != str(SHIPPED):  # a megatron base: the run's tokenizer file is the shipped one
        cfg.data.tokenizer = str(SHIPPED / "tokenizer.model")
    export_hf(cfg, saved, cfg.checkpoint.export_hf)
    return Path(cfg.checkpoint.export_hf), Path(cfg.checkpoint.export_peft)


def _hf_state(path: Path) -> tuple[dict, dict]:
    from rspo_mega.models.llada.hf_io import HFCheckpointReader

    reader = HFCheckpointReader(str(path))
    return ({k: reader.get(k) for k in reader.keys()},
            json.loads((path / "config.json").read_text()))


def _check_export(tmp_path: Path, run: dict) -> None:
    """Merged export = the adapted model (fp32, 1e-5), from an HF base and from the same base
    converted to megatron; the PEFT directory's keys and shapes, and peft's own merge of it."""
    from rspo_mega.models.llada.convert import convert_hf_to_mcore
    from tests.reference.llada_forward import llada_reference_logits

    merged_dir, peft_dir = _export(tmp_path, run["saved"], str(SHIPPED))
    merged, config = _hf_state(merged_dir)
    ref = llada_reference_logits(merged, config, IDS)
    err = ((ref - run["logits"]).abs().max() / run["logits"].abs().max()).item()
    assert err < 1e-5, err
    base, _ = _hf_state(SHIPPED)
    assert set(merged) == set(base) and (merged_dir / "tokenizer.model").is_file()
    mcore = tmp_path / "base_mcore"
    convert_hf_to_mcore(str(SHIPPED), str(mcore), dtype="float32")
    from_mcore, _ = _hf_state(_export(tmp_path, run["saved"], str(mcore))[0])
    assert all(torch.equal(from_mcore[k], merged[k]) for k in merged)
    tool_out = tmp_path / "tool"  # tools/convert_mcore_to_hf.py on the run's checkpoint
    done = subprocess.run([sys.executable, "tools/convert_mcore_to_hf.py", "--ckpt", run["saved"],
                           "--out", str(tool_out / "hf"), "--peft", str(tool_out / "peft")],
                          cwd=SHIPPED.parents[2], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "merged into" in done.stdout, done.stdout + done.stderr
    assert all(torch.equal(_hf_state(tool_out / "hf")[0][k], merged[k]) for k in merged)
    assert (tool_out / "peft" / "adapter_model.safetensors").read_bytes() == \
        (peft_dir / "adapter_model.safetensors").read_bytes()
    _check_peft_format(peft_dir, base, config)
    _check_with_peft(peft_dir, base, config, run["logits"])


def _check_peft_format(peft_dir: Path, base: dict, config: dict) -> None:
    """PEFT's key names for LLaDA's modules, ``A [r, in]``, ``B [out, r]``, alpha and r."""
    from tests.fixtures.hf_llada import PREFIX

    adapter_config = json.loads((peft_dir / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA"
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8.0)
    tensors = load_file(peft_dir / "adapter_model.safetensors")
    leaves = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out")
    want = {f"base_model.model.{PREFIX}blocks.{i}.{leaf}.lora_{f}.weight"
            for i in range(config["n_layers"]) for leaf in leaves for f in "AB"}
    assert set(tensors) == want
    for key, t in tensors.items():
        out, inp = base[key.replace("base_model.model.", "").split(".lora_")[0] + ".weight"].shape
        assert tuple(t.shape) == ((4, inp) if ".lora_A." in key else (out, 4)), key


def _check_with_peft(peft_dir: Path, base: dict, config: dict, logits: torch.Tensor) -> None:
    """``peft`` loads the directory onto the HF LLaDA module tree holding the base weights; its
    merged weights give the adapted model's logits."""
    from tests.reference.llada_forward import llada_reference_logits

    peft = pytest.importorskip("peft")
    model = torch.nn.Module()
    linears = {k: v for k, v in base.items() if ".blocks." in k and v.dim() == 2}
    for key, weight in linears.items():
        parent = model
        *path, leaf, _ = key.split(".")
        for name in path:
            if not hasattr(parent, name):
                parent.add_module(name, torch.nn.Module())
            parent = getattr(parent, name)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        linear.weight.data.copy_(weight.float())
        parent.add_module(leaf, linear)
    merged_model = peft.PeftModel.from_pretrained(model, str(peft_dir)).merge_and_unload()
    state = {**base, **{k: v.detach() for k, v in merged_model.state_dict().items()}}
    assert set(state) == set(base)
    ref = llada_reference_logits(state, config, IDS)
    err = ((ref - logits).abs().max() / logits.abs().max()).item()
    assert err < 1e-5, err


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
def test_lora_checkpoint_resume_base_check_and_export(tmp_path):
    full = run_distributed(_run, 1, args=(str(tmp_path / "full"), 2), timeout=600)[0]
    assert [r["step"] for r in full["rows"]] == [1, 2]
    assert all(r["grad_norm"] > 0 for r in full["rows"]), full["rows"]
    assert any(n.endswith("lora_b") and p.abs().max() > 0 for n, p in full["adapters"].items())
    step, logits = run_distributed(_evaluated, 1, args=(str(tmp_path / "full"),), timeout=300)[0]
    assert step == 2 and torch.equal(logits, full["logits"])  # rspo-eval: base + adapters
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
    _check_export(tmp_path, full)  # last: without peft installed, its final check skips
