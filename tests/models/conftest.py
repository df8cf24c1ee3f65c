"""Fixtures: tiny HF LLaDA checkpoints (MHA and GQA) and their megatron conversions."""

from __future__ import annotations

import os

import pytest

from tests.fixtures.hf_llada import GQA, MHA, write_hf_llada


@pytest.fixture(scope="session")
def hf_mha(tmp_path_factory) -> str:
    """A 2-layer MHA LLaDA (vocab 300) in HF layout."""
    return write_hf_llada(str(tmp_path_factory.mktemp("hf") / "mha"), MHA, seed=1)


@pytest.fixture(scope="session")
def hf_gqa(tmp_path_factory) -> str:
    """A 4-layer GQA LLaDA (8 heads, 2 KV groups, vocab 333) in HF layout."""
    return write_hf_llada(str(tmp_path_factory.mktemp("hf") / "gqa"), GQA, seed=2)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, hf_mha, hf_gqa) -> dict[str, str]:
    """Both fixtures converted to torch_dist for TP=2 x PP=2 (vocab padded to 512)."""
    from rspo_mega.models.llada import convert_hf_to_mcore

    root = tmp_path_factory.mktemp("mcore")
    out = {}
    for name, src in (("mha", hf_mha), ("gqa", hf_gqa)):
        out[name] = os.path.join(root, name)
        convert_hf_to_mcore(src, out[name], tp=2, pp=2)
    return out
