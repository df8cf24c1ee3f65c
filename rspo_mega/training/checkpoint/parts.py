"""The run's own stateful parts of a checkpoint: where the run is (:class:`TrainState`) and its
random streams (:class:`RNGState`). Like every part the manager saves, each has ``state_dict()``
(ints, floats, strings, lists, dicts and tensors: loadable with ``weights_only=True``) and
``load_state_dict()``.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Optional

import numpy as np
import torch


class TrainState:
    """Where the run is: optimizer steps done (``step``), its kind (``"rl"`` or ``"sft"``),
    whether the policy holds a frozen RL reference, and (LoRA) the base its adapters train on.

    Loading freezes the reference when the checkpoint holds one, so the policy's sharded state,
    loaded next, has the reference's place to fill.
    """

    def __init__(self, kind: str, policy: Any, lora_base: Optional[dict] = None) -> None:
        """``policy``: has ``reference`` (None until frozen) and ``freeze_reference()``."""
        self.kind, self.policy, self.lora_base, self.step = kind, policy, lora_base, 0

    def state_dict(self) -> dict[str, Any]:
        state = {"step": self.step, "has_reference": self.policy.reference is not None}
        return state if self.lora_base is None else {**state, "lora_base": self.lora_base}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])
        if state.get("has_reference"):
            self.policy.freeze_reference()  # same layout as the policy; its weights load next


class RNGState:
    """This rank's Python, NumPy, torch CPU (and CUDA, and megatron tracker) random states.

    Restoring continues every random stream bit for bit. A checkpoint of another world size
    carries none for this rank: then nothing is restored.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(cached)},
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
        tracker = _megatron_tracker()
        if tracker is not None and tracker.get_states():
            state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        py, npy = state["python"], state["numpy"]
        random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                             npy["has_gauss"], npy["gauss"]))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if "megatron_tracker" in state:
            _megatron_tracker().set_states(state["megatron_tracker"])


def _megatron_tracker() -> Any:
    """megatron-core's CUDA RNG tracker (its model-parallel streams), or None without it."""
    try:
        from megatron.core import tensor_parallel

        return tensor_parallel.get_cuda_rng_tracker()
    except (ImportError, RuntimeError):
        return None
