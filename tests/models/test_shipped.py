"""The tiny instruct checkpoint shipped with the package (the tiny default's start).

Its logits, loaded at TP1 and TP2 x PP2 through ``checkpoint.init_from=shipped:...``, match the
independent float64 reference forward on its own files; ``shipped:`` names resolve to the package
and an unknown one lists what is shipped.
"""

from __future__ import annotations

import glob
import json

import pytest
import torch
from safetensors.torch import load_file

from rspo_mega.config import ConfigError
from rspo_mega.setup import load_run_config
from rspo_mega.setup.hf_start import SHIPPED_DIR
from rspo_mega.config.paths import TINY_DEFAULT
from tests.distributed import run_distributed
from tests.reference.llada_forward import llada_reference_logits

SHIPPED = SHIPPED_DIR / "tiny_sudoku_instruct"


def _ids(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[1, :6] = False
    return ids, mask


def _body(rank: int, world: int) -> dict:
    from rspo_mega.parallel import initialize_model_parallel
    from tests.training.test_hf_start import _logits

    out = {}
    for tp, pp in ((1, 1), (2, 2)):
        initialize_model_parallel(tp=tp, pp=pp)
        cfg = load_run_config(TINY_DEFAULT, [f"parallel.tp={tp}", f"parallel.pp={pp}"])
        out[(tp, pp)] = _logits(cfg, *_ids(cfg.model.vocab_size))
    return out


def test_the_shipped_checkpoint_matches_the_reference_forward():
    sd = {k: v for f in glob.glob(str(SHIPPED / "*.safetensors")) for k, v in load_file(f).items()}
    raw = json.loads((SHIPPED / "config.json").read_text())
    ids, mask = _ids(raw["vocab_size"])
    ref = llada_reference_logits(sd, raw, ids, mask)
    results = run_distributed(_body, 4, timeout=240)
    for layout in ((1, 1), (2, 2)):
        got = [r[layout] for r in results if r.get(layout) is not None][0].double()
        rel = ((got - ref)[mask].norm() / ref[mask].norm()).item()
        assert rel < 1e-5, (layout, rel)


def test_the_tiny_default_starts_from_the_shipped_checkpoint():
    cfg = load_run_config(TINY_DEFAULT)
    assert cfg.checkpoint.init_from == str(SHIPPED)
    assert cfg.data.tokenizer == str(SHIPPED)  # its own SentencePiece model
    assert cfg.model.vocab_size == json.loads((SHIPPED / "config.json").read_text())["vocab_size"]
    with pytest.raises(ConfigError, match="no shipped checkpoint 'nope' .shipped: tiny_sudoku_inst"):
        load_run_config(TINY_DEFAULT, ["checkpoint.init_from=shipped:nope"])
