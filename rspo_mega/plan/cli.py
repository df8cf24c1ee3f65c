"""``rspo-plan``: memory and step time of a run on a cluster layout, before anything is launched.

    rspo-plan --config run.yaml [key=value ...] --gpus-per-node 8 --nodes 2 --gpu-memory-gib 80
              [--gemm-tflops 790] [--json] [--search [--top 10]]

The world is ``--nodes`` x ``--gpus-per-node`` ranks (a config's ``parallel.world_size`` gives
way to it). Prints, per pipeline stage, every rank's memory by part and phase, and per phase the FLOPs,
communication and estimated seconds of one RL step (``--json``: the same as one JSON object).
``--search`` lists the layouts and memory options that fit, by estimated throughput (with
``model.lora.enabled`` LoRA layouts: a frozen base, the adapters' gradients and Adam state, no
reference copy; the table's title says which). Exit
status: 0 when the plan fits (``--search``: when any layout fits), 1 when it does not, 2 for a
config or option error (the message names the key).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from rspo_mega.console import add_debug_flag, hide_library_warnings, run_entry_point, setup_logging
from rspo_mega.plan import tables
from rspo_mega.plan.hardware import Hardware
from rspo_mega.plan.launch import refusal
from rspo_mega.plan.planner import plan_run, search

_DEFAULTS = Hardware()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rspo-plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="YAML run config (default: the tiny default)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. parallel.tp=2")
    p.add_argument("--gpus-per-node", type=int, default=_DEFAULTS.gpus_per_node)
    p.add_argument("--nodes", type=int, default=_DEFAULTS.nodes)
    p.add_argument("--gpu-memory-gib", type=float, default=_DEFAULTS.memory_gib,
                   help="memory per rank (GiB)")
    p.add_argument("--device", default=_DEFAULTS.kind, help="gpu (default) or cpu")
    p.add_argument("--gemm-tflops", type=float, default=_DEFAULTS.gemm_tflops,
                   help="dense GEMM rate per rank in the parameter dtype")
    p.add_argument("--efficiency", type=float, default=_DEFAULTS.efficiency,
                   help="share of the GEMM rate the model's passes sustain")
    p.add_argument("--memory-gbps", type=float, default=_DEFAULTS.memory_gbps)
    p.add_argument("--nvlink-gbps", type=float, default=_DEFAULTS.nvlink_gbps)
    p.add_argument("--network-gbps", type=float, default=_DEFAULTS.network_gbps)
    p.add_argument("--latency-us", type=float, default=_DEFAULTS.latency_us)
    p.add_argument("--framework-gib", type=float, default=_DEFAULTS.framework_gib,
                   help="per-rank allowance: CUDA context, workspaces, NCCL buffers")
    p.add_argument("--fragmentation", type=float, default=_DEFAULTS.fragmentation,
                   help="allocator overhead, share of each phase's transient bytes")
    p.add_argument("--prompt-length", type=int, default=None,
                   help="longest prompt of a batch in tokens (default: data.max_prompt_length)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--search", action="store_true", help="list the layouts that fit")
    p.add_argument("--top", type=int, default=10, help="layouts --search lists")
    add_debug_flag(p)
    return p.parse_intermixed_args(argv)  # overrides may come before or after the options


def hardware_from_args(a: argparse.Namespace) -> Hardware:
    return Hardware(kind=a.device, gpus_per_node=a.gpus_per_node, nodes=a.nodes,
                    memory_gib=a.gpu_memory_gib, gemm_tflops=a.gemm_tflops,
                    efficiency=a.efficiency, memory_gbps=a.memory_gbps,
                    nvlink_gbps=a.nvlink_gbps, network_gbps=a.network_gbps,
                    latency_us=a.latency_us, framework_gib=a.framework_gib,
                    fragmentation=a.fragmentation)


def _run_search(cfg, hw: Hardware, a: argparse.Namespace) -> int:
    plans = search(cfg, hw, a.prompt_length, a.top)
    if a.json:
        print(json.dumps([tables.to_json(p) for p in plans], indent=1))
    else:
        print(tables.search_table(plans, lora=cfg.model.lora.enabled))
    return 0 if plans else 1


def plan(a: argparse.Namespace) -> int:
    """Plan (or search) the config on the hardware of the options; the exit status."""
    from dataclasses import replace

    from rspo_mega.config.paths import TINY_DEFAULT
    from rspo_mega.setup import load_run_config  # megatron-core: after its warnings are hidden

    cfg = load_run_config(a.config or TINY_DEFAULT, a.overrides)
    hw = hardware_from_args(a)
    # the cluster of --nodes x --gpus-per-node is the world; a file's world_size gives way
    cfg.parallel = replace(cfg.parallel, world_size=None)
    if a.search:
        return _run_search(cfg, hw, a)
    result = plan_run(cfg, hw, a.prompt_length)
    why = refusal(result, a.prompt_length)
    print(json.dumps(tables.to_json(result), indent=1) if a.json else tables.text(result))
    if why:
        print(f"rspo-plan: does not fit: {why}", file=sys.stderr)
    return 1 if why else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    hide_library_warnings()  # before megatron-core is first imported (rspo_mega.setup imports it)
    a = parse_args(argv)
    setup_logging("WARNING")
    return run_entry_point("rspo-plan", lambda: plan(a), debug=a.debug)


if __name__ == "__main__":
    sys.exit(main())
