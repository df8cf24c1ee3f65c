"""The machines a plan is for: memory per rank, rates, and where each parallel group runs.

Defaults describe a node of 8 H100/H200-class GPUs: the 790 TFLOP/s dense bf16 GEMM rate and
the 0.60 share of it that a TE bf16 forward + backward of LLaDA-8B's layers reached
(``docs/GPU.md``), NVLink within a node, one 400 Gb/s NIC per GPU between nodes. Ranks are
placed in megatron-core's order (``tp-cp-ep-dp-pp``: TP innermost), so a TP group stays in a
node while ``tp <= gpus_per_node``, a DP group while ``tp * dp <= gpus_per_node``, and PP spans
nodes as soon as the job does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from rspo_mega.config import ConfigError
from rspo_mega.plan.memory import Allowance
from rspo_mega.plan.shapes import ModelShapes
from rspo_mega.plan.timing import Rates

GIB = 2**30
KINDS = ("gpu", "cpu")
# Dense bf16 tensor-core peak TFLOP/s per device (the vendors' data sheets, without sparsity),
# by a piece of the name torch.cuda.get_device_name() reports; the first piece found in the
# name wins, so a name that holds another comes before it (GH200 before H200 before H20).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0),
    ("GH200", 989.5), ("H200 NVL", 835.5), ("H200", 989.5), ("H100 PCIe", 756.0),
    ("H100 NVL", 835.5), ("H100", 989.5), ("H800", 989.5), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("MI300X", 1307.4), ("MI325X", 1307.4),
)


def peak_tflops(device_name: str) -> Optional[float]:
    """The dense bf16 peak of the device named ``device_name`` (:data:`PEAK_BF16_TFLOPS`), or
    None for a device not listed."""
    for piece, tflops in PEAK_BF16_TFLOPS:
        if piece in device_name:
            return tflops
    return None


def _option(field_name: str) -> str:
    """The ``rspo-plan`` option of a :class:`Hardware` field (``memory_gib``: the GPU's memory)."""
    return "gpu-memory-gib" if field_name == "memory_gib" else field_name.replace("_", "-")


@dataclass(frozen=True)
class Hardware:
    """A cluster of ``nodes`` x ``gpus_per_node`` ranks (``kind=cpu``: processes on CPUs)."""

    kind: str = "gpu"
    gpus_per_node: int = 8
    nodes: int = 1
    memory_gib: float = 80.0  # per rank
    gemm_tflops: float = 790.0  # dense GEMM rate in the parameter dtype, per rank
    efficiency: float = 0.6  # share of the GEMM rate the model's passes sustain
    memory_gbps: float = 3000.0  # memory bandwidth per rank (GB/s), for the optimizer
    nvlink_gbps: float = 360.0  # collective bandwidth inside a node (GB/s per rank)
    network_gbps: float = 45.0  # collective bandwidth between nodes (GB/s per rank)
    latency_us: float = 15.0  # per collective
    framework_gib: float = 2.0  # CUDA context, cuBLAS/TE workspaces, NCCL buffers (per rank)
    fragmentation: float = 0.10  # caching-allocator overhead, share of a phase's transient bytes

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def capacity_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def check(self) -> None:
        """Raise ``ConfigError`` naming the first bad option."""
        if self.kind not in KINDS:
            raise ConfigError(f"--device={self.kind!r} must be one of {list(KINDS)}")
        for name in ("gpus_per_node", "nodes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{_option(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("memory_gib", "gemm_tflops", "memory_gbps", "nvlink_gbps", "network_gbps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{_option(name)} must be > 0, got {getattr(self, name)}")
        if not 0 < self.efficiency <= 1:
            raise ConfigError(f"--efficiency must lie in (0, 1], got {self.efficiency}")
        if self.latency_us < 0 or self.framework_gib < 0 or not 0 <= self.fragmentation < 1:
            raise ConfigError("--latency-us and --framework-gib must be >= 0 and --fragmentation "
                              f"in [0, 1), got {self.latency_us}, {self.framework_gib}, "
                              f"{self.fragmentation}")

    def allowance(self) -> Allowance:
        return Allowance(int(self.framework_gib * GIB), self.fragmentation)

    def _group_bytes_s(self, span: int) -> float:
        """Bandwidth of a group whose ranks lie within ``span`` consecutive ranks."""
        return (self.nvlink_gbps if span <= self.gpus_per_node else self.network_gbps) * 1e9

    def rates(self, m: ModelShapes, dp: int) -> Rates:
        """The estimate's rates for layout (``m.tp``, ``m.pp``, ``dp``)."""
        # Bytes moved per local parameter. Fused Adam (GPU): read weight, gradient, two moments,
        # write three (28); the gradient norm reads the gradients and the clip scales them in
        # place (12); bf16 copies the fp32 main weights into the model's (6). torch's per-tensor
        # AdamW (CPU): eight elementwise passes (84) and megatron's unfused norm and clip (20).
        if self.kind == "cpu":
            per_param = 104
        else:
            per_param = 40 + (6 if m.param_bytes == 2 else 0)
        return Rates(
            flops=self.gemm_tflops * 1e12 * self.efficiency,
            memory_bytes_s=self.memory_gbps * 1e9,
            tp_bytes_s=self._group_bytes_s(m.tp),
            pp_bytes_s=self._group_bytes_s(m.tp * dp * m.pp),
            dp_bytes_s=self._group_bytes_s(m.tp * dp),
            latency_s=self.latency_us * 1e-6,
            optimizer_bytes_per_param=per_param,
        )


def detect(world: int) -> Hardware:
    """The hardware this process was launched on (for the launch check): the local GPU's memory,
    or the host's memory shared by the ranks of this node. Creates no process group."""
    import torch

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    nodes = max(1, world // max(per_node, 1))
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        total = torch.cuda.get_device_properties(local).total_memory
        return Hardware(kind="gpu", gpus_per_node=per_node, nodes=nodes, memory_gib=total / GIB)
    import psutil

    return Hardware(kind="cpu", gpus_per_node=per_node, nodes=nodes,
                    memory_gib=psutil.virtual_memory().total / per_node / GIB,
                    framework_gib=0.75, fragmentation=0.10)
