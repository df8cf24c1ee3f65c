"""Megatron LLaDA logits vs the independent reference at TP=1, TP=2, PP=2, TP2xPP2 (one launch),
loading a checkpoint converted at TP2xPP2, saving at TP2xPP2 and reloading elsewhere."""

from __future__ import annotations

import glob
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import run_distributed
from tests.reference.llada_forward import llada_reference_logits

LAYOUTS = ((1, 1), (2, 1), (1, 2), (2, 2))


def _hf_state(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        out.update(load_file(f))
    return out


def _batch(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [3, 12] with a left-padded second row and a fully real first row."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=gen)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[1, :5] = False
    mask[2, :1] = False
    return ids, mask


def _forward_full_vocab(model, ids, mask, labels=None):
    """Run through megatron's schedule; on the last stage gather the real vocab over TP."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from rspo_mega.models.llada import llada_forward

    def step(data_iter, m):
        batch = next(data_iter)
        out = llada_forward(m, batch["ids"], batch["mask"], batch["labels"])
        return out, lambda o, non_loss_data=False: o

    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([{"ids": ids, "mask": mask, "labels": labels}]),
        model=[model], num_microbatches=1, seq_length=ids.shape[1], micro_batch_size=ids.shape[0],
        forward_only=True, collect_non_loss_data=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    out = store[0]
    if labels is not None:
        return out
    parts = [None] * ps.get_tensor_model_parallel_world_size()  # shards of unequal widths
    torch.distributed.all_gather_object(parts, out, group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _check_layout(cfg, ckpt_dir, prefix, ref_logits, ids, mask, tp, pp) -> dict:
    from rspo_mega.models.llada import build_llada_model, load_model
    from rspo_mega.parallel import initialize_model_parallel

    initialize_model_parallel(tp=tp, pp=pp)
    model = build_llada_model(cfg, init_weights=False)
    load_model(model, ckpt_dir, prefix=prefix)
    model.eval()
    with torch.no_grad():
        full = _forward_full_vocab(model, ids, mask)
        logp = _forward_full_vocab(model, ids, mask, labels=ids)
    if full is None:
        return {}
    v = cfg.vocab_size
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, ids[..., None])[..., 0]
    return {
        "shape": tuple(full.shape), "vocab": v,
        "logit_err": (full.double() - ref_logits).abs().max().item(),
        "logp_err": (logp.double() - ref_logp).abs().max().item(),
        "logp_dtype": str(logp.dtype),
    }


def _body(rank, world, hf_dirs, ckpts, save_dir):
    from rspo_mega.models.llada import build_llada_model, model_config_from_hf, save_model
    from rspo_mega.models.llada import load_model
    from rspo_mega.parallel import initialize_model_parallel

    results = {}
    for name in ("gqa", "mha"):
        cfg = model_config_from_hf(hf_dirs[name])
        ids, mask = _batch(cfg.vocab_size, seed=len(name))
        raw = __import__("json").load(open(os.path.join(hf_dirs[name], "config.json")))
        ref = llada_reference_logits(_hf_state(hf_dirs[name]), raw, ids, mask)
        layouts = LAYOUTS if name == "gqa" else ((2, 2), (1, 1))
        for tp, pp in layouts:
            results[(name, tp, pp)] = _check_layout(cfg, ckpts[name], "", ref, ids, mask, tp, pp)
        if name == "gqa":  # save at TP2xPP2 under a trainer-like prefix, reload at TP1xPP2
            initialize_model_parallel(tp=2, pp=2)
            model = build_llada_model(cfg, init_weights=False)
            load_model(model, ckpts[name])
            save_model(model, save_dir, prefix="model.")
            results[("saved", 1, 2)] = _check_layout(cfg, save_dir, "model.", ref, ids, mask, 1, 2)
    return results


@pytest.mark.timeout(300)
def test_logits_match_reference_across_layouts(hf_gqa, hf_mha, converted, tmp_path):
    save_dir = str(tmp_path / "saved_tp2pp2")
    per_rank = run_distributed(
        _body, world_size=4, args=({"gqa": hf_gqa, "mha": hf_mha}, converted, save_dir), timeout=280
    )
    merged: dict = {}
    for r in per_rank:
        for key, val in r.items():
            if val:
                merged.setdefault(key, []).append(val)
    expected = [("gqa", tp, pp) for tp, pp in LAYOUTS] + [("mha", 2, 2), ("mha", 1, 1), ("saved", 1, 2)]
    for key in expected:
        assert key in merged, f"no last-stage result for {key}"
        for res in merged[key]:
            assert res["logit_err"] < 1e-4, (key, res)
            assert res["logp_err"] < 1e-4, (key, res)
            assert res["logp_dtype"] == "torch.float32"
            assert res["shape"][-1] == res["vocab"], (key, res)  # real ids only, no padding
    # the saved checkpoint converts back to the original HF tensors bit-exactly
    from rspo_mega.models.llada import convert_mcore_to_hf

    out = str(tmp_path / "hf_back")
    a = _hf_state(hf_gqa)
    stored = str(next(iter(a.values())).dtype).removeprefix("torch.")  # the HF files' dtype
    convert_mcore_to_hf(save_dir, out, hf_config=hf_gqa, prefix="model.", dtype=stored)
    b = _hf_state(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
