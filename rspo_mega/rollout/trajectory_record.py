"""The sampler's trajectory record: when each generated token was committed, and how likely it was.

A masked-diffusion rollout is a Markov chain over partially masked sequences: the state before
step ``t`` of a row is its prompt plus the tokens committed at steps ``< t`` (mask tokens
elsewhere), and step ``t`` commits some of the masked positions. :class:`Trajectory` records, per
generated position,

* ``commit_step [b, G]`` (long): the row's own step counter (0, 1, ... over the steps the row
  took, so rows that finish blocks early in threshold mode still number their steps
  contiguously) at which the position was committed; positions a step never committed (the EOS
  fill of ``stop_on_eos_block``) get the row's number of steps, i.e. "after the trajectory";
* ``logp [b, G]`` (float32): the log-probability of the committed token under the rollout
  policy at that step, ``log softmax(logits / T)`` after any restriction the sampler applied
  (``forbid_eos``) and with the guided logits under classifier-free guidance (``T = 0`` scores
  at ``T = 1``); 0 where no step committed;
* ``entropy [b, G]`` (float32): the entropy of that same distribution at that position and step.

``commit_step`` is derived from the tokens themselves (which positions a step unmasked), so every
pipeline stage records it; log-probs and entropies are computed by the sampling ranks from the
vocab-parallel logits (:meth:`VocabShard.log_prob_entropy`, no vocabulary gather) and handed to
the other stages by the engine. Everything is keyed by the row's uid like the samples, hence
independent of the DP/TP/PP layout and of the batch composition.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Trajectory:
    """Per generated position: commit step, rollout log-prob and entropy (see the module doc)."""

    commit_step: torch.Tensor  # [b, G] long
    logp: Optional[torch.Tensor]  # [b, G] float32; None on a stage that does not sample
    entropy: Optional[torch.Tensor]  # [b, G] float32; likewise

    def select(self, index: torch.Tensor) -> "Trajectory":
        """Rows ``index``."""
        pick = (lambda t: None if t is None else t[index])  # noqa: E731
        return Trajectory(self.commit_step[index], pick(self.logp), pick(self.entropy))


class TrajectoryRecorder:
    """Fills a :class:`Trajectory` step by step during one ``generate`` call (on its device)."""

    def __init__(self, rows: int, gen_length: int, device: torch.device):
        self.commit_step = torch.full((rows, gen_length), -1, dtype=torch.long, device=device)
        self.logp = torch.zeros(rows, gen_length, dtype=torch.float32, device=device)
        self.entropy = torch.zeros_like(self.logp)
        self.sampled = False

    def commits(self, newly: torch.Tensor, col0: int, steps: torch.Tensor) -> None:
        """Positions ``newly [b, w]`` (columns ``col0 .. col0 + w`` of the generated span) were
        committed by this step, numbered ``steps [b]`` per row."""
        span = self.commit_step[:, col0:col0 + newly.shape[1]]
        span.copy_(torch.where(newly, steps.to(span.device)[:, None], span))

    def draws(self, rows: Optional[torch.Tensor], cols: torch.Tensor, commit: torch.Tensor,
              logp: torch.Tensor, entropy: torch.Tensor) -> None:
        """The sampling ranks' scores of one step: ``cols [r, m]`` generated-span columns of the
        ``rows`` (None = all) drawn, ``commit [r, m]`` those committed, ``logp``/``entropy [r, m]``."""
        self.sampled = True
        for store, value in ((self.logp, logp), (self.entropy, entropy)):
            part = store if rows is None else store[rows]
            part.scatter_(1, cols, torch.where(commit, value.to(part.dtype), part.gather(1, cols)))
            if rows is not None:
                store[rows] = part

    def finish(self, steps_used: list[int]) -> Trajectory:
        """The record, with never-committed positions numbered after the row's last step (host
        copies, like the rollout's tokens)."""
        steps = torch.as_tensor(steps_used, dtype=torch.long, device=self.commit_step.device)
        commit = torch.where(self.commit_step < 0, steps[:, None], self.commit_step)
        if not self.sampled:
            return Trajectory(commit.cpu(), None, None)
        return Trajectory(commit.cpu(), self.logp.cpu(), self.entropy.cpu())
