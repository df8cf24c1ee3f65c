"""The sampler's trajectory record on the parallel LLaDA model (one 4-rank launch, every layout).

* The recorded rollout log-probs equal a fresh forward's on the recorded states (the states
  rebuilt from ``commit_step``, scored through the ELBO runner as AGRPO scores them): at T=1
  (fp32, 1e-5) in exact and threshold decoding, and at T=0.7 with ``forbid_eos`` through the
  tempered forward. With the block KV cache the first step of a row (a full forward) agrees.
* The record (commit steps exactly, log-probs and entropies to 1e-5) is the same for every
  TP/PP/DP layout, and every generated position is committed by exactly one of the row's steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from rspo_mega.config.schema import LikelihoodConfig, ModelConfig, RolloutConfig
from tests.distributed import run_distributed

MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
             num_query_groups=2, vocab_size=203, mask_token_id=202, eos_token_id=201,
             max_position_embeddings=64, init_method_std=0.2)
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
MODES = {
    "exact": dict(temperature=1.0),
    "threshold": dict(temperature=1.0, confidence_threshold=0.05),
    "tempered": dict(temperature=0.7, forbid_eos=True),
    "cached": dict(temperature=1.0, cache="prefix"),
}


def _prompts(n: int) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200, (3 + i % 3,), generator=g).tolist() for i in range(n)], \
        [2000 + i for i in range(n)]


def _rescored(engine, batch, rcfg: RolloutConfig):
    """Fresh log-probs of every committed token on its recorded state (last stage; else None)."""
    from rspo_mega.likelihood import ElboRunner, TrajectorySampler, tempered_forward

    sampler = TrajectorySampler(LikelihoodConfig(mask_scheme="trajectory"), 0, 202, 201)
    most = int(batch.commit_step.max()) + 1  # every step of every row (and the fill's number)
    steps = torch.arange(most).expand(batch.size, most)
    masked = sampler.at_steps(batch, torch.full((batch.size,), most), steps,
                              torch.ones(batch.size, most, dtype=torch.float64))
    forward = tempered_forward(rcfg.temperature, 201 if rcfg.forbid_eos else None)
    logp = ElboRunner(forward, 5, ddp_averages_gradients=False).logprobs(engine.chunks, masked)
    return None if logp is None else (logp, masked)


def _body(rank: int, world: int, ckpt: str) -> dict:
    from megatron.core import parallel_state as ps

    from rspo_mega.models.llada import build_llada_model, load_model, save_model
    from rspo_mega.parallel import initialize_model_parallel
    from rspo_mega.rollout.engine import RolloutEngine
    from rspo_mega.training.completion_batches import completion_batch
    from tests.rollout.dp_split import split_completions

    mcfg = ModelConfig(**MODEL)
    initialize_model_parallel(seed=3)
    save_model(build_llada_model(mcfg), ckpt)
    prompts, prompt_uids = _prompts(4)
    out: dict = {}
    for tp, pp in LAYOUTS:
        initialize_model_parallel(tp=tp, pp=pp, seed=3)
        model = build_llada_model(mcfg, init_weights=False)
        load_model(model, ckpt)
        mine = split_completions(prompt_uids, 2, ps.get_data_parallel_rank(),
                                  ps.get_data_parallel_world_size(), keep_groups=False)
        uids = [u for _, u in mine]
        for mode, kw in MODES.items():
            rcfg = RolloutConfig(gen_length=12, block_length=4, steps=6, micro_batch_size=3,
                                 stop_on_eos_block=False, **kw)
            engine = RolloutEngine(model, mcfg, rcfg, seed=9)
            rollout = engine.generate([prompts[i] for i, _ in mine], uids, trajectory=True)
            batch = completion_batch(rollout, uids, [i for i, _ in mine])
            tr = rollout.trajectory
            local = {u: (tr.commit_step[j], tr.logp[j], tr.entropy[j], int(rollout.steps_used[j]))
                     for j, u in enumerate(uids)}
            scored = _rescored(engine, batch, rcfg)
            if scored is not None:  # last stage: fresh minus recorded, per committed token
                logp, masked = scored
                first = masked.sampled_steps.flatten()[:, None] == 0
                diff = (logp - masked.rollout_logp).abs()
                local["diff"] = float(diff[masked.score_mask].max())
                local["diff_first"] = float(diff[masked.score_mask & first].max())
            parts: list = [None] * world
            dist.all_gather_object(parts, local)
            out[(tp, pp, mode)] = parts
    return out if rank == 0 else None


def test_record_matches_a_fresh_forward_and_every_layout(tmp_path):
    res = run_distributed(_body, 4, args=(str(tmp_path / "ckpt"),), timeout=600)[0]
    for mode in MODES:
        base: dict = {}
        for tp, pp in LAYOUTS:
            parts = res[(tp, pp, mode)]
            diffs = [p["diff"] for p in parts if "diff" in p]
            firsts = [p["diff_first"] for p in parts if "diff_first" in p]
            assert diffs, (mode, tp, pp)
            if mode == "cached":  # later steps read stale K/V; a row's first step is a full pass
                assert max(firsts) < 1e-5, (tp, pp, firsts)
            else:
                assert max(diffs) < 1e-5, (mode, tp, pp, diffs)
            merged = {u: rec for p in parts for u, rec in p.items() if isinstance(u, int)}
            assert len(merged) == 8
            for uid, (commit, logp, entropy, steps) in merged.items():
                counts = torch.bincount(commit, minlength=steps)
                assert int(counts.sum()) == 12 and bool((counts[:steps] > 0).all()), (mode, uid)
                assert bool((entropy >= 0).all()) and bool((logp <= 0).all())
                if uid in base:
                    assert torch.equal(commit, base[uid][0]), (mode, tp, pp, uid)
                    assert torch.allclose(logp, base[uid][1], atol=1e-5), (mode, tp, pp, uid)
                    assert torch.allclose(entropy, base[uid][2], atol=1e-5), (mode, tp, pp, uid)
                else:
                    base[uid] = (commit, logp, entropy)
