"""Completions on the parallel LLaDA model: same tokens at any DP/TP/PP layout, and the same as
the reference sampler run on the model's logits (one 4-rank launch does every layout)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rspo_mega.config.schema import ModelConfig, RolloutConfig
from tests.distributed import run_distributed
from tests.reference.llada_sampler import reference_generate

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, vocab_size=203, mask_token_id=202, eos_token_id=201,
             max_position_embeddings=64, init_method_std=0.2)
GROUP = 2
LAYOUTS = [(1, 1, True), (1, 1, False), (2, 1, True), (1, 2, False), (2, 2, True)]


def _prompts(n: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 200, (3 + i % 4,), generator=g).tolist() for i in range(n)]
    return prompts, [1000 + i for i in range(n)]


def _body(rank: int, world: int, ckpt: str, temperature: float, threshold: float | None) -> dict:
    from megatron.core import parallel_state as ps

    from rspo_mega.models.llada import build_llada_model, llada_forward, load_model, save_model
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.rollout.engine import RolloutEngine
    from tests.rollout.dp_split import split_completions

    mcfg = ModelConfig(**MODEL)
    # threshold mode: rows finish after different numbers of steps and leave the batch, so the
    # pipeline sees batches that micro_batch_size=3 does not divide
    rcfg = RolloutConfig(gen_length=8, block_length=4, steps=4, temperature=temperature,
                         micro_batch_size=3 if threshold else 2, stop_on_eos_block=False,
                         confidence_threshold=threshold or None)
    prompts, prompt_uids = _prompts(4)
    initialize_model_parallel(tp=1, pp=1, seed=3)
    save_model(build_llada_model(mcfg), ckpt)
    out: dict = {}
    if temperature == 0:  # reference sampler on the same weights (loading is collective)
        model = build_llada_model(mcfg, init_weights=False)
        load_model(model, ckpt)
        model.eval()
        same = torch.tensor([p[:3] for p in prompts])
        ref = reference_generate(lambda x: llada_forward(model, x)[..., :203], same, 4, 8, 4, 0.0,
                                 "low_confidence", 202)
        got = RolloutEngine(model, mcfg, rcfg, seed=9).generate(same.tolist(), [0, 1, 2, 3])
        out["reference"] = (ref[:, 3:], got.completion_ids)
    for tp, pp, keep in LAYOUTS:
        initialize_model_parallel(tp=tp, pp=pp, seed=3)
        model = build_llada_model(mcfg, init_weights=False)
        load_model(model, ckpt)
        mine = split_completions(prompt_uids, GROUP, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size(), keep_groups=keep)
        rollout = RolloutEngine(model, mcfg, rcfg, seed=9).generate(
            [prompts[i] for i, _ in mine], [uid for _, uid in mine])
        local = {uid: rollout.completion_ids[j] for j, (_, uid) in enumerate(mine)}
        out[(tp, pp, keep, "steps")] = rollout.steps_used.tolist()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, local)
        merged: dict = {}
        for part in gathered:
            for uid, toks in part.items():
                assert uid not in merged or torch.equal(merged[uid], toks), (tp, pp, uid)
                merged[uid] = toks
        out[(tp, pp, keep)] = merged
    return out


def test_same_completions_for_every_layout(tmp_path):
    for temperature, threshold in ((0.0, None), (1.0, None), (1.0, 0.05)):
        results = run_distributed(_body, 4, args=(str(tmp_path / f"ckpt{temperature}{threshold}"),
                                                  temperature, threshold), timeout=300)
        base = results[0][(1, 1, True)]
        assert len(base) == 4 * GROUP
        for layout in LAYOUTS:
            for rank_result in results:
                got = rank_result[layout]
                assert got.keys() == base.keys(), layout
                for uid in base:
                    assert torch.equal(got[uid], base[uid]), (temperature, layout, uid)
        if threshold:  # rows finished early and skipped model calls
            assert len({n for r in results for n in r[(1, 1, True, "steps")]}) > 1
        if temperature == 0:
            ref, got = results[0]["reference"]
            assert torch.equal(ref, got)
        else:  # the G samples of a prompt differ (their uids key different noise)
            from rspo_mega.rollout.engine import completion_uid

            assert not torch.equal(base[completion_uid(1000, 0)], base[completion_uid(1000, 1)])
