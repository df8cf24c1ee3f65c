"""The trajectory estimator: sampled denoising steps of the rollout's own Markov chain (AGRPO).

A rollout of a masked diffusion LM is a chain of states ``x_0 -> x_1 -> ... -> x_T``: the state
before step ``t`` holds the prompt and the tokens committed at steps ``< t``; step ``t``
commits the positions ``C_t`` with ``log pi(x_{t+1} | x_t) = sum_{j in C_t} log p(y_j | x_t)``
(the positions chosen are taken as given). From the sampler's record (``commit_step``,
:mod:`rspo_mega.rollout.trajectory_record`) every state is rebuilt exactly, so a sum over steps of a
per-token quantity ``f`` can be estimated without bias from K sampled steps:

    S_b = sum_{t < T_b} sum_{j in C_t} f_j,      S_hat_b = (1/K) sum_k w(t_k) sum_{j in C_{t_k}} f_j

with ``t_k ~ q_b`` and ``w(t) = 1 / q_b(t)``, so ``E[S_hat_b] = S_b``. ``T_b`` counts the steps up
to and including the completion's last step that commits a non-EOS token (the later steps commit
EOS padding only; a completion of EOS alone keeps its first step). Step distributions
(``likelihood.step_sampling``):

* ``uniform``: ``q_b(t) = 1 / T_b`` (weights ``T_b``);
* ``entropy``: ``q_b(t)`` proportional to the summed rollout entropies of the tokens step ``t``
  committed (plus ``ENTROPY_FLOOR``, so that every step can be drawn), weights ``1 / q_b(t)``.

Randomness (``likelihood.stratified_steps``): each draw is an inverse-CDF transform of a uniform
``u_k``. Independent: ``u_k`` from the key ``(seed, iteration, uid, k)``. Stratified (default):
``u_k = (pi(k) + v_k) / K`` with ``pi`` a permutation of ``0..K-1`` drawn from the completion's
own stream ``(seed, iteration, uid, -1)`` and ``v_k`` from ``(seed, iteration, uid, k)``; each
``u_k`` is still uniform, so each draw is unbiased, and the K draws cover the CDF evenly. (The
AGRPO reference code stratifies over a rank's whole batch, which makes a draw depend on the
layout; per completion keeps it a pure function of the key.)

The masked inputs of the K states run through the same :class:`ElboRunner` as the ELBO masks;
:func:`tempered_forward` scores them under the rollout's policy ``softmax(logits / T)`` (with
``forbid_eos`` applied), the distribution the recorded log-probs come from.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from rspo_mega.config.schema import LikelihoodConfig, StepSampling, TrainConfig, choices
from rspo_mega.likelihood.batch_types import CompletionBatch, TrajectoryBatch
from rspo_mega.likelihood.elbo import sequence_estimates
from rspo_mega.likelihood.masks import COMPLETION_STREAM, KeyedDrawSampler, mask_generator
from rspo_mega.likelihood.parallel_elbo import ForwardFn


ENTROPY_FLOOR = 1e-8  # nats added to every step's entropy (a step of certain tokens stays drawable)


# --- pure pieces (the enumeration tests call these) ---------------------------------------------

def counted_steps(commit_step: torch.Tensor, tokens: torch.Tensor, eos_token_id: int) -> int:
    """``T``: 1 + the last step committing a non-EOS token of one completion (``[G]`` each); 1
    when every token is EOS."""
    real = commit_step[tokens != eos_token_id]
    return 1 + int(real.max()) if real.numel() else 1


def step_probabilities(commit_step: torch.Tensor, entropy: Optional[torch.Tensor], steps: int,
                       scheme: str) -> torch.Tensor:
    """``q(t)`` for ``t < steps``, float64 ``[steps]`` (``commit_step``, ``entropy``: ``[G]``)."""
    if scheme == "uniform":
        return torch.full((steps,), 1.0 / steps, dtype=torch.float64)
    if scheme != "entropy":
        raise ValueError(f"likelihood.step_sampling={scheme!r}: expected one of "
                         f"{choices(StepSampling)}")
    if entropy is None:
        raise ValueError("likelihood.step_sampling='entropy' needs the rollout's entropies "
                         "(CompletionBatch.commit_entropy)")
    inside = commit_step < steps
    mass = torch.full((steps,), ENTROPY_FLOOR, dtype=torch.float64)
    mass.index_add_(0, commit_step[inside], entropy[inside].to(torch.float64).clamp(min=0.0))
    return mass / mass.sum()


def step_uniforms(key: tuple[int, ...], num: int, stratified: bool) -> torch.Tensor:
    """The K uniforms ``[K]`` (float64) of one completion's draws; ``key`` = (seed, iteration,
    mask key, update)."""
    seed, iteration, uid, update = key
    v = torch.stack([torch.rand((), dtype=torch.float64,
                                generator=mask_generator(seed, iteration, uid, k, update))
                     for k in range(num)])
    if not stratified:
        return v
    perm = torch.randperm(num, generator=mask_generator(seed, iteration, uid, COMPLETION_STREAM,
                                                        update))
    return (perm.to(torch.float64) + v) / num


def draw_steps(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws ``[K]``: the first ``t`` with ``cdf(t) > u``."""
    cdf = torch.cumsum(probs, 0)
    return torch.searchsorted(cdf, uniforms, right=True).clamp(max=probs.numel() - 1)


# --- the batch ------------------------------------------------------------------------------------

def step_states(batch: CompletionBatch, steps: torch.Tensor, weights: torch.Tensor,
                mask_token_id: int) -> dict[str, torch.Tensor]:
    """Rows ``n = b * K + k``: inputs before step ``steps[b, k]``, its committed positions and
    their weight ``weights[b, k]`` (float64) and recorded rollout log-probs, ``[N, S]`` each."""
    k = steps.shape[1]
    commit = batch.commit_step.repeat_interleave(k, dim=0)
    t = steps.reshape(-1, 1)
    scored = commit == t
    ids = batch.input_ids.repeat_interleave(k, dim=0)
    logp = batch.commit_logp.repeat_interleave(k, dim=0) if batch.commit_logp is not None \
        else torch.zeros(commit.shape, dtype=torch.float32)
    return {
        "input_ids": torch.where(commit < t, ids, torch.full_like(ids, mask_token_id)),
        "labels": ids,
        "score_mask": scored,
        "weights": torch.where(scored, weights.reshape(-1, 1).to(torch.float64), 0.0),
        "rollout_logp": torch.where(scored, logp, 0.0),
    }


class TrajectorySampler(KeyedDrawSampler):
    """Builds the :class:`TrajectoryBatch` of a rollout step; the trajectory counterpart of
    :class:`~rspo_mega.likelihood.masks.MaskSampler` (same ``sample`` / ``state_dict`` API)."""

    kind = "trajectory"

    def __init__(self, cfg: LikelihoodConfig, seed: int, mask_token_id: int, eos_token_id: int):
        if cfg.mask_scheme != "trajectory":
            raise ValueError(f"TrajectorySampler needs likelihood.mask_scheme='trajectory', got "
                             f"{cfg.mask_scheme!r}")
        super().__init__(cfg, seed, mask_token_id, eos_token_id)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "mask_scheme": self.cfg.mask_scheme,
                "step_sampling": self.cfg.step_sampling, "mc_samples": self.cfg.mc_samples,
                "stratified_steps": self.cfg.stratified_steps,
                "fresh_masks_per_update": self.cfg.fresh_masks_per_update, "hash": "splitmix64-v1"}

    def completion_steps(self, batch: CompletionBatch, row: int, iteration: int,
                         update: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        """``(T, steps [K], weights [K])`` of completion ``row`` (host)."""
        gen = batch.completion_mask[row]
        commit, tokens = batch.commit_step[row, gen], batch.input_ids[row, gen]
        entropy = None if batch.commit_entropy is None else batch.commit_entropy[row, gen]
        total = counted_steps(commit, tokens, self.eos_token_id)
        probs = step_probabilities(commit, entropy, total, self.cfg.step_sampling)
        key = (self.seed, iteration, int(batch.uids[row]), update)
        steps = draw_steps(probs, step_uniforms(key, self.cfg.mc_samples,
                                                self.cfg.stratified_steps))
        return total, steps, 1.0 / probs[steps]

    def sample(self, batch: CompletionBatch, iteration: int, update: int = 0) -> TrajectoryBatch:
        """K sampled steps of every completion of ``batch`` (on ``batch``'s device)."""
        if batch.commit_step is None:
            raise ValueError("likelihood.mask_scheme='trajectory' needs the rollout's trajectory "
                             "record (CompletionBatch.commit_step); generate with trajectory=True")
        cpu = batch.to("cpu")
        drawn = [self.completion_steps(cpu, b, iteration, update) for b in range(batch.size)]
        totals = torch.tensor([d[0] for d in drawn], dtype=torch.long)
        out = self.at_steps(cpu, totals, torch.stack([d[1] for d in drawn]),
                            torch.stack([d[2] for d in drawn]))
        return out.to(batch.input_ids.device)

    def at_steps(self, batch: CompletionBatch, totals: torch.Tensor, steps: torch.Tensor,
                 weights: torch.Tensor) -> TrajectoryBatch:
        """The batch of given steps ``[B, K]`` with their weights ``[B, K]`` (``totals [B]``: the
        counted steps T); :meth:`sample` calls it with its draws, the enumeration tests with
        every step in turn."""
        b_num, k_num = steps.shape
        n = b_num * k_num
        return TrajectoryBatch(
            attention_mask=batch.attention_mask.repeat_interleave(k_num, dim=0),
            completion_index=torch.arange(n) // k_num, mc_index=torch.arange(n) % k_num,
            lengths=totals, count_mask=batch.completion_mask & (batch.commit_step < totals[:, None]),
            num_mc=k_num, units_per_sample=1, steps=totals, sampled_steps=steps,
            **step_states(batch, steps, weights, self.mask_token_id))


def trajectory_sum(values: torch.Tensor, masked: TrajectoryBatch) -> torch.Tensor:
    """Per completion, the unbiased estimate ``[B]`` of ``sum_{t < T} sum_{j in C_t} values``
    from the K sampled steps: ``(1/K) sum_k w_k sum_{j in C_{t_k}} values[n_k, j]``."""
    b, k = masked.num_completions, masked.num_mc
    return sequence_estimates(values, masked).view(b, k).mean(dim=1)


def tempered_forward(temperature: float, forbid_token_id: Optional[int] = None) -> ForwardFn:
    """A :class:`ElboRunner` forward that scores labels under ``softmax(logits / T)`` with
    ``forbid_token_id`` excluded (``-inf``), vocab-parallel; at ``T = 1`` without a forbidden
    id it is ``llada_forward`` itself."""
    from rspo_mega.models.llada.model import llada_forward, unwrap_model

    if temperature <= 0:
        raise ValueError(f"tempered_forward: temperature must be > 0, got {temperature}")
    if temperature == 1.0 and forbid_token_id is None:
        return llada_forward

    def forward(chunk, input_ids, attention_mask=None, labels=None, positions=None,
                adapters=True):
        out = llada_forward(chunk, input_ids, attention_mask, None, positions=positions,
                            adapters=adapters)
        inner = unwrap_model(chunk)
        if not inner.post_process or labels is None:
            return out
        logits = out.div_(temperature) if temperature != 1.0 else out  # [n, v] local columns
        local = None if forbid_token_id is None else forbid_token_id - inner.vocab_start
        if local is not None and 0 <= local < logits.shape[-1]:
            logits[..., local] = float("-inf")
        return inner.label_log_probs(logits, labels, positions)

    return forward


def run_estimator(cfg: TrainConfig) -> tuple[Any, ForwardFn]:
    """A run's step sampler and the runner's forward: ELBO masks scored by ``llada_forward``, or
    with ``likelihood.mask_scheme=trajectory`` sampled rollout steps scored under the rollout's
    policy (``rollout.temperature``, ``rollout.forbid_eos``)."""
    from rspo_mega.likelihood.masks import MaskSampler
    from rspo_mega.models.llada.model import llada_forward

    m = cfg.model
    if cfg.likelihood.mask_scheme != "trajectory":
        return MaskSampler(cfg.likelihood, cfg.seed, m.mask_token_id, m.eos_token_id), llada_forward
    sampler = TrajectorySampler(cfg.likelihood, cfg.seed, m.mask_token_id, m.eos_token_id)
    forbid = m.eos_token_id if cfg.rollout.forbid_eos else None
    return sampler, tempered_forward(cfg.rollout.temperature, forbid)
