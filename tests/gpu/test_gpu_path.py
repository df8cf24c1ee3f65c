"""The GPU path, run for real where a GPU is present (skipped on CPU-only machines such as CI).

One process, NCCL world of 1, the production entry points:

* HF checkpoint -> torch_dist conversion -> model on the GPU, logits vs the float64 reference, for
  the local spec and the Transformer Engine spec, in fp32 and bf16; the block KV cache's path;
* TE + FP8 (delayed scaling, hybrid format) forward/backward on a model whose GEMM shapes FP8
  accepts: finite loss and gradients, logits close to the same weights in bf16;
* ``torchrun -m rspo_mega.train`` for a few SFT and RSPO steps with TE, bf16 and FP8, resumed once.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.hf_llada import GQA, write_hf_llada
from tests.reference.llada_forward import llada_reference_logits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _te() -> bool:
    from rspo_mega.models.llada.spec import te_available

    return te_available()


def _fp8_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_te = pytest.mark.skipif(not torch.cuda.is_available() or not _te(),
                              reason="needs Transformer Engine")
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or not _te() or not _fp8_capable(),
                               reason="needs Transformer Engine and an FP8 GPU (sm_89+)")


@pytest.fixture(scope="module")
def nccl_world():
    """A one-rank NCCL process group and megatron parallel state (TP=PP=1)."""
    from rspo_mega.parallel import destroy_parallel, initialize_distributed, initialize_model_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    env = initialize_distributed(backend="nccl")
    initialize_model_parallel(tp=1, pp=1)
    assert torch.distributed.get_backend() == "nccl"
    yield env
    destroy_parallel()


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
    """The 4-layer GQA HF fixture and its TP=1/PP=1 torch_dist conversion."""
    from rspo_mega.models.llada import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("gpu")
    hf = write_hf_llada(str(root / "hf"), GQA, seed=2)
    ckpt = str(root / "mcore")
    convert_hf_to_mcore(hf, ckpt, tp=1, pp=1, dtype="float32")
    return hf, ckpt


def _hf_logits(hf_dir: str, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        sd.update(load_file(f))
    raw = json.load(open(os.path.join(hf_dir, "config.json")))
    return llada_reference_logits(sd, raw, ids, mask)


IMPLS = ["local", pytest.param("transformer_engine", marks=needs_te)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("impl", IMPLS)
def test_converted_checkpoint_matches_reference(nccl_world, gqa_checkpoint, impl, dtype):
    """Both layer specs load the same torch_dist checkpoint and reproduce the reference logits."""
    from rspo_mega.models.llada import build_llada_model, llada_forward, load_model
    from rspo_mega.models.llada import model_config_from_hf

    hf, ckpt = gqa_checkpoint
    cfg = model_config_from_hf(hf)
    cfg.transformer_impl, cfg.params_dtype = impl, dtype
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (3, 32), generator=gen)
    mask = torch.ones(3, 32, dtype=torch.bool)
    mask[1, :7] = False  # left padding exercises the key-padding path (TE: "padding" mask type)
    ref = _hf_logits(hf, ids, mask)

    model = build_llada_model(cfg, init_weights=False)
    assert model is not None and next(model.parameters()).is_cuda
    load_model(model, ckpt)
    model.eval()
    with torch.no_grad():
        logits = llada_forward(model, ids.cuda(), mask.cuda())
    v = cfg.vocab_size
    assert logits.shape[-1] == v  # real vocab ids only (TP=1)
    got = logits.double().cpu()
    rel = ((got - ref)[mask].norm() / ref[mask].norm()).item()
    limit = 3e-3 if dtype == "float32" else 2e-2  # fp32 (TE's GEMMs may use TF32) vs bf16
    assert rel < limit, f"{impl}/{dtype}: relative logit error {rel:.2e} >= {limit}"


@pytest.mark.parametrize("impl", IMPLS)
def test_cached_span_after_a_refresh_matches_the_full_forward(nccl_world, gqa_checkpoint, impl):
    """The block KV cache's path (TE: torch SDPA over the cache) on the GPU, left padding included."""
    from rspo_mega.models.llada import build_llada_model, llada_forward, load_model
    from rspo_mega.models.llada import model_config_from_hf
    from rspo_mega.models.llada.kv_cache import BlockKVCache

    hf, ckpt = gqa_checkpoint
    cfg = model_config_from_hf(hf)
    cfg.transformer_impl, cfg.params_dtype = impl, "float32"
    model = build_llada_model(cfg, init_weights=False)
    load_model(model, ckpt)
    model.eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 32), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones(3, 32, dtype=torch.bool, device="cuda")
    mask[1, :7] = False
    cache = BlockKVCache([model], 3, 32)
    with torch.no_grad():
        full = llada_forward(model, ids, mask)
        llada_forward(model, ids, mask, kv_cache=cache.view([0, 1, 2], 0))
        span = llada_forward(model, ids[:, 16:24], mask, kv_cache=cache.view([0, 1, 2], 16))
    rel = ((span - full[:, 16:24]).norm() / full[:, 16:24].norm()).item()
    assert rel < 3e-3, f"{impl}: cached span vs full forward, relative error {rel:.2e}"


def _fp8_cfg(fp8: bool):
    from rspo_mega.config.schema import ModelConfig

    cfg = ModelConfig(num_layers=2, hidden_size=256, ffn_hidden_size=768, num_attention_heads=4,
                      vocab_size=1000, mask_token_id=999, eos_token_id=998,
                      max_position_embeddings=128, params_dtype="bfloat16",
                      transformer_impl="transformer_engine")
    cfg.fp8.enabled = fp8
    return cfg


@needs_fp8
def test_fp8_forward_backward_tracks_bf16(nccl_world):
    """FP8 (delayed, hybrid) GEMMs: finite loss and gradients, logits near the bf16 model's."""
    from rspo_mega.models.llada import build_llada_model, llada_forward, unwrap_model
    from rspo_mega.parallel import set_random_seed

    set_random_seed(7)
    bf16 = build_llada_model(_fp8_cfg(False))
    fp8 = build_llada_model(_fp8_cfg(True))
    missing, unexpected = unwrap_model(fp8).load_state_dict(unwrap_model(bf16).state_dict(),
                                                            strict=False)
    assert not unexpected and all(k.endswith("_extra_state") for k in missing), (missing, unexpected)
    ids = torch.randint(0, 1000, (4, 64), device="cuda")
    with torch.no_grad():
        ref = llada_forward(bf16, ids)[..., :1000].float()
    for _ in range(3):  # delayed scaling needs an amax history before its scales settle
        logp = llada_forward(fp8, ids, labels=ids)
        loss = -logp.mean()
        loss.backward()
    assert torch.isfinite(loss), loss
    grads = [p.main_grad if hasattr(p, "main_grad") else p.grad for p in fp8.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        got = llada_forward(fp8, ids)[..., :1000].float()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.1, f"FP8 logits differ from bf16 by {rel:.3f} (relative)"


def _train(out: str, *extra: str) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
           "-m", "rspo_mega.train", f"logging.output_dir={out}", "logging.progress_bar=false",
           "data.num_train_examples=200", "data.num_test_examples=16", f"checkpoint.save_dir={out}/ckpt",
           "checkpoint.save_interval=2", "checkpoint.export_hf=null", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@needs_fp8
def test_train_cli_with_te_fp8_and_resume(tmp_path):
    """torchrun -m rspo_mega.train on NCCL with TE + bf16 + FP8: an SFT run, RSPO steps from its
    checkpoint, then a resume of the RSPO run."""
    fp8 = ["model.transformer_impl=transformer_engine", "model.params_dtype=bfloat16",
           "model.fp8.enabled=true"]
    sft = str(tmp_path / "sft")
    rows = [r for r in _train(sft, *fp8, "algorithm.name=sft", "likelihood.mask_scheme=coupled",
                              "likelihood.mask_sharing=completion", "train_steps=4") if "loss" in r]
    assert len(rows) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), rows[-3:]
    out, start = str(tmp_path / "rl"), f"checkpoint.init_from={sft}/ckpt"
    rl = [r for r in _train(out, *fp8, start, "train_steps=2") if "loss" in r]
    assert len(rl) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rl), rl
    assert os.path.isdir(os.path.join(out, "ckpt", "iter_0000002")), os.listdir(out + "/ckpt")
    rl = [r for r in _train(out, *fp8, start, "train_steps=4") if "loss" in r]  # from step 2
    assert [r["step"] for r in rl] == [1, 2, 3, 4], [r["step"] for r in rl]
