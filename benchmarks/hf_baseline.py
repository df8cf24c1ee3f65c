"""Speed baselines for the benchmarks: an HF-layout LLaDA in plain torch, as fast as the published code.

The published research code this project replaces runs LLaDA through its HF modeling code
(separate q/k/v projections, rotate-half RoPE from cached tables, fused
``scaled_dot_product_attention``, SwiGLU, fp32 RMSNorm, logits for every position), samples with
LLaDA's reference ``generate`` (full-sequence logits every step, a softmax over the whole
vocabulary for the confidences) and scores completions with an ESPO-style ELBO (logits for every
position, cross entropy of the masked ones, one forward + one backward). This module implements
those three from the HF state dict and the algorithm descriptions in ``shared/design``, with
nothing from ``rspo_mega`` in the model, so a benchmark can time ours against them on the same
weights. ``forward_ms`` of :class:`HFLLaDA` is what a ratio is measured against; the benchmarks
print it next to ours.
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

PREFIX = "model.transformer."


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out.to(x.dtype)) * self.weight


class _Block(nn.Module):
    """One pre-norm LLaMA block used bidirectionally (LLaDA's ``llama`` block type)."""

    def __init__(self, d: int, heads: int, kv_heads: int, ffn: int, eps: float) -> None:
        super().__init__()
        hd = d // heads
        self.heads, self.kv_heads, self.hd = heads, kv_heads, hd
        self.attn_norm, self.ff_norm = _RMSNorm(d, eps), _RMSNorm(d, eps)
        self.q_proj = nn.Linear(d, heads * hd, bias=False)
        self.k_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, kv_heads * hd, bias=False)
        self.attn_out = nn.Linear(heads * hd, d, bias=False)
        self.ff_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.ff_out = nn.Linear(ffn, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, _ = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(b, s, self.kv_heads, self.hd).transpose(1, 2)
        q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        if self.kv_heads != self.heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
        x = x + self.attn_out(a.transpose(1, 2).reshape(b, s, -1))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class HFLLaDA(nn.Module):
    """LLaDA from an HF directory (config.json + safetensors), fp32, logits ``[b, s, V]``."""

    def __init__(self, hf_dir: str) -> None:
        super().__init__()
        with open(os.path.join(hf_dir, "config.json")) as f:
            c = json.load(f)
        d, heads = c["d_model"], c["n_heads"]
        self.wte = nn.Embedding(c["embedding_size"] or c["vocab_size"], d)
        self.blocks = nn.ModuleList(
            _Block(d, heads, c.get("n_kv_heads") or heads, c["mlp_hidden_size"], c["rms_norm_eps"])
            for _ in range(c["n_layers"]))
        self.ln_f = _RMSNorm(d, c["rms_norm_eps"])
        self.ff_out = nn.Linear(d, self.wte.num_embeddings, bias=False)
        self.theta, self.hd = c["rope_theta"], d // heads
        self._rope_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._load(hf_dir)

    def _load(self, hf_dir: str) -> None:
        state: dict[str, torch.Tensor] = {}
        for name in sorted(os.listdir(hf_dir)):
            if name.endswith(".safetensors"):
                state.update(load_file(os.path.join(hf_dir, name)))
        own = {k[len(PREFIX):]: v.float() for k, v in state.items()}
        self.load_state_dict(own, strict=True)

    def _tables(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        if s not in self._rope_cache:
            inv = 1.0 / (self.theta ** (torch.arange(0, self.hd, 2, dtype=torch.float32) / self.hd))
            emb = torch.outer(torch.arange(s, dtype=torch.float32), inv).repeat(1, 2)
            self._rope_cache[s] = (emb.cos(), emb.sin())
        return self._rope_cache[s]

    def forward(self, ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``ids [b, s]``, ``attention_mask [b, s]`` bool (True = real token) -> logits ``[b, s, V]``."""
        cos, sin = self._tables(ids.shape[1])
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        x = self.wte(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin, mask)
        return self.ff_out(self.ln_f(x))


def gumbel_argmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """LLaDA's sampling of every position: the argmax of ``exp(logits) / (-log u)^T`` with
    ``u ~ U(0, 1)``, in float64 over the whole ``[b, s, V]`` logits (the argmax at T=0)."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.to(torch.float64)
    noise = torch.rand_like(logits)
    return (logits.exp() / (-torch.log(noise)) ** temperature).argmax(-1)


@torch.no_grad()
def reference_generate(model: Callable[[torch.Tensor], torch.Tensor], prompt: torch.Tensor,
                       steps: int, gen_length: int, block_length: int, mask_id: int,
                       temperature: float = 0.0) -> torch.Tensor:
    """LLaDA's published sampler with low-confidence remasking.

    ``prompt [b, P]`` (no padding) -> full sequences ``[b, P + gen_length]``. Every step runs the
    whole sequence, samples every position (:func:`gumbel_argmax`), takes a full-vocabulary
    softmax of every position for the confidences, and commits the block's most confident masked
    positions (an even share of the block per step).
    """
    b, plen = prompt.shape
    x = torch.full((b, plen + gen_length), mask_id, dtype=torch.long)
    x[:, :plen] = prompt
    per_block = steps // (gen_length // block_length)
    for nb in range(gen_length // block_length):
        end = plen + (nb + 1) * block_length
        masked = (x[:, end - block_length:end] == mask_id).sum(1, keepdim=True)
        counts = (masked // per_block).repeat(1, per_block)
        for j in range(b):
            counts[j, : int(masked[j] % per_block)] += 1
        for i in range(per_block):
            mask_index = x == mask_id
            logits = model(x)
            x0 = gumbel_argmax(logits, temperature)
            p = F.softmax(logits, dim=-1)
            conf = torch.gather(p, -1, x0.unsqueeze(-1)).squeeze(-1)
            conf[:, end:] = -float("inf")
            x0 = torch.where(mask_index, x0, x)
            conf = torch.where(mask_index, conf, torch.full_like(conf, -float("inf")))
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(b):
                transfer[j, torch.topk(conf[j], k=int(counts[j, i])).indices] = True
            x[transfer] = x0[transfer]
    return x


def one_pass_elbo_logprobs(model: HFLLaDA, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           labels: torch.Tensor, score_mask: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs ``[N, S]`` (0 off ``score_mask``) with the graph kept, ESPO-style.

    One forward over every masked sequence computes logits at every position; the cross entropy of
    the scored (masked) positions is taken from them, and one backward follows the loss.
    """
    logits = model(input_ids, attention_mask)
    picked = -F.cross_entropy(logits[score_mask], labels[score_mask], reduction="none")
    out = torch.zeros(labels.shape, dtype=picked.dtype)
    return out.masked_scatter(score_mask, picked)


def same_weights(workdir: str, n_layers: int = 6, d_model: int = 256, n_heads: int = 8,
                 n_kv_heads: int = 2, ffn: int = 768, vocab: int = 4099, max_len: int = 512,
                 seed: int = 0) -> tuple[HFLLaDA, torch.nn.Module, object]:
    """A random HF LLaDA checkpoint in ``workdir``, converted with the project's converter.

    Returns ``(baseline, ours, model_cfg)``: :class:`HFLLaDA` and the TP=1 megatron model (local
    spec, fp32) loaded from the conversion. Needs megatron parallel state initialised (TP=PP=1).
    """
    from rspo_mega.models.llada import build_llada_model, convert_hf_to_mcore, load_model
    from tests.fixtures.hf_llada import TinyLLaDA, write_hf_llada

    geometry = TinyLLaDA(n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads,
                         mlp_hidden_size=ffn, vocab_size=vocab, max_sequence_length=max_len,
                         mask_token_id=vocab - 1, eos_token_id=vocab - 2)
    hf_dir = write_hf_llada(os.path.join(workdir, "hf"), geometry, seed=seed, dtype=torch.float32)
    cfg = convert_hf_to_mcore(hf_dir, os.path.join(workdir, "mcore"), dtype="float32")
    ours = build_llada_model(cfg, init_weights=False)
    load_model(ours, os.path.join(workdir, "mcore"))
    return HFLLaDA(hf_dir).eval(), ours.eval(), cfg
