"""Group-relative advantages from rewards, with groups that may span data-parallel ranks.

Each completion carries a *global* group id in ``[0, num_groups)`` (its prompt). Group sizes,
means and variances are computed with one :func:`segment_sums` all-reduce of
``[count, sum r, sum r^2]`` in fp64, so the result is the same for any sharding of the batch.

``algorithm.advantage``:

* ``mean``: ``A = r - mean_g r`` (ESPO, SPG).
* ``leave_one_out``: ``A = G/(G-1) (r - mean_g r)``, i.e. ``r`` minus the mean of the *other*
  members (ESPO code). A singleton group has no baseline and gets ``A = 0``.
* ``standardized`` (RSPO default): ``A = (r - mean_g r) / (std_g r + advantage_eps)`` with the
  Bessel-corrected group std as in GRPO/TRL; singleton groups get std 0, hence ``A = 0``.
"""

from __future__ import annotations

import torch

from rspo_mega.config.schema import Advantage, AlgorithmConfig, choices
from rspo_mega.parallel.reductions import ProcessGroup, data_parallel_group, segment_sums


def group_statistics(
    values: torch.Tensor, group_ids: torch.Tensor, num_groups: int, group: ProcessGroup = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global per-group ``(count, mean, unbiased var)``, each ``[num_groups]`` fp64.

    Empty groups get mean 0; groups of one get variance 0.
    """
    v = values.detach().to(torch.float64)
    stacked = torch.stack([torch.ones_like(v), v, v * v])  # [3, B]
    ids = group_ids.long()
    offsets = torch.arange(3, device=ids.device).unsqueeze(1) * num_groups  # one all-reduce
    sums = segment_sums(stacked.flatten(), (ids.unsqueeze(0) + offsets).flatten(),
                        3 * num_groups, group).view(3, num_groups)
    count, total, total_sq = sums.unbind()
    safe = count.clamp(min=1.0)
    mean = total / safe
    var = ((total_sq - count * mean * mean) / (count - 1.0).clamp(min=1.0)).clamp(min=0.0)
    var = torch.where(count > 1, var, torch.zeros_like(var))
    return count, mean, var


def compute_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    num_groups: int,
    cfg: AlgorithmConfig,
    group: ProcessGroup = None,
) -> torch.Tensor:
    """Advantages ``[B]`` (dtype of ``rewards``) for this rank's completions.

    ``group`` defaults to the data-parallel group (all completions of the global batch).
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids "
                         f"{tuple(group_ids.shape)} must be matching 1-d tensors")
    group = group if group is not None else data_parallel_group()
    count, mean, var = group_statistics(rewards, group_ids, num_groups, group)
    ids = group_ids.long()
    centred = rewards.detach().to(torch.float64) - mean[ids]
    g = count[ids]
    if cfg.advantage == "mean":
        adv = centred
    elif cfg.advantage == "leave_one_out":
        adv = torch.where(g > 1, centred * g / (g - 1.0).clamp(min=1.0), torch.zeros_like(centred))
    elif cfg.advantage == "standardized":
        adv = centred / (var[ids].sqrt() + cfg.advantage_eps)
        adv = torch.where(g > 1, adv, torch.zeros_like(adv))
    else:
        raise ValueError(f"algorithm.advantage={cfg.advantage!r}: expected one of "
                         f"{choices(Advantage)}")
    return adv.to(rewards.dtype)
