"""megatron-core's DistributedOptimizer with the torch Adam fallback (no apex/TE: every CPU run).

Three upstream defects (megatron-core 0.16.1 ``optimizer/distrib_optimizer.py``) stand between
that combination and an exact resume; each function below covers one and says where:

* ``state_dict`` asserts one common ``step`` (line 642), but torch Adam has no state before its
  first step, so building the sharded state dict *for loading* into a fresh optimizer fails:
  :func:`prepare_for_load` creates zero states first.
* ``_set_main_param_and_optimizer_states`` (line ~940) copies every key of the live state,
  including ``step``, from the loaded tensors, which have no ``step``: :func:`apply` skips the
  keys the checkpoint does not carry (``step`` is restored from the param groups).
* ``load_state_dict`` (line ~825) gives every parameter the *same* ``step`` tensor object, which the
  foreach Adam then increments once per parameter, silently breaking bias correction after a
  resume: :func:`finish_load` gives each parameter its own copy.

With apex or TE the distributed optimizer does not go through these paths, and nothing is changed.
"""

from __future__ import annotations

import torch

# The distributed optimizer's checkpoint format: one canonical tensor per parameter and state, so a
# run resumes exactly across TP, PP and DP changes (the default format fails to save on 0.16.1).
OPTIMIZER_CHECKPOINT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}

_ORIGINAL_SET_STATES = None  # megatron-core's own, once patched


def _uses_torch_adam() -> bool:
    from megatron.core.optimizer import distrib_optimizer

    return not distrib_optimizer.HAVE_APEX_OR_TE


def distributed_optimizers(optimizer) -> list:
    """The DistributedOptimizer instances inside ``optimizer`` (chained or not)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return [o for o in inner if isinstance(o, DistributedOptimizer)]


def apply() -> None:
    """Patch ``_set_main_param_and_optimizer_states`` to copy only the keys that were loaded."""
    global _ORIGINAL_SET_STATES
    if _ORIGINAL_SET_STATES is not None or not _uses_torch_adam():
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = _ORIGINAL_SET_STATES = DistributedOptimizer._set_main_param_and_optimizer_states

    def set_states(self, model_param, tensors):
        if self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        dst = {"param": main_param, **self.optimizer.state[main_param]}
        with torch.no_grad():
            for key, value in tensors.items():
                if key in dst:
                    dst[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = set_states


def prepare_for_load(optimizer) -> None:
    """Give a fresh torch Adam inside each distributed optimizer zero states, step 0."""
    if not _uses_torch_adam():
        return
    apply()
    for dist_opt in distributed_optimizers(optimizer):
        adam = dist_opt.optimizer
        for group in adam.param_groups:
            for p in group["params"]:
                if not adam.state[p]:
                    adam.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                     "exp_avg": torch.zeros_like(p),
                                     "exp_avg_sq": torch.zeros_like(p)}


def finish_load(optimizer) -> None:
    """Give every parameter its own ``step`` tensor after a load."""
    if not _uses_torch_adam():
        return
    for dist_opt in distributed_optimizers(optimizer):
        for state in dist_opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].detach().clone()


def still_needed() -> dict[str, bool]:
    """Whether the installed megatron-core still has each defect (a test asserts all True, so an
    upgrade that fixes one is noticed and its workaround removed)."""
    import inspect

    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as D

    set_states = _ORIGINAL_SET_STATES or D._set_main_param_and_optimizer_states
    return {
        "state_dict asserts one step": "assert len(steps) == 1" in inspect.getsource(D.state_dict),
        "set_states copies step": "dst_tensors[key].copy_(tensors[key])"
        in inspect.getsource(set_states),
        "load shares one step tensor": 's["step"] = step' in inspect.getsource(D.load_state_dict),
    }
