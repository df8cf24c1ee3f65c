"""Masked-diffusion generation (LLaDA's semi-autoregressive low-confidence remasking sampler).

A prompt is followed by ``gen_length`` mask tokens. The generated span is cut into blocks of
``block_length`` decoded left to right with ``steps / num_blocks`` denoising steps each; a step
runs the model on the whole sequence, samples a token for every masked position (Gumbel-max in
float64 at ``temperature``, argmax at 0), scores it (``low_confidence``: its softmax probability;
``random``: a uniform draw), and commits the most confident masked positions of the current block,
an even share of the block per step (remainder to the first steps). Committed tokens are never
re-masked.

**Prompts of different lengths** are left-padded into one batch with a key-padding mask. The
alternative, bucketing by length, avoids the mask but splits a batch into many small forwards when
prompt lengths vary (GSM8K, MATH), which costs more than the mask; with RoPE's relative positions
the left shift changes nothing but rounding. A batch with no padding passes no mask at all.

**Determinism.** Every random number of a completion is drawn from a generator keyed by
``(seed, uid, step)`` (:func:`rspo_mega.rng.keyed_generator`), for the full true vocabulary of the
current block, so completions do not depend on DP size, batch composition or TP/PP layout.

**Parallel model.** ``logits_fn`` returns vocab-parallel logits on the last pipeline stage and
``None`` elsewhere (see :mod:`rspo_mega.rollout.engine`); sampling and confidences use
:class:`VocabShard` collectives, and ``sync_fn`` hands the committed tokens to every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from rspo_mega.rng import keyed_generator
from rspo_mega.rollout.vocab_parallel import VocabShard, gumbel_max

LogitsFn = Callable[[torch.Tensor, Optional[torch.Tensor]], Optional[torch.Tensor]]
SyncFn = Callable[[torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int, int, int, int], torch.Tensor]  # (uid, step, n_positions, vocab) -> [n, V]
# ``step`` in keys and in NoiseFn is ``block * steps_per_block + step_in_block``.

ROLLOUT_NOISE_STREAM = 0  # key component: Gumbel noise of a step
ROLLOUT_REMASK_STREAM = 1  # key component: random remasking scores of a step


@dataclass(frozen=True)
class SamplerSettings:
    """Generation settings (the ``rollout`` config section plus the model's special ids)."""

    gen_length: int
    block_length: int
    steps: int
    mask_token_id: int
    eos_token_id: int
    vocab_size: int  # true vocabulary
    temperature: float = 0.0
    remasking: str = "low_confidence"  # low_confidence | random
    cfg_scale: float = 0.0
    forbid_eos: bool = False
    stop_on_eos_block: bool = False
    seed: int = 0
    # Opt-in parallel decoding: besides the exact schedule's share, commit every masked token of
    # the block whose confidence exceeds this; blocks then finish in fewer steps.
    threshold: Optional[float] = None

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks


def validate_settings(s: SamplerSettings, max_context: Optional[int] = None, prompt_len: int = 0) -> None:
    """Raise ``ValueError`` naming the setting that makes generation impossible."""
    if s.gen_length < 1 or s.block_length < 1 or s.steps < 1:
        raise ValueError("rollout.gen_length, rollout.block_length and rollout.steps must be >= 1")
    if s.gen_length % s.block_length:
        raise ValueError(
            f"rollout.gen_length={s.gen_length} is not divisible by rollout.block_length={s.block_length}"
        )
    if s.steps % s.num_blocks:
        raise ValueError(
            f"rollout.steps={s.steps} is not divisible by the number of blocks {s.num_blocks}"
        )
    if not 0 <= s.mask_token_id < s.vocab_size:
        raise ValueError(
            f"model.mask_token_id={s.mask_token_id} lies outside the vocabulary [0, {s.vocab_size})"
        )
    if not 0 <= s.eos_token_id < s.vocab_size:
        raise ValueError(
            f"model.eos_token_id={s.eos_token_id} lies outside the vocabulary [0, {s.vocab_size})"
        )
    if s.remasking not in ("low_confidence", "random"):
        raise ValueError(f"rollout.remasking={s.remasking!r} must be 'low_confidence' or 'random'")
    if s.temperature < 0:
        raise ValueError(f"rollout.temperature must be >= 0, got {s.temperature}")
    if s.threshold is not None and not 0 < s.threshold <= 1:
        raise ValueError(f"rollout.confidence_threshold must lie in (0, 1], got {s.threshold}")
    if max_context is not None and prompt_len + s.gen_length > max_context:
        raise ValueError(
            f"prompt length {prompt_len} + rollout.gen_length {s.gen_length} exceeds the model "
            f"context model.max_position_embeddings={max_context}"
        )


@dataclass
class Rollout:
    """Generated completions of one batch (rows in input order)."""

    prompt_ids: torch.Tensor  # [b, P] left-padded with the EOS/pad id
    prompt_lengths: torch.Tensor  # [b] real prompt tokens
    completion_ids: torch.Tensor  # [b, gen_length]
    completion_lengths: torch.Tensor  # [b] tokens up to and including the first EOS
    steps_used: torch.Tensor  # [b] denoising steps that ran for the row
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step


def num_transfer_tokens(masked: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to commit per step ``[b, steps]``: even split of ``masked`` [b], remainder first."""
    base = masked // steps
    rem = masked % steps
    out = base.unsqueeze(1).repeat(1, steps)
    out += (torch.arange(steps, device=masked.device).unsqueeze(0) < rem.unsqueeze(1)).long()
    return out


def keyed_uniforms(seed: int, uid: int, step: int, stream: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Uniforms in [0, 1), float64, keyed by ``(seed, uid, step, stream)``."""
    gen = keyed_generator(seed, uid, step, stream)
    return torch.rand(shape, generator=gen, dtype=torch.float64)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [b, P] left-padded, lengths [b])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must hold at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
    return ids, torch.tensor([len(p) for p in prompts], dtype=torch.long)


def _completion_lengths(gen: torch.Tensor, eos: int) -> torch.Tensor:
    is_eos = gen == eos
    first = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full_like(gen[:, 0], gen.shape[1]))
    return torch.clamp(first + 1, max=gen.shape[1])


@torch.no_grad()
def generate(
    logits_fn: LogitsFn,
    prompts: list[list[int]],
    uids: list[int],
    settings: SamplerSettings,
    shard: Optional[VocabShard] = None,
    sync_fn: Optional[SyncFn] = None,
    noise_fn: Optional[NoiseFn] = None,
    device: Optional[torch.device] = None,
) -> Rollout:
    """Generate one completion per prompt; ``uids`` [b] key the randomness of each row.

    ``logits_fn(x [b, S], key_padding [b, S] | None)`` returns logits ``[b, S, V_local]`` on the
    rank(s) that sample and ``None`` elsewhere; ``sync_fn(x)`` returns the sampling ranks' ``x``
    on every rank (identity when one stage holds everything). ``noise_fn`` overrides the keyed
    uniforms (tests feed a reference the same noise).
    """
    s = settings
    if len(uids) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(uids)} uids")
    prompt_ids, prompt_lengths = left_pad(prompts, s.eos_token_id)
    validate_settings(s, prompt_len=prompt_ids.shape[1])
    shard = shard or VocabShard(0, s.vocab_size, s.vocab_size)
    sync_fn = sync_fn or (lambda x: x)
    device = device or torch.device("cpu")
    b, plen = prompt_ids.shape
    x = torch.cat([prompt_ids, torch.full((b, s.gen_length), s.mask_token_id, dtype=torch.long)], 1)
    x = x.to(device)
    pad_cols = plen - prompt_lengths.to(device)
    key_padding = torch.arange(x.shape[1], device=device).unsqueeze(0) >= pad_cols.unsqueeze(1)
    key_padding = None if bool(key_padding.all()) else key_padding
    prompt_region = torch.zeros_like(x, dtype=torch.bool)
    prompt_region[:, :plen] = True
    active = torch.ones(b, dtype=torch.bool, device=device)
    steps_used = torch.zeros(b, dtype=torch.long, device=device)
    times: list[float] = []

    for block in range(s.num_blocks):
        lo, hi = plen + block * s.block_length, plen + (block + 1) * s.block_length
        schedule = num_transfer_tokens((x[:, lo:hi] == s.mask_token_id).sum(1), s.steps_per_block)
        for i in range(s.steps_per_block):
            # Rows whose block is already decoded (threshold commits finish rows early) skip the
            # model call; every row's randomness is keyed by its uid, so the rest is unchanged.
            # One host copy of the live rows per step decides both.
            live = (x[:, lo:hi] == s.mask_token_id).any(1)
            live_rows = live.cpu().nonzero().squeeze(1).tolist()
            if not live_rows:
                break
            t0 = time.perf_counter()
            step = block * s.steps_per_block + i
            rows = None if len(live_rows) == b else torch.as_tensor(live_rows, device=x.device)
            sub = x if rows is None else x[rows]
            logits = _model_logits(
                logits_fn, sub, key_padding if rows is None or key_padding is None else key_padding[rows],
                prompt_region if rows is None else prompt_region[rows], s)
            if logits is not None:
                sub_uids = uids if rows is None else [uids[r] for r in live_rows]
                k = schedule[:, i] if rows is None else schedule[rows, i]
                sub = _denoise_step(sub, logits[:, lo:hi], lo, k, sub_uids, step, s, shard, noise_fn)
                if rows is None:
                    x = sub
                else:
                    x[rows] = sub
            x = sync_fn(x)
            steps_used += (active & live).long()
            times.append(time.perf_counter() - t0)
        if s.stop_on_eos_block:
            done = (x[:, lo:hi] == s.eos_token_id).all(1) & active
            x[done, hi:] = s.eos_token_id  # LLaDA pads with EOS: the rest of the row is settled
            active &= ~done
            if not bool(active.any()):
                break

    gen = x[:, plen:].cpu()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_lengths=prompt_lengths,
        completion_ids=gen,
        completion_lengths=_completion_lengths(gen, s.eos_token_id),
        steps_used=steps_used.cpu(),
        step_seconds=times,
    )


def _model_logits(
    logits_fn: LogitsFn, x: torch.Tensor, key_padding: Optional[torch.Tensor],
    prompt_region: torch.Tensor, s: SamplerSettings,
) -> Optional[torch.Tensor]:
    """Logits for ``x``; with classifier-free guidance one batched pass of [x; unconditional]."""
    if s.cfg_scale <= 0:
        return logits_fn(x, key_padding)
    uncond = torch.where(prompt_region, torch.full_like(x, s.mask_token_id), x)
    pad = None if key_padding is None else torch.cat([key_padding, key_padding])
    both = logits_fn(torch.cat([x, uncond]), pad)
    if both is None:
        return None
    cond, un = both.chunk(2)
    return un + (s.cfg_scale + 1) * (cond - un)


def _denoise_step(
    x: torch.Tensor, block_logits: torch.Tensor, lo: int, k: torch.Tensor, uids: list[int],
    step: int, s: SamplerSettings, shard: VocabShard, noise_fn: Optional[NoiseFn],
) -> torch.Tensor:
    """Sample the block's masked positions and commit the ``k[row]`` most confident ones."""
    b, n, v_local = block_logits.shape
    logits = block_logits.float().clone()
    if s.forbid_eos:
        shard.forbid(logits, s.eos_token_id)
    flat = logits.reshape(b * n, v_local)
    noise = None
    if s.temperature > 0:
        rows = [
            noise_fn(uid, step, n, s.vocab_size) if noise_fn
            else keyed_uniforms(s.seed, uid, step, ROLLOUT_NOISE_STREAM, (n, s.vocab_size))
            for uid in uids
        ]
        noise = shard.slice_noise(torch.cat(rows)).to(flat.device)
    x0 = gumbel_max(flat, noise, s.temperature, shard).view(b, n)
    if s.remasking == "low_confidence":
        conf = shard.chosen_prob(flat, x0.reshape(-1)).view(b, n)
    else:
        conf = torch.stack([
            keyed_uniforms(s.seed, uid, step, ROLLOUT_REMASK_STREAM, (n,)) for uid in uids
        ]).to(flat.device)
    masked = x[:, lo:lo + n] == s.mask_token_id
    conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
    counts = k.to(masked.device)
    if s.threshold is not None:
        counts = torch.maximum(counts, (masked & (conf > s.threshold)).sum(1))
    counts = torch.minimum(counts, masked.sum(1)).tolist()
    commit = torch.zeros_like(masked)
    for row, kk in enumerate(counts):  # per-row top-k, exactly as the reference sampler
        if kk > 0:
            commit[row, torch.topk(conf[row], kk).indices] = True
    x[:, lo:lo + n] = torch.where(commit, x0, x[:, lo:lo + n])
    return x
