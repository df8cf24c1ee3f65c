"""The planner against real models: per-rank parameter counts and autograd-saved bytes of an
ELBO forward at TP1, TP2 and PP2 (one 2-rank launch), for a GQA geometry on the local spec, in
full fine-tuning and with LoRA adapters on a frozen base (three target sets: the 8B recipes'
QKV and fc1, the row-parallel proj and fc2, where stage 0's first layer records nothing before
its projection, and all four)."""

from __future__ import annotations

import dataclasses
import itertools

import torch

from tests.distributed import run_distributed

LAYOUTS = ((1, 1), (2, 1), (1, 2))
GEOMETRY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=96",
            "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=300",
            "model.mask_token_id=299", "model.eos_token_id=298",
            "model.max_position_embeddings=64"]
LORA_TARGETS = (None, "[linear_qkv, linear_fc1]", "[linear_proj, linear_fc2]",
                "[linear_qkv, linear_proj, linear_fc1, linear_fc2]")


def _lora(targets) -> list[str]:
    """Overrides of LoRA r=3 on ``targets`` (none: full fine-tuning)."""
    if targets is None:
        return []
    return ["model.lora.enabled=true", "model.lora.rank=3", "checkpoint.init_from=/base",
            f"model.lora.target_modules={targets}"]


def _saved_storages(fn, excluded: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while ``fn`` runs (``excluded``: weights)."""
    seen: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in excluded:
            seen.setdefault(key, t)  # kept alive: no address is reused while counting
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total = sum(t.untyped_storage().nbytes() for t in seen.values())
    del out
    return total


def _stage_forward(model, cfg, stage: int, pp: int, rows: int, seq: int, positions: torch.Tensor):
    """This stage's part of an ELBO forward (the last stage scores ``positions``)."""
    from rspo_mega.models.llada import llada_forward, unwrap_model

    ids = torch.randint(0, 290, (rows, seq), generator=torch.Generator().manual_seed(0))
    if stage > 0:  # the activation the previous stage would send
        unwrap_model(model).set_input_tensor(
            torch.randn(seq, rows, cfg.model.hidden_size, requires_grad=True))
    if stage < pp - 1:
        return lambda: llada_forward(model, ids)
    return lambda: llada_forward(model, ids, labels=ids, positions=positions)


def _planned_saved(cfg, stage: int, rows: int, seq: int, positions: int, widest: int) -> float:
    """The plan's count for this rank (the plan itself takes the TP rank with the most real
    vocab columns; here it is told this rank's)."""
    from megatron.core import parallel_state as ps

    from rspo_mega.models.llada.logits import true_vocab_columns
    from rspo_mega.plan.memory import graph_bytes
    from rspo_mega.plan.shapes import model_shapes

    m = model_shapes(cfg, "local")
    mine = true_vocab_columns(m.vocab, m.vocab_shard, ps.get_tensor_model_parallel_rank())
    m = dataclasses.replace(m, vocab_columns=mine)
    return sum(graph_bytes(m, stage, rows, seq, positions, widest).values())


def _body(rank: int, world: int) -> list:
    from megatron.core import parallel_state as ps

    from rspo_mega.setup import load_run_config
    from rspo_mega.models.llada import build_llada_model
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.plan.shapes import model_shapes

    out = []
    rows, seq = 3, 20
    positions = torch.arange(0, rows * seq, 3)  # flat row * s + position, as the ELBO runner
    for (tp, pp), targets in itertools.product(LAYOUTS, LORA_TARGETS):
        initialize_model_parallel(tp=tp, pp=pp, seed=7)
        cfg = load_run_config(None, GEOMETRY + [f"parallel.tp={tp}", f"parallel.pp={pp}",
                                            *_lora(targets)])
        stage = ps.get_pipeline_model_parallel_rank()
        model = build_llada_model(cfg.model)
        built = (sum(p.numel() for p in model.parameters()),
                 sum(p.numel() for p in model.parameters() if p.requires_grad))
        shapes = model_shapes(cfg, "local")
        planned = (shapes.stage_params(stage) + shapes.layers_per_stage
                   * sum(shapes.adapter_matrices()), shapes.stage_trainable(stage))
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        fn = _stage_forward(model, cfg, stage, pp, rows, seq, positions)
        saved = _saved_storages(fn, weights)
        widest = int(torch.bincount(positions // seq).max())  # the last layer's query slots
        out.append((f"tp={tp} pp={pp} stage {stage} lora {targets}", built, planned, saved,
                    _planned_saved(cfg, stage, rows, seq, positions.numel(), widest)))
    return out


def test_planned_parameters_and_saved_bytes_equal_the_built_models():
    results = run_distributed(_body, world_size=2, timeout=240)
    for rank_rows in results:
        assert len(rank_rows) == len(LAYOUTS) * len(LORA_TARGETS)
        for where, built, planned, saved, planned_saved in rank_rows:
            assert planned == built, f"{where}: planned (all, trained) parameters {planned}, " \
                                     f"built {built}"
            assert planned_saved == saved, f"{where}: planned {planned_saved} saved bytes, " \
                                           f"autograd saved {saved}"
