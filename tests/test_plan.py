"""rspo-plan: the parts of a small config against values computed by hand, fixes and search,
the CLI, and rspo-train's launch check (it refuses before any process group exists)."""

from __future__ import annotations

import json

import pytest
import torch

from rspo_mega.config import ConfigError
from rspo_mega.plan import (
    Hardware, check_before_launch, fixes, plan_run, search, with_overrides,
)
from rspo_mega.plan.planner import candidate_changes
from rspo_mega.setup import load_run_config
from rspo_mega.plan.timing import rollout_time

# 2 layers, hidden 64, ffn 192, 4 heads of 16 / 2 KV groups, vocab 300 (padded to 512 at tp=2:
# shards of 256 rows, the first TP rank holds 256 real columns), bf16, TP=2 on two GPUs.
SMALL = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=192",
         "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=300",
         "model.mask_token_id=299", "model.eos_token_id=298", "model.max_position_embeddings=64",
         "model.params_dtype=bfloat16", "parallel.tp=2", "global_batch_size=8",
         "rollout.group_size=4", "rollout.gen_length=16",
         "rollout.block_length=16", "rollout.steps=8", "data.max_prompt_length=16",
         "likelihood.micro_batch_size=4",
         # a model of its own, not the tiny default's shipped start, and nothing saved
         "checkpoint.init_from=null", "checkpoint.save_dir=null", "checkpoint.export_hf=null"]
TWO_GPUS = Hardware(kind="gpu", gpus_per_node=2, nodes=1, memory_gib=80.0, framework_gib=1.0,
                    fragmentation=0.1)
EIGHT_B = "examples/configs/llada8b_rspo_countdown.yaml"

# Per TP rank: QKV (4 + 2*2)*16*64/2 = 4096, proj 4*16*64/2 = 2048, fc1 + fc2 3*192*64/2 = 18432,
# two norms 128: 24704 per layer. Embedding and output 256*64 each, final norm 64.
PARAMS = 2 * 24704 + 2 * 256 * 64 + 64  # 82240
# One micro-batch: 4 sequences x (16 prompt + 16 generated) tokens = 128 tokens.
# TE layer, per token: norm input + norm output twice (4*64), fc1 output 2*192/2, SwiGLU output
# 192/2, mixed QKV (4+4)*16/2, Q and K after RoPE and the attention output (8+2)*16/2, all bf16,
# plus the fp32 log-sum-exp (4/2 heads) and two rstd: 688 * 2 + 4 * 4 = 1392 bytes.
LAYER_TOKEN = (4 * 64 + 3 * 96 + 8 * 8 + 10 * 8) * 2 + (2 + 2) * 4
# The graph of one micro-batch: 2 layers, the token ids (int64) and the embedding's out-of-shard
# mask (bool) of 128 tokens.
GRAPH = 2 * 128 * LAYER_TOKEN + 128 * (8 + 1)
# Coupled pairs split the 16 generated positions: 2 pairs per micro-batch score 32 positions.
# Head: final norm input (bf16) + rstd per token; per position the hidden row (bf16), the
# softmax over 256 columns (fp32), two int64 indices and a bool.
HEAD = 128 * (64 * 2 + 4) + 32 * (64 * 2 + 256 * 4 + 16 + 1)


def _cfg(*extra: str):
    return load_run_config(None, SMALL + list(extra))


def test_resident_parts_by_hand():
    plan = plan_run(_cfg(), TWO_GPUS)
    assert plan.shapes.stage_params(0) == PARAMS
    assert plan.stages[0].resident == {
        "policy weights": PARAMS * 2, "gradients": PARAMS * 4,
        "optimizer states": PARAMS * 12,  # bf16: fp32 main weights + two fp32 moments
        "reference model": PARAMS * 2, "framework": 2**30}
    do = plan_run(_cfg("optimizer.use_distributed_optimizer=true", "likelihood.offload_reference=true"),
                  Hardware(kind="gpu", gpus_per_node=8, memory_gib=80.0))
    assert do.layout.dp == 4
    assert do.stages[0].resident["optimizer states"] == PARAMS * 12 // 4
    assert do.stages[0].resident["reference model"] == 0  # offloaded: moved in to score only
    assert do.stages[0].phases["reference"]["reference model"] == PARAMS * 2


def test_policy_parts_by_hand():
    one_pass = plan_run(_cfg(), TWO_GPUS).stages[0].phases["policy"]
    # 8 completions x K=2 pairs x 2 = 32 sequences: 8 micro-batches, all graphs kept
    assert one_pass["elbo activations"] == 8 * GRAPH
    assert one_pass["logits"] == 8 * HEAD + 32 * 256 * 4  # + one micro-batch's fp32 logits
    # backward: (2 hidden + 4 * 192/2 ffn) bf16 per token, + the output layer's gradient (bf16)
    assert one_pass["backward temporaries"] == 128 * (2 * 64 + 4 * 96) * 2 + 256 * 64 * 2 \
        - 32 * 256 * 4
    assert one_pass["elbo inputs and log-probs"] == 32 * 32 * (8 + 8 + 4 + 4)
    moving = sum(v for k, v in one_pass.items() if k != "fragmentation")
    assert one_pass["fragmentation"] == int(0.1 * moving)
    two_pass = plan_run(_cfg("likelihood.one_pass=false"), TWO_GPUS).stages[0].phases["policy"]
    assert two_pass["elbo activations"] == GRAPH and two_pass["logits"] == HEAD + 32 * 256 * 4


def test_rollout_parts_and_kv_cache_by_hand():
    plain = plan_run(_cfg(), TWO_GPUS).stages[0].phases["rollout"]
    # block logits of 8 rows x 16 positions x 256 columns (fp32)
    assert plain["logits"] == 8 * 16 * 256 * 4
    # Gumbel-max beside the gathered noise: 128 x 300 uniforms and three 128 x 256 float64
    # scores; larger than the forward's peak, so that is the rollout's peak
    assert plain["sampling"] == 128 * 300 * 8 + 3 * 128 * 256 * 8
    assert "activations" not in plain or plain["activations"] == 0
    dual = plan_run(_cfg("rollout.cache=dual"), TWO_GPUS).stages[0].phases["rollout"]
    # [layers 2, K/V 2, rows 8, S 32, KV heads 2/2, head dim 16] in bf16
    assert dual["kv cache"] == 2 * 2 * 8 * 32 * 1 * 16 * 2


def test_rollout_flops_by_hand():
    plain, dual = (plan_run(_cfg(*x), TWO_GPUS) for x in ([], ["rollout.cache=dual"]))
    # per layer and query token: 2 * 24576 matmul weights + 4 * keys * 2 heads * 16
    full_step = 2 * (2 * 256 * 24576 + 4 * 256 * 32 * 2 * 16)  # 8 rows x 32 tokens, 2 layers
    block_step = 2 * (2 * 128 * 24576 + 4 * 128 * 32 * 2 * 16)  # dual: the 16 block columns
    head = 2 * 8 * 64 * 256 * (16 + 14 + 12 + 10 + 8 + 6 + 4 + 2)  # masked positions per step
    t = rollout_time(plain.shapes, plain.work, TWO_GPUS.rates(plain.shapes, 1))
    assert t.flops == 8 * full_step + head
    t = rollout_time(dual.shapes, dual.work, TWO_GPUS.rates(dual.shapes, 1))
    assert t.flops == full_step + 7 * block_step + head


def test_peaks_add_up_and_a_small_gpu_refuses():
    plan = plan_run(_cfg(), TWO_GPUS)
    stage = plan.stages[0]
    for phase, parts in stage.phases.items():
        assert stage.peak(phase) == sum(stage.resident.values()) + sum(parts.values())
    assert plan.fits
    tiny_gpu = Hardware(kind="gpu", gpus_per_node=2, memory_gib=1.001, framework_gib=1.0)
    assert not plan_run(_cfg(), tiny_gpu).fits


def test_world_size_and_hardware_errors_name_the_key():
    with pytest.raises(ConfigError, match="parallel.world_size=8 but the plan is for 2 ranks"):
        plan_run(_cfg("parallel.world_size=8"), TWO_GPUS)
    with pytest.raises(ConfigError, match="--gpus-per-node must be >= 1"):
        plan_run(_cfg(), Hardware(gpus_per_node=0))
    with pytest.raises(ConfigError, match="--efficiency"):
        plan_run(_cfg(), Hardware(gpus_per_node=2, efficiency=1.5))


def _eight_b(*extra: str):
    return load_run_config(EIGHT_B, list(extra))  # its geometry: model.hf_config=shipped:llada_8b


def test_fixes_of_an_8b_layout_that_does_not_fit():
    cfg = _eight_b("parallel.tp=1", "optimizer.use_distributed_optimizer=false")
    plan = plan_run(cfg, Hardware())
    assert not plan.fits  # 8 B on one GPU: 16 GB weights + 32 GB grads + 96 GB Adam + 16 GB ref
    found = fixes(plan)
    assert found and all(p.fits for _, p in found)
    # sharding Adam over dp=8 alone still leaves 16 + 32 + 12 + 16 + 2 GB: no single change fits
    assert all(len(c) == 2 and c["optimizer.use_distributed_optimizer"] for c, _ in found)
    speeds = [p.completions_per_s for _, p in found]
    assert speeds == sorted(speeds, reverse=True)


def test_recipe_layouts_fit_on_1_2_and_8_nodes():
    for nodes, extra in ((1, []), (2, ["parallel.pp=2", "parallel.world_size=16"]),
                         (8, ["parallel.tp=4", "parallel.pp=2", "parallel.world_size=64"])):
        plan = plan_run(_eight_b(*extra), Hardware(nodes=nodes))
        assert plan.fits, f"{nodes} nodes"


def test_the_8b_recipes_roll_out_on_the_fast_path_and_plan_its_cache():
    from pathlib import Path

    recipes = sorted(Path(EIGHT_B).parent.glob("llada8b_*.yaml"))
    assert len(recipes) == 8
    for recipe in recipes:
        cfg = load_run_config(str(recipe), [])
        ro = cfg.rollout
        assert (ro.cache, ro.confidence_threshold, ro.cache_check_rate, ro.guard.enabled) == (
            "dual", 0.9, 0.1, True), recipe
        plan = plan_run(cfg, Hardware())
        assert plan.fits, recipe
        rows = cfg.global_batch_size // plan.layout.dp  # completions per rank
        seq = cfg.data.max_prompt_length + ro.gen_length
        # [32 layers, K/V, rows, S, 32 KV heads / TP2, head dim 128] in bf16
        assert plan.stages[0].phases["rollout"]["kv cache"] == 32 * 2 * rows * seq * 16 * 128 * 2


def test_search_lists_fitting_layouts_fastest_first():
    plans = search(_cfg(), TWO_GPUS, top=5)
    assert plans and all(p.fits for p in plans)
    rates = [p.completions_per_s for p in plans]
    assert rates == sorted(rates, reverse=True)
    assert len({(p.shapes.tp, p.shapes.pp) for p in search(_cfg(), TWO_GPUS, top=10**6)}) == 3


def test_cli_table_json_and_exit_codes(capsys):
    from rspo_mega.plan.cli import main

    args = SMALL + ["--gpus-per-node", "2", "--gpu-memory-gib", "80"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "memory per rank" in out and "policy passes" in out and "completions/s" in out
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] and data["stages"][0]["resident_bytes"]["policy weights"] == PARAMS * 2
    assert main(SMALL + ["--gpus-per-node", "2", "--gpu-memory-gib", "0.5"]) == 1
    assert "does not fit: pp stage 0 needs" in capsys.readouterr().err
    assert main(SMALL + ["--nodes", "0"]) == 2
    assert "--nodes must be >= 1" in capsys.readouterr().err
    assert main(SMALL + ["--gpus-per-node", "2", "--search", "--top", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and "full fine-tuning" in lines[0]  # title, header, 3 layouts


def test_the_nodes_and_gpus_options_set_the_world_over_a_files_world_size(capsys):
    """README step 3 as written: the recipe's file holds the 1-node layout (world_size 8)."""
    from rspo_mega.plan.cli import main

    assert main(["--config", EIGHT_B, "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("16 ranks = 2 node(s) x 8 gpu"), out[:200]


def test_launch_refusal_names_stage_phase_parts_and_fixes():
    cfg = _eight_b("parallel.tp=1", "optimizer.use_distributed_optimizer=false")
    from rspo_mega.setup import validate_run

    reason = check_before_launch(cfg, validate_run(cfg, world_size=8), Hardware())
    assert reason.startswith("pp stage 0 needs ") and " GiB of 80.0 (" in reason
    assert "optimizer states" in reason and ": set " in reason
    assert "optimizer.use_distributed_optimizer=true" in reason


HUGE = ["model.num_layers=64", "model.hidden_size=8192", "model.ffn_hidden_size=28672",
        "model.num_attention_heads=64", "model.max_position_embeddings=256",
        "checkpoint.init_from=null", "checkpoint.save_dir=null", "checkpoint.export_hf=null"]


def test_rspo_train_refuses_before_any_process_group(monkeypatch, capsys, tmp_path):
    import rspo_mega.training.trainer as trainer_module
    from rspo_mega import train

    built = []
    monkeypatch.setattr(trainer_module, "Trainer",
                        lambda *a, **k: built.append(a) or pytest.fail("Trainer was built"))
    args = HUGE + [f"logging.output_dir={tmp_path}"]
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert "rspo-train: plan check: pp stage 0 needs" in err and "policy weights" in err
    assert "--no-plan-check" in err
    assert not torch.distributed.is_initialized() and not built

    class Built(Exception):
        pass

    def trainer(*a, **k):
        raise Built()

    monkeypatch.setattr(trainer_module, "Trainer", trainer)
    with pytest.raises(Built):  # --no-plan-check goes on to build the trainer
        train.main(args + ["--no-plan-check"])


# LoRA r=4 on all four linears of SMALL at TP2, per layer and TP rank: QKV A 4*64 + B 64*4,
# proj A 4*32 + B 64*4, fc1 A 4*64 + B 192*4, fc2 A 4*96 + B 64*4 = 3200.
ADAPTERS = 2 * (4 * 64 + 64 * 4 + 4 * 32 + 64 * 4 + 4 * 64 + 192 * 4 + 4 * 96 + 64 * 4)


def test_lora_counts_adapters_and_no_reference_by_hand():
    plan = plan_run(_cfg("model.lora.enabled=true", "model.lora.rank=4",
                         "checkpoint.init_from=/base"), TWO_GPUS)  # a path, not read
    assert plan.shapes.stage_trainable(0) == ADAPTERS
    assert plan.stages[0].resident == {
        "policy weights": PARAMS * 2, "gradients": ADAPTERS * 4,
        "optimizer states": ADAPTERS * 12, "adapters": ADAPTERS * 2, "framework": 2**30}
    assert "reference model" not in plan.stages[0].phases["reference"]
    # TE spec (an upper bound): each of a layer's 4 adapters saves its A x (r = 4 bf16 values)
    # per token, 2 layers x 128 tokens per micro-batch graph, and the frozen embedding saves no
    # token ids (int64) or out-of-shard mask (bool); 8 graphs alive (one pass, 8 micro-batches)
    base = plan_run(_cfg(), TWO_GPUS).stages[0].phases["policy"]["elbo activations"]
    assert plan.stages[0].phases["policy"]["elbo activations"] - base == \
        8 * (2 * 128 * 4 * 4 * 2 - 128 * (8 + 1))


def test_the_8b_lora_recipe_plans_no_reference_and_a_small_optimizer_state():
    full = plan_run(load_run_config(EIGHT_B, []), Hardware())
    lora = plan_run(load_run_config("examples/configs/llada8b_rspo_countdown_lora.yaml", []),
                    Hardware())
    assert lora.fits and lora.layout == full.layout
    full_parts, parts = full.stages[0].resident, lora.stages[0].resident
    assert "reference model" not in parts and full_parts["reference model"] > 7 * 2**30
    assert parts["optimizer states"] < full_parts["optimizer states"] / 30
    assert parts["gradients"] < full_parts["gradients"] / 30
    assert parts["policy weights"] == full_parts["policy weights"]  # the frozen base stays


def test_lora_search_admits_layouts_the_full_search_rejects(capsys):
    """The 8B countdown recipe on one node of 2 x 80 GiB: no full-fine-tuning layout fits (16 GB
    of weights, 32 of gradients, 48 of Adam and 16 of reference per rank at best); its LoRA
    recipe's search, planned with the adapters' gradients and Adam state, a frozen base and no
    reference copy, finds layouts, and says they are LoRA ones."""
    from rspo_mega.plan.cli import main

    two = Hardware(gpus_per_node=2)
    lora_cfg = load_run_config(EIGHT_B.replace(".yaml", "_lora.yaml"), [])
    assert search(_eight_b(), two) == []
    plans = search(lora_cfg, two, top=10**6)
    assert plans and all(p.fits and p.shapes.lora_rank == 128 for p in plans)
    assert not any(p.cfg.likelihood.offload_reference for p in plans)  # nothing to offload
    for p in plans:
        assert "reference model" not in p.stages[0].resident
        assert p.stages[0].resident["gradients"] == p.shapes.stage_trainable(0) * 4
        full = plan_run(with_overrides(p.cfg, {"model.lora.enabled": False}), two)
        assert not full.fits  # the same layout without LoRA is over
    args = ["--gpus-per-node", "2", "--search", "--top", "2"]
    assert main(["--config", EIGHT_B, *args]) == 1
    assert "no layout fits (full fine-tuning)" in capsys.readouterr().out
    assert main(["--config", EIGHT_B.replace(".yaml", "_lora.yaml"), *args]) == 0
    title, _, first, _ = capsys.readouterr().out.strip().splitlines()
    assert title.startswith("layouts that fit, fastest first, LoRA r=128 alpha 64 on "
                            "linear_qkv, linear_fc1"), title
    assert first.split()[6] == "-"  # the offload column: no reference copy


def test_lora_fixes_do_not_offload_a_reference_it_does_not_have():
    full, lora = (plan_run(load_run_config(path, []), Hardware())
                  for path in (EIGHT_B, EIGHT_B.replace(".yaml", "_lora.yaml")))
    assert {"likelihood.offload_reference": True} in candidate_changes(full)
    assert all("likelihood.offload_reference" not in c for c in candidate_changes(lora))
