"""The CPU compatibility layer: every patch is still needed, works, and the GPU path skips it."""

from __future__ import annotations

import pytest
import torch

from rspo_mega.parallel import cpu_compat
from rspo_mega.parallel.cpu_compat import PATCHES, apply_cpu_compat


@pytest.fixture(scope="module", autouse=True)
def _applied():
    if torch.cuda.is_available():
        pytest.skip("the CPU layer is not used where CUDA is present")
    apply_cpu_compat()


@pytest.mark.parametrize("patch", PATCHES, ids=[p.covers for p in PATCHES])
def test_patch_is_not_stale(patch):
    """Fails when a megatron-core upgrade removed the CUDA assumption: delete that patch then."""
    assert patch.still_needed(), f"stale CPU patch, megatron-core no longer needs: {patch.covers}"


def test_patches_are_listed_once_and_applied():
    covers = [p.covers for p in PATCHES]
    assert len(covers) == len(set(covers))
    assert cpu_compat.is_applied()
    assert apply_cpu_compat() == covers  # idempotent


def test_gpu_path_does_not_go_through_the_layer(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_APPLIED", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    sentinel = object()
    monkeypatch.setattr(torch.cuda, "current_device", sentinel)
    assert apply_cpu_compat() == []
    assert torch.cuda.current_device is sentinel


def test_current_device_and_buffers_are_cpu():
    from megatron.core.utils import GlobalMemoryBuffer

    assert torch.cuda.current_device() == torch.device("cpu")
    buf = GlobalMemoryBuffer().get_tensor([4, 2], torch.float32, "test")
    assert buf.device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"


def test_causal_masks_on_cpu():
    from megatron.core.fusions import fused_softmax
    from megatron.core.transformer import utils

    for mod in (utils, fused_softmax):
        mask = mod.get_default_causal_mask(4)
        assert mask.device.type == "cpu" and mask.dtype == torch.bool
        assert torch.equal(mask, torch.triu(torch.ones(4, 4, dtype=torch.bool), 1))
        sw = mod.get_sliding_window_causal_mask(4, 4, (1, 0))
        assert sw[3, 2].item() is False and sw[3, 1].item() is True and sw[0, 1].item() is True


def test_cuda_literals_map_to_cpu_inside_megatron_modules():
    from megatron.core.optimizer import grad_scaler
    from megatron.core.pipeline_parallel import schedules

    t = schedules.torch.zeros([], dtype=torch.int, device="cuda")
    assert t.device.type == "cpu"
    scaler = grad_scaler.ConstantGradScaler(2.0)
    assert scaler.scale.device.type == "cpu" and scaler.scale.item() == 2.0
    assert torch.zeros(1, device="cpu").device.type == "cpu"  # global torch untouched


def test_rng_tracker_routes_to_cpu_generator():
    from megatron.core.tensor_parallel import random as mrandom

    tracker = mrandom.CudaRNGStatesTracker()
    torch.manual_seed(0)
    tracker.add("stream-a", 123)
    outside_before = torch.get_rng_state()
    with tracker.fork("stream-a"):
        a1 = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outside_before)  # default stream restored
    with tracker.fork("stream-a"):
        a2 = torch.rand(3)
    torch.manual_seed(123)
    assert torch.equal(a1, torch.rand(3))  # the stream was seeded with 123
    assert not torch.equal(a1, a2)  # and it advances between forks


def test_type_names_are_cuda_only_inside_wrapped_calls():
    x = torch.zeros(2)
    with cpu_compat._cuda_type_names():
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.type(torch.float64).dtype == torch.float64
    assert x.type() == "torch.FloatTensor"
