"""Plain-torch reference of LLaDA's sampler, written from shared/design/LLADA_FORMAT.md.

Deliberately naive: full-vocabulary float64 softmax, the ``exp(logits) / (-log u)^T`` form of
Gumbel-max, all positions sampled every step. ``noise(step, b, S, V)`` and
``remask_noise(step, b, S)`` supply the uniforms so a test can feed the same draws to the
production sampler.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def transfer_schedule(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
    counts = mask_index.sum(dim=1, keepdim=True)
    base, rem = counts // steps, counts % steps
    out = torch.zeros(counts.size(0), steps, dtype=torch.int64) + base
    for i in range(counts.size(0)):
        out[i, : rem[i]] += 1
    return out


@torch.no_grad()
def reference_generate(
    logits_fn: Callable[[torch.Tensor], torch.Tensor],
    prompt: torch.Tensor,  # [b, P], same length prompts, no padding
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float,
    remasking: str,
    mask_id: int,
    cfg_scale: float = 0.0,
    noise: Optional[Callable[[int, int, int, int], torch.Tensor]] = None,
    remask_noise: Optional[Callable[[int, int, int], torch.Tensor]] = None,
) -> torch.Tensor:
    """Returns the full sequences ``[b, P + gen_length]``."""
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    per_block = steps // num_blocks
    step = 0
    for nb in range(num_blocks):
        lo, hi = plen + nb * block_length, plen + (nb + 1) * block_length
        schedule = transfer_schedule(x[:, lo:hi] == mask_id, per_block)
        for i in range(per_block):
            mask_index = x == mask_id
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                both = logits_fn(torch.cat([x, un_x]))
                cond, un = torch.chunk(both, 2, dim=0)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = logits_fn(x)
            logits = logits.to(torch.float64)
            if temperature > 0:
                u = noise(step, b, x.shape[1], logits.shape[-1])
                x0 = torch.argmax(logits.exp() / (-torch.log(u)) ** temperature, dim=-1)
            else:
                x0 = torch.argmax(logits, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits, dim=-1)
                conf = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            else:
                conf = remask_noise(step, b, x.shape[1])
            conf[:, hi:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.full_like(conf, -float("inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(b):
                k = int(schedule[j, i])
                if k > 0:
                    transfer[j, torch.topk(conf[j], k=k).indices] = True
            x[transfer] = x0[transfer]
            step += 1
    return x
