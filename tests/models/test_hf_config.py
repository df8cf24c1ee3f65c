"""config.json parsing, vocab padding and the pure QKV / fc1 / vocab transforms."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from rspo_mega.config.schema import ModelConfig
from rspo_mega.models.llada import hf_adapter as A
from rspo_mega.models.llada import model_config_from_hf, padded_vocab_size
from rspo_mega.models.llada.hf_config import hf_config_dict, model_config_from_hf_dict
from tests.fixtures.hf_llada import GQA, TinyLLaDA, config_json

LLADA_8B = TinyLLaDA(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                     vocab_size=126464, max_sequence_length=4096, mask_token_id=126336,
                     eos_token_id=126081)


def test_llada_8b_config(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(config_json(LLADA_8B)))
    cfg = model_config_from_hf(tmp_path)
    assert (cfg.num_layers, cfg.hidden_size, cfg.ffn_hidden_size) == (32, 4096, 12288)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.vocab_size) == (32, None, 126464)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.max_position_embeddings) == (500000.0, 1e-5, 4096)
    assert (cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id) == (126336, 126081, 126081)
    assert padded_vocab_size(cfg, 8) == 126976  # 128 * 8 divisor pads
    assert padded_vocab_size(replace(cfg, make_vocab_size_divisible_by=64), 8) == 126464


def test_gqa_config_and_writer_round_trip():
    raw = config_json(GQA)
    cfg = model_config_from_hf_dict(raw)
    assert (cfg.num_attention_heads, cfg.num_query_groups, cfg.num_layers) == (8, 2, 4)
    written = hf_config_dict(cfg, template=raw)
    assert written == dict(sorted(raw.items()))  # writing back with the template is lossless
    fresh = hf_config_dict(cfg)
    assert model_config_from_hf_dict(fresh) == cfg
    assert fresh["architectures"] == ["LLaDAModelLM"] and fresh["n_kv_heads"] == 2


@pytest.mark.parametrize("change,needle", [
    ({"architectures": ["LLaDAMoEModelLM"]}, "LLaDA-MoE"),
    ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
    ({"weight_tying": True}, "weight_tying"),
    ({"include_bias": True}, "include_bias"),
    ({"layer_norm_type": "default"}, "layer_norm_type"),
])
def test_unsupported_configs_are_refused(change, needle):
    with pytest.raises(ValueError, match=needle):
        model_config_from_hf_dict({**config_json(GQA), **change})


def test_padded_vocab_size():
    cfg = ModelConfig(vocab_size=333)
    assert [padded_vocab_size(cfg, tp) for tp in (1, 2, 4)] == [384, 512, 512]


def test_qkv_interleave_layout_and_inverse():
    heads, groups, hn, h = 4, 2, 3, 5
    q = torch.arange(heads * hn * h, dtype=torch.float32).view(heads * hn, h)
    k = -1 - torch.arange(groups * hn * h, dtype=torch.float32).view(groups * hn, h)
    v = 1000 + torch.arange(groups * hn * h, dtype=torch.float32).view(groups * hn, h)
    qkv = A.qkv_to_mcore(q, k, v, heads, groups)
    per = heads // groups
    for g in range(groups):  # rows of group g: its q heads, then k_g, then v_g
        block = qkv[g * (per + 2) * hn:(g + 1) * (per + 2) * hn]
        assert torch.equal(block[: per * hn], q[g * per * hn:(g + 1) * per * hn])
        assert torch.equal(block[per * hn:(per + 1) * hn], k[g * hn:(g + 1) * hn])
        assert torch.equal(block[(per + 1) * hn:], v[g * hn:(g + 1) * hn])
    assert not torch.equal(qkv, torch.cat([q, k, v]))  # the classic plain-cat bug differs
    for a, b in zip(A.qkv_from_mcore(qkv, heads, groups), (q, k, v)):
        assert torch.equal(a, b)


def test_fc1_and_vocab_transforms():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fc1 = A.fc1_to_mcore(gate, up)
    assert torch.equal(fc1[:6], gate) and torch.equal(fc1[6:], up)
    g2, u2 = A.fc1_from_mcore(fc1)
    assert torch.equal(g2, gate) and torch.equal(u2, up)
    w = torch.randn(300, 4)
    padded = A.pad_vocab(w, 384)
    assert padded.shape == (384, 4) and torch.equal(padded[:300], w) and not padded[300:].any()


def test_hf_config_fills_the_model_section_when_the_config_loads(tmp_path):
    from rspo_mega.setup import load_run_config

    (tmp_path / "config.json").write_text(json.dumps(config_json(GQA)))
    cfg = load_run_config(None, [f"model.hf_config={tmp_path}", "model.params_dtype=bfloat16"]).model
    assert (cfg.vocab_size, cfg.num_query_groups, cfg.params_dtype) == (333, 2, "bfloat16")
    assert padded_vocab_size(cfg, 1) == 384  # the builders read the resolved section as it is


def test_shipped_model_geometries():
    import os

    import yaml

    from rspo_mega.models.llada import configs

    here = os.path.dirname(configs.__file__)
    data = yaml.safe_load(open(os.path.join(here, "tiny.yaml")))
    cfg = ModelConfig(**{k: v for k, v in data["model"].items() if k != "fp8"})
    assert cfg.hidden_size % cfg.num_attention_heads == 0
    big = model_config_from_hf(os.path.join(here, "llada_8b.json"))
    assert (big.num_layers, big.hidden_size, big.ffn_hidden_size, big.vocab_size) == (
        32, 4096, 12288, 126464)
    assert (big.mask_token_id, big.eos_token_id, big.bos_token_id) == (126336, 126081, 126080)
