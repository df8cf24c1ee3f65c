"""The one mask RNG: Monte-Carlo masks for masked-diffusion ELBO estimation.

A mask is a pure function of ``(run seed, iteration, mask key, MC index)``: each key gets its
own CPU ``torch.Generator`` from :func:`rspo_mega.rng.keyed_generator` (a SplitMix64 chain, stable
across processes, platforms and Python's hash salting). Nothing depends on the rank, the
micro-batch, the data-parallel size, the global torch RNG state or the resume point, so the policy,
the reference and the old policy see the same masks whenever they are asked for the same key.

Schemes (``likelihood.mask_scheme``), with L counted completion positions and K samples:

* ``bernoulli``: ``t ~ U(eps, 1)``, each counted position masked with probability t, weight 1/t.
  With ``eps > 0`` this is the usual MDLM/LLaDA truncation, biased by O(eps); ``eps = 0`` is exact.
* ``stratified``: one uniform integer offset ``u ~ U{0..L-1}`` per completion (MC index -1 of the
  key), counts ``l_k = ((u + floor(k*L/K)) mod L) + 1``, a uniformly random subset of l_k
  positions, weight L/l_k. Each l_k is marginally uniform on {1..L}, so every sample is unbiased.
  (LLaDA's reference code rounds ``linspace`` with round-half-even, which makes the counts
  non-uniform for some (L, K); the integer offset here avoids that.)
* ``coupled`` (default): per sample ``l ~ U{0..L}``, a random subset of l positions and its
  complement, weights ``(L+1)/l`` and ``(L+1)/(L-l)``, each halved because the pair is averaged;
  an empty half has weight 0. ``mc_samples`` counts *pairs*, so K pairs = 2K sequences.
* ``one_step`` (diffu-GRPO baseline, biased): all counted positions masked, weight 1, and every
  real prompt token masked with probability ``one_step_prompt_mask_prob`` from the same key.

``mask_sharing``: the mask key is the completion's uid (``completion``: every completion draws
its own masks) or its prompt's global group index (``group``: the G completions of a prompt see the
same masks, common random numbers). Each ELBO estimate stays unbiased either way; sharing makes the
estimates of one group correlated, so in the advantage-weighted sum (advantages sum to 0 within a
group) the mask noise on the tokens the completions have in common largely cancels.

``count_positions``: ``generated`` counts the whole generated span (EOS padding included, as LLaDA
SFT and ESPO do); ``until_eos`` counts positions up to and including the first EOS, and hides the
positions after it from attention (the scored object is then the completion truncated at EOS).
"""

from __future__ import annotations

import abc
import logging
from typing import Any

import torch

from rspo_mega.config.schema import (
    CountPositions, LikelihoodConfig, MaskedSequenceScheme, choices, units_per_sample,
)
from rspo_mega.likelihood.batch_types import CompletionBatch, MaskedBatch
from rspo_mega.rng import hash64, keyed_generator  # noqa: F401  (hash64 re-exported)

log = logging.getLogger(__name__)

COMPLETION_STREAM = -1  # MC index of the per-completion stream (stratified offset)
GROUP_KEY_TAG = 0x67726F7570  # mask keys of shared group masks: hash64(tag, group id)


def mask_generator(seed: int, iteration: int, uid: int, mc_index: int,
                   update: int = 0) -> torch.Generator:
    """A fresh CPU generator for one mask key; same key -> same stream, on every rank.

    ``update`` > 0 keys the masks of inner update ``update`` (``likelihood.fresh_masks_per_update``);
    update 0 keeps the four-part key, so its masks do not depend on that setting.
    """
    if update:
        return keyed_generator(seed, iteration, uid, mc_index, update)
    return keyed_generator(seed, iteration, uid, mc_index)


# --- one MC sample from its resolved randomness (pure; the enumeration tests call these) -------

Unit = tuple[torch.Tensor, float]  # (mask over the L counted positions [L] bool, weight)


def exact_count_unit(length: int, count: int, order: torch.Tensor) -> Unit:
    """Mask the first ``count`` positions of permutation ``order``; weight L/count."""
    mask = torch.zeros(length, dtype=torch.bool)
    mask[order[:count]] = True
    return mask, length / count


def coupled_units(length: int, count: int, order: torch.Tensor) -> list[Unit]:
    """A mask of ``count`` positions and its complement, weights (L+1)/(2l) and (L+1)/(2(L-l))."""
    mask = torch.zeros(length, dtype=torch.bool)
    mask[order[:count]] = True
    w1 = (length + 1) / (2 * count) if count > 0 else 0.0
    w2 = (length + 1) / (2 * (length - count)) if count < length else 0.0
    return [(mask, w1), (~mask, w2)]


def bernoulli_unit(t: float, uniforms: torch.Tensor) -> Unit:
    """Mask positions whose uniform is below t; weight 1/t (0 if nothing is masked)."""
    mask = uniforms < t
    return mask, (1.0 / t if bool(mask.any()) else 0.0)


def stratified_counts(length: int, num_mc: int, offset: int) -> list[int]:
    """Evenly spaced exact counts in {1..L}, shifted by an integer offset in {0..L-1}."""
    return [((offset + (k * length) // num_mc) % length) + 1 for k in range(num_mc)]


def _sample_units(
    cfg: LikelihoodConfig, length: int, gen: torch.Generator, stratified_l: int
) -> list[Unit]:
    scheme = cfg.mask_scheme
    if scheme == "coupled":
        count = int(torch.randint(0, length + 1, (1,), generator=gen))
        return coupled_units(length, count, torch.randperm(length, generator=gen))
    if scheme == "stratified":
        return [exact_count_unit(length, stratified_l, torch.randperm(length, generator=gen))]
    if scheme == "bernoulli":
        eps = cfg.bernoulli_eps
        t = eps + (1.0 - eps) * float(torch.rand((), dtype=torch.float64, generator=gen))
        return [bernoulli_unit(t, torch.rand(length, dtype=torch.float64, generator=gen))]
    if scheme == "one_step":
        return [(torch.ones(length, dtype=torch.bool), 1.0)]
    raise ValueError(f"likelihood.mask_scheme={scheme!r}: the mask sampler draws one of "
                     f"{choices(MaskedSequenceScheme)} (trajectory: TrajectorySampler)")


def count_mask(batch: CompletionBatch, count_positions: str, eos_token_id: int) -> torch.Tensor:
    """Positions that count toward L, ``[B, S]`` bool (see the module docstring)."""
    gen = batch.completion_mask & batch.attention_mask
    if count_positions == "generated":
        return gen
    if count_positions != "until_eos":
        raise ValueError(f"likelihood.count_positions={count_positions!r}: expected one of "
                         f"{choices(CountPositions)}")
    is_eos = gen & (batch.input_ids == eos_token_id)
    eos_before = torch.cumsum(is_eos.long(), dim=1) - is_eos.long()  # EOS strictly before t
    return gen & (eos_before == 0)


class KeyedDrawSampler(abc.ABC):
    """What the step samplers share: the run seed and token ids, draws keyed by (seed, iteration,
    uid, ...), and a ``state_dict`` of the settings that shape the stream. A resume keeps the
    seed and warns when one of them changed (the draws from then on differ from the original
    run's)."""

    kind = "draw"  # names the stream in messages

    def __init__(self, cfg: LikelihoodConfig, seed: int, mask_token_id: int, eos_token_id: int):
        self.cfg = cfg
        self.seed = int(seed)
        self.mask_token_id = int(mask_token_id)
        self.eos_token_id = int(eos_token_id)

    @abc.abstractmethod
    def sample(self, batch: CompletionBatch, iteration: int, update: int = 0) -> MaskedBatch:
        """The masked batch of ``batch`` for ``(iteration, update)``, a pure function of the key."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The seed, the settings that shape the stream and the hash's name."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("hash") != "splitmix64-v1":
            raise ValueError(f"{self.kind} sampler state uses an unknown hash "
                             f"{state.get('hash')!r}")
        mine = self.state_dict()
        changed = [f"likelihood.{k}: {state[k]!r} -> {mine[k]!r}" for k in mine
                   if k not in ("seed", "hash") and k in state and state[k] != mine[k]]
        if changed:
            log.warning("resumed with a different %s stream (%s)", self.kind, ", ".join(changed))
        self.seed = int(state["seed"])


class MaskSampler(KeyedDrawSampler):
    """Builds the :class:`MaskedBatch` of a rollout step; stateless apart from the run seed.

    ``sample(batch, iteration)`` is deterministic in (seed, iteration, uids, config). The
    ``state_dict`` records the seed and the settings that shape the stream; a resume keeps the
    seed and warns when a setting changed (the masks from then on differ from the original run's).
    """

    kind = "mask"

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "mask_scheme": self.cfg.mask_scheme,
                "mask_sharing": self.cfg.mask_sharing,
                "mc_samples": self.cfg.mc_samples,
                "fresh_masks_per_update": self.cfg.fresh_masks_per_update, "hash": "splitmix64-v1"}

    def mask_key(self, batch: CompletionBatch, row: int) -> int:
        """The key of completion ``row``'s masks: its uid, or its group's (``mask_sharing``)."""
        if self.cfg.mask_sharing == "group":
            return hash64(GROUP_KEY_TAG, int(batch.group_ids[row]))
        return int(batch.uids[row])

    def sample(self, batch: CompletionBatch, iteration: int, update: int = 0) -> MaskedBatch:
        """K x U masked copies of every completion of ``batch`` (on ``batch``'s device); ``update``
        selects another independent draw for the same step (see :func:`mask_generator`)."""
        cfg = self.cfg
        device = batch.input_ids.device
        counted, lengths = self._scored_positions(batch)
        ids = batch.input_ids.cpu()
        attn = batch.attention_mask.cpu()
        if cfg.count_positions == "until_eos":
            attn = attn & ~(batch.completion_mask.cpu() & ~counted)
        prompt = attn & ~batch.completion_mask.cpu()
        copies = cfg.mc_samples * units_per_sample(cfg.mask_scheme)
        b_num, s_len = ids.shape
        out_ids = ids.repeat_interleave(copies, dim=0)
        weights = torch.zeros(b_num * copies, s_len, dtype=torch.float32)
        score = torch.zeros(b_num * copies, s_len, dtype=torch.bool)
        for b in range(b_num):
            key, length = self.mask_key(batch, b), int(lengths[b])
            self._mask_completion(b, key, length, counted[b], prompt[b], iteration, update,
                                  out_ids, score, weights)
        return self._masked_batch(ids, attn, out_ids, weights, score, lengths, counted).to(device)

    def _scored_positions(self, batch: CompletionBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """(count mask [B, S] bool on CPU, its per-row lengths [B]); every row needs a position."""
        cfg = self.cfg
        counted = count_mask(batch, cfg.count_positions, self.eos_token_id).cpu()
        lengths = counted.sum(dim=1)
        empty = (lengths == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"completion(s) {empty.tolist()} (uids {batch.uids[empty].tolist()}) have no "
                f"positions to score under likelihood.count_positions={cfg.count_positions!r}"
            )
        return counted, lengths

    def _mask_completion(
        self,
        b: int,
        key: int,
        length: int,
        counted_row: torch.Tensor,
        prompt_row: torch.Tensor,
        iteration: int,
        update: int,
        out_ids: torch.Tensor,
        score: torch.Tensor,
        weights: torch.Tensor,
    ) -> None:
        """Write completion ``b``'s K x U masked copies into rows ``b*K*U ..`` of ``out_ids``,
        ``score`` and ``weights`` ([B*K*U, S]); ``counted_row`` and ``prompt_row`` are [S] bool."""
        cfg = self.cfg
        k_num, u_num = cfg.mc_samples, units_per_sample(cfg.mask_scheme)
        pos = counted_row.nonzero().flatten()
        offset = 0
        if cfg.mask_scheme == "stratified":
            g0 = mask_generator(self.seed, iteration, key, COMPLETION_STREAM, update)
            offset = int(torch.randint(0, length, (1,), generator=g0))
        strat = stratified_counts(length, k_num, offset)
        for k in range(k_num):
            gen = mask_generator(self.seed, iteration, key, k, update)
            units = _sample_units(cfg, length, gen, strat[k])
            for u, (mask, w) in enumerate(units):
                row = (b * k_num + k) * u_num + u
                sel = pos[mask]
                out_ids[row, sel] = self.mask_token_id
                score[row, sel] = True
                weights[row, sel] = float(w)
            if cfg.mask_scheme == "one_step" and cfg.one_step_prompt_mask_prob > 0:
                pmask = prompt_row & (torch.rand(out_ids.shape[1], generator=gen)
                                      < cfg.one_step_prompt_mask_prob)
                out_ids[(b * k_num + k) * u_num, pmask] = self.mask_token_id

    def _masked_batch(
        self,
        ids: torch.Tensor,
        attn: torch.Tensor,
        out_ids: torch.Tensor,
        weights: torch.Tensor,
        score: torch.Tensor,
        lengths: torch.Tensor,
        counted: torch.Tensor,
    ) -> MaskedBatch:
        """The :class:`MaskedBatch` (on CPU) of the filled [B*K*U, S] planes; ``ids``, ``attn``
        are the [B, S] originals, each repeated K*U times."""
        k_num, u_num = self.cfg.mc_samples, units_per_sample(self.cfg.mask_scheme)
        rows = torch.arange(out_ids.shape[0])
        return MaskedBatch(
            input_ids=out_ids,
            attention_mask=attn.repeat_interleave(k_num * u_num, dim=0),
            labels=ids.repeat_interleave(k_num * u_num, dim=0),
            weights=weights,
            score_mask=score,
            completion_index=rows // (k_num * u_num),
            mc_index=(rows // u_num) % k_num,
            lengths=lengths,
            count_mask=counted,
            num_mc=k_num,
            units_per_sample=u_num,
        )
