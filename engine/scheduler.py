"""Iteration-level (continuous) batching with chunked prefill and preemption by recompute.

Every step fills a token budget. First the RUNNING sequences, oldest first: one token for
each decode, and the next chunk of any prompt still being prefilled. When blocks run out,
the most recently admitted sequence is preempted: its blocks are freed and it goes back to
the front of the queue, to be recomputed later (its full blocks usually survive in the
prefix cache). Next, if nobody was preempted, WAITING sequences are admitted in arrival
order while the budget, the sequence limit and the free blocks allow, their cached prefix
claimed and the rest of their prompt chunked to fit the budget.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockManager
from engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)      # run this step, in flattening order
    num_new_tokens: list[int] = field(default_factory=list)  # per entry of seqs
    # (sequence, index into seqs) for every sequence that gets a token this step: the last
    # logits row of seqs[index] is what it samples from (forked siblings share their parent's).
    samples: list[tuple[Sequence, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_prefix_queries: int = 0          # prompt tokens of admitted sequences looked up in the prefix cache
    num_prefix_hits: int = 0             # of those, tokens found cached

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def add(self, seq: Sequence, num_new_tokens: int) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(num_new_tokens)
        if seq.num_computed_tokens + num_new_tokens == seq.num_tokens:
            self.samples.append((seq, len(self.seqs) - 1))


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        forked: list[Sequence] = []

        # First, the RUNNING sequences: decodes and unfinished prompt chunks.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new, batch):
                break                                   # seq preempted itself; nothing after it
            batch.add(seq, num_new)
            forked += self._fork_if_prefilled(seq, num_new, batch)
            budget -= num_new
            i += 1
        self.running.extend(forked)

        # Next, the WAITING ones, in arrival order.
        while self.waiting and budget > 0 and not batch.preempted:
            seq = self.waiting[0]
            if len(self.running) + 1 + len(seq.siblings) > self.max_num_seqs:
                break
            cached = self.block_manager.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            num_new = min(seq.num_uncomputed_tokens - len(cached) * self.block_manager.block_size, budget)
            if not self.block_manager.allocate(seq, num_new, cached, batch.blocks_to_copy):
                break
            self.waiting.popleft()
            self._count_prefix_lookup(batch, seq.num_tokens, len(cached))
            seq.status = SequenceStatus.RUNNING
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(cached) * self.block_manager.block_size
            seq.num_computed_tokens += len(cached) * self.block_manager.block_size
            self.running.append(seq)
            batch.add(seq, num_new)
            self.running.extend(self._fork_if_prefilled(seq, num_new, batch))
            budget -= num_new
        return batch

    def _count_prefix_lookup(self, batch: ScheduledBatch, num_tokens: int, num_hit_blocks: int) -> None:
        # Once per admission, never per blocked attempt.
        if self.block_manager.enable_prefix_caching:
            batch.num_prefix_queries += num_tokens
            batch.num_prefix_hits += num_hit_blocks * self.block_manager.block_size

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Blocks for seq's next tokens, preempting from the tail until they fit.
        False when seq itself had to go."""
        while not self.block_manager.allocate(seq, num_new, copies=batch.blocks_to_copy):
            victim = self.running.pop()
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _fork_if_prefilled(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> list[Sequence]:
        """Once a prompt is fully computed, its n - 1 siblings share its blocks and sample
        from its logits in this very step."""
        if not seq.siblings or seq.num_computed_tokens + num_new < seq.num_tokens:
            return []
        siblings, seq.siblings = seq.siblings, []
        parent_index = len(batch.seqs) - 1
        for sibling in siblings:
            self.block_manager.fork(seq, sibling)
            sibling.num_computed_tokens = seq.num_computed_tokens + num_new
            sibling.status = SequenceStatus.RUNNING
            batch.samples.append((sibling, parent_index))
        return siblings

    def after_step(self, batch: ScheduledBatch) -> None:
        """Record the tokens the step computed and publish full blocks to the prefix cache."""
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += num_new
            self.block_manager.cache_computed_blocks(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take a sequence out of the schedule for good and free its blocks."""
        seq.status = status
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        for sibling in seq.siblings:                    # never forked: nothing to free
            sibling.status = status
