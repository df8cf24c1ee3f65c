"""An independent plain-torch LLaDA forward, written from LLADA_FORMAT.md and the HF state dict.

It uses nothing from rspo_mega or megatron: HF tensors in, unshifted logits out, computed in
float64 (so its own rounding is negligible next to the fp32 model under test).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

P = "model.transformer."


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE on ``x [b, heads, s, hd]``, positions 0..s-1, ``cat(freqs, freqs)``."""
    s, hd = x.shape[-2], x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    freqs = torch.outer(torch.arange(s, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * emb.cos() + rotated * emb.sin()


def llada_reference_logits(
    sd: dict[str, torch.Tensor],
    config: dict,
    input_ids: torch.Tensor,
    attention_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Logits ``[b, s, vocab]`` (float64) of the HF LLaDA model ``sd`` described by ``config``.

    ``attention_mask [b, s]`` (True = real token) masks padded *keys* only, as the current HF
    release does; attention is otherwise bidirectional.
    """
    w = {k: v.to(torch.float64) for k, v in sd.items()}
    heads = config["n_heads"]
    kv_heads = config.get("n_kv_heads") or heads
    d = config["d_model"]
    hd = d // heads
    eps = config["rms_norm_eps"]
    theta = config["rope_theta"]
    b, s = input_ids.shape
    x = w[P + "wte.weight"][input_ids]
    for i in range(config["n_layers"]):
        blk = f"{P}blocks.{i}."
        h = _rms_norm(x, w[blk + "attn_norm.weight"], eps)
        q = (h @ w[blk + "q_proj.weight"].T).view(b, s, heads, hd).transpose(1, 2)
        k = (h @ w[blk + "k_proj.weight"].T).view(b, s, kv_heads, hd).transpose(1, 2)
        v = (h @ w[blk + "v_proj.weight"].T).view(b, s, kv_heads, hd).transpose(1, 2)
        q, k = _rope(q, theta), _rope(k, theta)
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if attention_mask is not None:
            scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + attn.transpose(1, 2).reshape(b, s, d) @ w[blk + "attn_out.weight"].T
        h = _rms_norm(x, w[blk + "ff_norm.weight"], eps)
        gate = h @ w[blk + "ff_proj.weight"].T
        up = h @ w[blk + "up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ w[blk + "ff_out.weight"].T
    x = _rms_norm(x, w[P + "ln_f.weight"], eps)
    return x @ w[P + "ff_out.weight"].T
