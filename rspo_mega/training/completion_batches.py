"""From rollouts and reference answers to completion batches, and from completions to rewards.

Shapes: ``b`` completions on this rank, ``P`` left-padded prompt width, ``G`` generated tokens.
A completion's global uid is ``rollout.completion_uid(prompt_uid, j)`` (a hash, the same on
every layout); its group id is the prompt's index in the *global* step batch, so groups may span ranks.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from rspo_mega.data import Example
from rspo_mega.data.tokenizer import Tokenizer
from rspo_mega.likelihood.batch_types import CompletionBatch
from rspo_mega.rollout.sampler import Rollout, left_pad
from rspo_mega.tasks.base import Task
from rspo_mega.tasks.prompts import EncodedExample


def completion_batch(rollout: Rollout, uids: Sequence[int], group_ids: Sequence[int]) -> CompletionBatch:
    """The rollout as ``[b, P + G]`` sequences: prompt padding masked out, generated span scored;
    with the rollout's trajectory record, that too (prompt columns: step -1, scores 0)."""
    prompt, gen = rollout.prompt_ids, rollout.completion_ids
    b, plen = prompt.shape
    input_ids = torch.cat([prompt, gen], dim=1)
    pad = plen - rollout.prompt_lengths
    positions = torch.arange(input_ids.shape[1]).unsqueeze(0)
    attention = positions >= pad.unsqueeze(1)
    completion = positions >= plen
    record = {}
    if rollout.trajectory is not None:
        tr = rollout.trajectory
        record["commit_step"] = torch.cat([torch.full((b, plen), -1), tr.commit_step], dim=1)
        for name, t in (("commit_logp", tr.logp), ("commit_entropy", tr.entropy)):
            record[name] = None if t is None else torch.cat([torch.zeros(b, plen), t], dim=1)
    return CompletionBatch(
        input_ids=input_ids,
        attention_mask=attention.expand(b, -1).clone(),
        completion_mask=completion.expand(b, -1).clone(),
        uids=torch.as_tensor(list(uids), dtype=torch.long),
        group_ids=torch.as_tensor(list(group_ids), dtype=torch.long),
        **record,
    )


def sft_batch(
    encoded: Sequence[EncodedExample], targets: Sequence[list[int]], uids: Sequence[int],
    gen_length: int, eos_id: int, prompt_multiple: int = 1,
) -> CompletionBatch:
    """Prompts (columns padded to ``prompt_multiple``) + reference completions right-padded with
    EOS to ``gen_length`` (LLaDA SFT)."""
    rows = []
    for tgt in targets:
        if len(tgt) > gen_length:
            raise ValueError(
                f"an SFT target has {len(tgt)} tokens, more than rollout.gen_length={gen_length}"
            )
        rows.append(list(tgt) + [eos_id] * (gen_length - len(tgt)))
    prompt, lengths = left_pad([list(e.prompt_ids) for e in encoded], eos_id, prompt_multiple)
    rollout = Rollout(prompt, lengths, torch.tensor(rows, dtype=torch.long),
                      torch.full((len(rows),), gen_length), torch.zeros(len(rows), dtype=torch.long))
    return completion_batch(rollout, uids, list(range(len(rows))))


def decode_completions(rollout: Rollout, tokenizer: Tokenizer, eos_id: int) -> list[str]:
    """Completion texts up to (excluding) the first EOS."""
    texts = []
    for row, n in zip(rollout.completion_ids.tolist(), rollout.completion_lengths.tolist()):
        ids = row[:n]
        if ids and ids[-1] == eos_id:
            ids = ids[:-1]
        texts.append(tokenizer.decode(ids))
    return texts


def score(task: Task, texts: Sequence[str], examples: Sequence[Example]) -> torch.Tensor:
    """Rewards ``[b]`` (float32); a non-finite reward is an error naming the task and uid."""
    rewards = []
    for text, ex in zip(texts, examples):
        r = float(task.reward(text, ex))
        if not math.isfinite(r):
            raise ValueError(f"task {task.name!r} returned a non-finite reward {r} for uid {ex.uid}")
        rewards.append(r)
    return torch.tensor(rewards, dtype=torch.float32)
