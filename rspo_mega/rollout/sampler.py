"""Masked-diffusion generation (LLaDA's semi-autoregressive low-confidence remasking sampler).

A prompt is followed by ``gen_length`` mask tokens. The generated span is cut into blocks of
``block_length`` decoded left to right with ``steps / num_blocks`` denoising steps each; a step
runs the model on the whole sequence, samples a token for every masked position of the current
block (Gumbel-max in float64 at ``temperature``, argmax at 0), scores it (``low_confidence``: its
softmax probability; ``random``: a uniform draw), and commits the most confident ones, an even
share of the block per step (remainder to the first steps). Committed tokens are never re-masked.

**Work per step.** The model's output layer runs only on the block's still-masked positions
(``logits_fn`` gets them as ``positions [b, m]``, masked first, ``m`` the most any row has left);
sampling and confidences are computed there only. In exact mode the commit counts are known on
the host from the block's schedule, so a step needs no device-to-host copy; threshold mode
copies the ``[b]`` commit counts once per step.

**Block KV cache** (``cache``: ``prefix`` | ``dual``; :mod:`rspo_mega.models.llada.kv_cache`).
A block's first step runs the whole sequence and writes every position's K/V; its later steps run
the block and the suffix (``prefix``) or the block alone (``dual``), attending to the cached K/V
of the other columns. Cached K/V go stale as tokens are committed elsewhere, so the cache is an
approximation; ``cache_check_rate`` re-runs that share of cached steps exactly and counts the
commits that differ (:class:`CacheCheck`). The unconditional rows of guidance have their own
cache rows; rows that leave the batch keep theirs.

**Prompts of different lengths** are left-padded into one batch with a key-padding mask. The
alternative, bucketing by length, avoids the mask but splits a batch into many small forwards when
prompt lengths vary (GSM8K, MATH), which costs more than the mask; with RoPE's relative positions
the left shift changes nothing but rounding. A batch with no padding passes no mask at all.

**Determinism.** Every random number of a completion is drawn from a generator keyed by
``(seed, uid, step)`` (:func:`rspo_mega.rng.keyed_generator`), for the full true vocabulary of the
current block, so completions do not depend on DP size, batch composition or TP/PP layout.

**Trajectory record** (``record_trajectory=True``): per generated position the step that
committed it and its log-probability and entropy under the rollout policy at that step
(:mod:`rspo_mega.rollout.trajectory_record`), in every mode (exact, threshold, cached).

**Parallel model.** ``logits_fn`` returns vocab-parallel logits on the last pipeline stage and
``None`` elsewhere (see :mod:`rspo_mega.rollout.engine`); sampling and confidences use
:class:`VocabShard` collectives, and ``sync_fn`` hands the committed tokens to every stage.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Optional

import torch

from rspo_mega.config.schema import Remasking, RolloutConfig, choices
from rspo_mega.config.validate import check_schedule
from rspo_mega.rng import keyed_generator
from rspo_mega.rollout.trajectory_record import Trajectory, TrajectoryRecorder
from rspo_mega.rollout.vocab_parallel import VocabShard, gumbel_max


@dataclass(frozen=True)
class CacheStep:
    """A forward through the block KV cache: the batch rows' cache rows and the first column run.

    ``lo == 0`` with the whole sequence is a refresh (every position's K/V written).
    """

    rows: list[int]
    lo: int


# (x [b, L], key_padding [b, S] | None, positions [b, m] into x's L columns, cache step | None)
# -> logits [b, m, V_local] | None. Without a cache step x is the whole sequence (L = S).
LogitsFn = Callable[[torch.Tensor, Optional[torch.Tensor], torch.Tensor, Optional[CacheStep]],
                    Optional[torch.Tensor]]
SyncFn = Callable[[torch.Tensor], torch.Tensor]
NoiseFn = Callable[[int, int, int, int], torch.Tensor]  # (uid, step, n_positions, vocab) -> [n, V]
# ``step`` in keys and in NoiseFn is ``block * steps_per_block + step_in_block``.

ROLLOUT_NOISE_STREAM = 0  # key component: Gumbel noise of a step
ROLLOUT_REMASK_STREAM = 1  # key component: random remasking scores of a step


@dataclass(frozen=True)
class SamplerSettings:
    """What one generation runs with: the ``rollout`` config section (schedule, temperature,
    remasking, guidance, threshold, cache) plus what the run adds."""

    rollout: RolloutConfig
    mask_token_id: int
    eos_token_id: int
    vocab_size: int  # true vocabulary
    seed: int = 0
    prompt_multiple: int = 1  # prompt columns padded to a multiple (parallel.sequence_multiple)

    @property
    def num_blocks(self) -> int:
        return self.rollout.gen_length // self.rollout.block_length

    @property
    def steps_per_block(self) -> int:
        return self.rollout.steps // self.num_blocks

    def replace(self, **overrides: Any) -> "SamplerSettings":
        """These settings with ``overrides``: fields of this class or of ``RolloutConfig``."""
        own = {k: overrides.pop(k) for k in list(overrides) if k in _OWN_FIELDS}
        return replace(self, rollout=replace(self.rollout, **overrides), **own)


_OWN_FIELDS = {f.name for f in fields(SamplerSettings)} - {"rollout"}


@dataclass
class Rollout:
    """Generated completions of one batch (rows in input order)."""

    prompt_ids: torch.Tensor  # [b, P] left-padded with the EOS/pad id
    prompt_lengths: torch.Tensor  # [b] real prompt tokens
    completion_ids: torch.Tensor  # [b, gen_length]
    completion_lengths: torch.Tensor  # [b] tokens up to and including the first EOS
    steps_used: torch.Tensor  # [b] denoising steps that ran for the row
    step_seconds: list[float] = field(default_factory=list)  # wall time of each step
    cache_check: "CacheCheck" = field(default_factory=lambda: CacheCheck())
    trajectory: Optional[Trajectory] = None  # with record_trajectory=True


@dataclass
class CacheCheck:
    """Cached steps re-run exactly (``cache_check_rate``): how often the cache changed a commit.

    Only the sampling ranks (last pipeline stage) count; elsewhere the counts stay 0.
    """

    steps: int = 0  # cached steps checked
    committed: int = 0  # tokens those steps committed
    mismatched: int = 0  # of them, tokens the exact step samples differently
    confidence_diff: float = 0.0  # sum over them of |confidence cached - confidence exact|
    confident: int = 0  # of the committed tokens, those above the confidence threshold
    confident_mismatched: int = 0  # of them, tokens the exact step samples differently

    def add(self, commit: torch.Tensor, x0: torch.Tensor, conf: torch.Tensor,
            exact_x0: torch.Tensor, exact_conf: torch.Tensor, threshold: Optional[float]) -> None:
        """Count one checked step: ``commit [b, m]`` of the cached step, both steps' draws and
        the step's confidence threshold (None: no threshold decoding)."""
        differ = commit & (x0 != exact_x0)
        confident = commit & (conf > threshold) if threshold is not None else \
            torch.zeros_like(commit)
        stats = torch.stack([commit.sum(), differ.sum(),
                             torch.where(commit, (conf - exact_conf).abs(), 0.0).sum(),
                             confident.sum(), (confident & differ).sum()]).tolist()
        self.steps += 1
        self.committed += int(stats[0])
        self.mismatched += int(stats[1])
        self.confidence_diff += float(stats[2])
        self.confident += int(stats[3])
        self.confident_mismatched += int(stats[4])

    def counts(self) -> list[float]:
        """The counts in field order (for collectives)."""
        return [self.steps, self.committed, self.mismatched, self.confidence_diff,
                self.confident, self.confident_mismatched]

    @classmethod
    def from_counts(cls, counts: list[float]) -> "CacheCheck":
        steps, committed, mismatched, diff, confident, confident_mismatched = counts
        return cls(int(steps), int(committed), int(mismatched), diff, int(confident),
                   int(confident_mismatched))


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


def left_pad(prompts: list[list[int]], pad_id: int,
             multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids [b, P] left-padded, lengths [b]); ``P`` is the longest prompt rounded
    up to a multiple of ``multiple`` (sequence parallelism splits the sequence over TP ranks)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt must hold at least one token")
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
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
    record_trajectory: bool = False,
) -> Rollout:
    """Generate one completion per prompt; ``uids`` [b] key the randomness of each row.

    ``logits_fn(x [b, L], key_padding [b, S] | None, positions [b, m], cache)`` returns the
    logits at ``positions`` (columns of the ``x`` given) ``[b, m, V_local]`` on the rank(s) that
    sample and ``None`` elsewhere; ``cache`` is None (``x`` is the whole sequence) or the
    :class:`CacheStep` whose rows and first column ``x`` holds (the caller owns the cache);
    ``sync_fn(x)`` returns the sampling ranks' ``x`` on every rank (identity when one stage
    holds everything). ``noise_fn`` overrides the keyed uniforms (tests feed a reference the
    same noise). ``record_trajectory`` adds the :class:`Trajectory` of every row.
    """
    s = settings
    if len(uids) != len(prompts):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(uids)} uids")
    prompt_ids, prompt_lengths = left_pad(prompts, s.eos_token_id, s.prompt_multiple)
    check_schedule(s.rollout.gen_length, s.rollout.block_length, s.rollout.steps)
    state = _State.start(prompt_ids, prompt_lengths, s, shard, sync_fn, device)
    if record_trajectory:
        state.record = TrajectoryRecorder(len(prompts), s.rollout.gen_length, state.x.device)
    for block in range(s.num_blocks):
        state.run_block(logits_fn, block, uids, noise_fn)
        if s.rollout.stop_on_eos_block and state.stop_finished_rows(block):
            break
    gen = state.x[:, state.plen:].cpu()
    return Rollout(
        prompt_ids=prompt_ids,
        prompt_lengths=prompt_lengths,
        completion_ids=gen,
        completion_lengths=_completion_lengths(gen, s.eos_token_id),
        steps_used=torch.tensor(state.steps_used, dtype=torch.long),
        step_seconds=state.times,
        cache_check=state.check,
        trajectory=None if state.record is None else state.record.finish(state.steps_used),
    )


@dataclass
class _State:
    """The sequences being denoised and the host-side bookkeeping of one ``generate`` call."""

    x: torch.Tensor  # [b, S] prompt + completion (mask ids where undecided)
    key_padding: Optional[torch.Tensor]  # [b, S] True = real token; None without padding
    prompt_region: torch.Tensor  # [b, S] True on the (padded) prompt columns
    plen: int
    s: SamplerSettings
    shard: VocabShard
    sync_fn: SyncFn
    steps_used: list[int]
    times: list[float] = field(default_factory=list)
    cached_steps: int = 0  # steps run through the cache so far (schedules the checks)
    check: CacheCheck = field(default_factory=CacheCheck)
    record: Optional[TrajectoryRecorder] = None

    @classmethod
    def start(cls, prompt_ids: torch.Tensor, prompt_lengths: torch.Tensor, s: SamplerSettings,
              shard: Optional[VocabShard], sync_fn: Optional[SyncFn],
              device: Optional[torch.device]) -> "_State":
        device = device or torch.device("cpu")
        b, plen = prompt_ids.shape
        masks = torch.full((b, s.rollout.gen_length), s.mask_token_id, dtype=torch.long)
        x = torch.cat([prompt_ids, masks], 1).to(device)
        pad_cols = plen - prompt_lengths.to(device)
        key_padding = torch.arange(x.shape[1], device=device).unsqueeze(0) >= pad_cols.unsqueeze(1)
        prompt_region = torch.zeros_like(x, dtype=torch.bool)
        prompt_region[:, :plen] = True
        return cls(x, None if bool((prompt_lengths == plen).all()) else key_padding, prompt_region,
                   plen, s, shard or VocabShard(0, s.vocab_size, s.vocab_size),
                   sync_fn or (lambda t: t), [0] * b)

    def run_block(self, logits_fn: LogitsFn, block: int, uids: list[int],
                  noise_fn: Optional[NoiseFn]) -> None:
        """All denoising steps of ``block``; rows whose block is decoded leave the model calls."""
        s = self.s
        lo = self.plen + block * s.rollout.block_length
        left = self.block_masked(lo).sum(1)  # [b] masked positions of the block, per row
        schedule = num_transfer_tokens(left, s.steps_per_block).tolist()  # host [b][steps]
        remaining = left.tolist()
        refresh_every = s.rollout.cache_refresh_interval or s.steps_per_block
        for i in range(s.steps_per_block):
            live = [r for r, n in enumerate(remaining) if n > 0]
            if not live:
                break
            t0 = time.perf_counter()
            step = block * s.steps_per_block + i
            before = None if self.record is None else self.block_masked(lo)
            counts = self.step(logits_fn, lo, live, [schedule[r][i] for r in live],
                               [remaining[r] for r in live], [uids[r] for r in live], step,
                               i % refresh_every == 0, noise_fn)
            self.x = self.sync_fn(self.x)
            if before is not None:  # every stage reads the step's commits off the tokens
                self.record.commits(before & ~self.block_masked(lo), lo - self.plen,
                                    torch.as_tensor(self.steps_used))
            if counts is None:  # a stage that does not sample: read the commits off the tokens
                remaining = self.block_masked(lo).sum(1).tolist()
            else:
                for r, c in zip(live, counts):
                    remaining[r] -= c
            for r in live:
                self.steps_used[r] += 1
            self.times.append(time.perf_counter() - t0)

    def block_masked(self, lo: int) -> torch.Tensor:
        """``[b, block_length]`` True where the block starting at column ``lo`` is still masked."""
        return self.x[:, lo:lo + self.s.rollout.block_length] == self.s.mask_token_id

    def step(self, logits_fn: LogitsFn, lo: int, live: list[int], k: list[int],
             remaining: list[int], uids: list[int], step: int, refresh: bool,
             noise_fn: Optional[NoiseFn]) -> Optional[list[int]]:
        """One denoising step of the ``live`` rows; their committed counts (host), None if not sampled here.

        ``k``: the schedule's commits per live row; ``remaining``: their masked positions left;
        ``refresh``: with a cache, this step runs the full forward that refreshes it (a block's
        first step, and every ``cache_refresh_interval``-th one).
        """
        b = self.x.shape[0]
        rows = None if len(live) == b else torch.as_tensor(live, device=self.x.device)
        x = self.x if rows is None else self.x[rows]
        m = max(remaining)
        # block offsets of each row's masked positions, ascending, masked ones first
        masked = x[:, lo:lo + self.s.rollout.block_length] == self.s.mask_token_id
        offsets = torch.sort((~masked).to(torch.int8), dim=1, stable=True).indices[:, :m]
        valid = torch.arange(m, device=x.device)[None, :] < torch.as_tensor(
            remaining, device=x.device)[:, None]
        pad = self.key_padding if self.key_padding is None or rows is None else self.key_padding[rows]
        region = self.prompt_region if rows is None else self.prompt_region[rows]
        cols, cache = self.span(lo, live, refresh)
        logits = _model_logits(logits_fn, x, pad, region, lo + offsets, self.s, cols, cache)
        exact = None
        if self.check_due(cache):
            exact = _model_logits(logits_fn, x, pad, region, lo + offsets, self.s,
                                  slice(0, x.shape[1]), None)
        if logits is None:
            return None
        draw = lambda lg, score: _denoise_step(lg, offsets, valid, k, remaining,  # noqa: E731
                                               uids, step, self.s, self.shard, noise_fn, score)
        commit, x0, conf, counts, scores = draw(logits, self.record is not None)
        if scores is not None:
            self.record.draws(rows, lo - self.plen + offsets, commit, *scores)
        if exact is not None:
            _, exact_x0, exact_conf, _, _ = draw(exact, False)
            self.check.add(commit, x0, conf, exact_x0, exact_conf,
                           self.s.rollout.confidence_threshold)
        block = x[:, lo:lo + self.s.rollout.block_length]
        block.scatter_(1, offsets, torch.where(commit, x0, block.gather(1, offsets)))
        if rows is not None:
            self.x[rows] = x
        return counts

    def span(self, lo: int, live: list[int], refresh: bool) -> tuple[slice, Optional[CacheStep]]:
        """Columns the step runs and its cache step (None without a cache).

        A refresh step runs everything and rewrites the cache; the others run the block
        and the suffix (``prefix``) or the block only (``dual``). With guidance the
        unconditional copy of row ``r`` has cache row ``b + r``.
        """
        ro, seq = self.s.rollout, self.x.shape[1]
        if ro.cache == "none":
            return slice(0, seq), None
        start, end = (0, seq) if refresh else (lo, seq if ro.cache == "prefix" else lo + ro.block_length)
        rows = live + [self.x.shape[0] + r for r in live] if ro.cfg_scale > 0 else live
        return slice(start, end), CacheStep(rows, start)

    def check_due(self, cache: Optional[CacheStep]) -> bool:
        """Whether this cached step is also run exactly: an even ``cache_check_rate`` share."""
        if cache is None or cache.lo == 0:
            return False
        n, rate = self.cached_steps, self.s.rollout.cache_check_rate
        self.cached_steps += 1
        return int((n + 1) * rate) > int(n * rate)

    def stop_finished_rows(self, block: int) -> bool:
        """EOS-filled blocks settle the rest of their row (LLaDA pads with EOS); True when all are."""
        lo = self.plen + block * self.s.rollout.block_length
        hi = lo + self.s.rollout.block_length
        done = (self.x[:, lo:hi] == self.s.eos_token_id).all(1)
        self.x[done, hi:] = self.s.eos_token_id
        return bool((self.x[:, hi:] == self.s.eos_token_id).all())


def _model_logits(
    logits_fn: LogitsFn, x: torch.Tensor, key_padding: Optional[torch.Tensor],
    prompt_region: torch.Tensor, positions: torch.Tensor, s: SamplerSettings, cols: slice,
    cache: Optional[CacheStep],
) -> Optional[torch.Tensor]:
    """Logits at columns ``positions [b, m]`` of ``x [b, S]``, running the columns ``cols``;
    with classifier-free guidance one batched pass of [x; unconditional]."""
    at = positions - cols.start
    if s.rollout.cfg_scale <= 0:
        return logits_fn(x[:, cols], key_padding, at, cache)
    uncond = torch.where(prompt_region, torch.full_like(x, s.mask_token_id), x)
    pad = None if key_padding is None else torch.cat([key_padding, key_padding])
    both = logits_fn(torch.cat([x[:, cols], uncond[:, cols]]), pad, torch.cat([at, at]), cache)
    if both is None:
        return None
    cond, un = both.chunk(2)
    return un + (s.rollout.cfg_scale + 1) * (cond - un)


def _block_draws(rows: list[torch.Tensor], offsets: torch.Tensor) -> torch.Tensor:
    """Per-row draws for the whole block ``[block_length, ...]`` -> ``[b, m, ...]`` at ``offsets``.

    The draws move to the offsets' device and are gathered there (no device-to-host copy).
    """
    draws = torch.stack(rows).to(offsets.device)
    index = offsets.reshape(offsets.shape + (1,) * (draws.dim() - 2)).expand(
        offsets.shape + draws.shape[2:])
    return draws.gather(1, index)


def _denoise_step(
    logits: torch.Tensor, offsets: torch.Tensor, valid: torch.Tensor, k: list[int],
    remaining: list[int], uids: list[int], step: int, s: SamplerSettings, shard: VocabShard,
    noise_fn: Optional[NoiseFn], score: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int],
           Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Sample the block's masked positions and pick the ``k[row]`` most confident ones.

    ``logits [b, m, V_local]`` at the block ``offsets [b, m]`` (``valid``: the real entries).
    Returns ``(commit [b, m] bool, x0 [b, m], confidence [b, m], counts, scores)``, ``counts``
    the commits per row (host; in threshold mode copied from the device, the step's one
    device-to-host copy); ``scores``: with ``score``, the rollout policy's log-prob of ``x0``
    and its entropy ``[b, m]`` (float64), else None.
    """
    b, m, _ = logits.shape
    flat, x0, top = _sample_x0(logits, offsets, uids, step, s, shard, noise_fn)
    scores = None
    if score:
        scores = tuple(t.view(b, m) for t in shard.log_prob_entropy(flat, x0.reshape(-1),
                                                                     s.rollout.temperature))
    conf = _confidence(flat, x0, top, offsets, valid, uids, step, s, shard)
    commit, counts = _commit_top(conf, valid, k, remaining, s)
    return commit, x0, conf, counts, scores


def _sample_x0(
    logits: torch.Tensor, offsets: torch.Tensor, uids: list[int], step: int, s: SamplerSettings,
    shard: VocabShard, noise_fn: Optional[NoiseFn],
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """``(flat logits [b*m, V_local], x0 [b, m], top)``: a Gumbel-max draw at every block
    position, keyed by (uid, step) (``noise_fn`` replaces the keyed uniforms); EOS forbidden if
    set. At temperature 0, x0 is the argmax and ``top [b*m]`` its logit (the row max, which the
    confidence reuses); else ``top`` is None."""
    b, m, v_local = logits.shape
    if s.rollout.forbid_eos:
        shard.forbid(logits, s.eos_token_id)
    flat = logits.reshape(b * m, v_local)
    if s.rollout.temperature == 0:
        top, x0 = shard.max_and_argmax(flat)
        return flat, x0.view(b, m), top
    block = s.rollout.block_length
    draws = [noise_fn(uid, step, block, s.vocab_size) if noise_fn else
             keyed_uniforms(s.seed, uid, step, ROLLOUT_NOISE_STREAM, (block, s.vocab_size))
             for uid in uids]
    noise = shard.slice_noise(_block_draws(draws, offsets).reshape(b * m, -1))
    return flat, gumbel_max(flat, noise, s.rollout.temperature, shard).view(b, m), None


def _confidence(
    flat: torch.Tensor, x0: torch.Tensor, top: Optional[torch.Tensor], offsets: torch.Tensor,
    valid: torch.Tensor, uids: list[int], step: int, s: SamplerSettings, shard: VocabShard,
) -> torch.Tensor:
    """The remasking confidence ``[b, m]`` of ``x0`` (``-inf`` outside ``valid``): its
    probability (``low_confidence``; from the row max ``top`` when x0 is the argmax) or a keyed
    uniform (``random``)."""
    if s.rollout.remasking == "low_confidence":
        prob = shard.chosen_prob(flat, x0.reshape(-1)) if top is None else shard.top_prob(flat, top)
        conf = prob.view(x0.shape)
    elif s.rollout.remasking == "random":
        draws = [keyed_uniforms(s.seed, uid, step, ROLLOUT_REMASK_STREAM, (s.rollout.block_length,))
                 for uid in uids]
        conf = _block_draws(draws, offsets)
    else:
        raise ValueError(f"rollout.remasking={s.rollout.remasking!r}: expected one of "
                         f"{choices(Remasking)}")
    return torch.where(valid, conf, torch.full_like(conf, float("-inf")))


def _commit_top(
    conf: torch.Tensor, valid: torch.Tensor, k: list[int], remaining: list[int],
    s: SamplerSettings,
) -> tuple[torch.Tensor, list[int]]:
    """``(commit [b, m] bool, counts)``: each row's ``counts[row]`` most confident positions;
    ``counts`` is ``min(k, remaining)``, or in threshold mode at least ``k`` and every valid
    position above the threshold (copied from the device)."""
    if s.rollout.confidence_threshold is None:
        counts = [min(kk, n) for kk, n in zip(k, remaining)]
    else:
        above = (valid & (conf > s.rollout.confidence_threshold)).sum(1)
        k_dev = torch.as_tensor(k, device=conf.device)
        counts = torch.minimum(torch.maximum(k_dev, above), valid.sum(1)).tolist()
    commit = torch.zeros_like(valid)
    for row, kk in enumerate(counts):  # per-row top-k, exactly as the reference sampler
        if kk > 0:
            commit[row, torch.topk(conf[row], kk).indices] = True
    return commit, counts
