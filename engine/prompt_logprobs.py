"""Prompt logprobs: each prompt token's log-probability given the tokens before it (teacher
forcing), with its top alternatives. The first token has none (nothing predicts it).

The logits at position p predict token p + 1, so a prefill chunk computing positions
[start, start + n) yields the logprobs of tokens start + 1 ... start + n (those that are
prompt tokens):

    positions   0    1    2    3  | 4    5        (a chunk: start 2, n 3)
    logprob of  -    t1   t2   t3 | t4   ...      this chunk gives t3, t4, t5

A sequence that wants them reads the prefix cache only before the first position still needed
(cached blocks hold K/V, not the logits of their tokens): a prompt is computed whole the first
time, and one preempted mid-prefill resumes from the cache up to where its logprobs stopped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

_ROWS_PER_SLICE = 256      # logits of at most this many positions at once: (rows, vocab) float32


@dataclass(slots=True)
class PromptLogprob:
    logprob: float                                   # of the prompt token itself
    top: list[tuple[int, float]] | None              # (token id, logprob), most likely first


def collect_prompt_logprobs(collected: list[PromptLogprob | None], prompt_ids: Sequence[int], start: int,
                            hidden: torch.Tensor, compute_logits: Callable[[torch.Tensor], torch.Tensor],
                            top_k: int) -> None:
    """Extend `collected` (one entry per prompt token so far, None first) with what the hidden
    states of positions [start, start + len(hidden)) give; positions it has are skipped."""
    first = len(collected) - 1                       # the first position still needed
    stop = min(start + hidden.shape[0], len(prompt_ids) - 1)
    if start > first and stop > start:
        raise RuntimeError(f"prompt logprobs from position {first} were never computed (the chunk "
                           f"starts at {start}): a cached prefix was read")
    for lo in range(max(first, start), stop, _ROWS_PER_SLICE):
        hi = min(lo + _ROWS_PER_SLICE, stop)
        logits = compute_logits(hidden[lo - start: hi - start]).float()          # (hi - lo, vocab)
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor(prompt_ids[lo + 1: hi + 1], dtype=torch.long, device=logprobs.device)
        chosen = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        if top_k:
            values, ids = logprobs.topk(top_k, dim=-1)
            tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        else:
            tops = [None] * (hi - lo)
        collected.extend(PromptLogprob(lp, top) for lp, top in zip(chosen, tops))
