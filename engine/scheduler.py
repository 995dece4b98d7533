"""Iteration-level (continuous) batching with chunked prefill, preemption by recompute, and
fairness between clients.

Every step fills a token budget in three passes:
  1. DECODES: one token for every running sequence whose prompt is computed, oldest first.
     They always go: a decode never waits behind a prompt.
  2. PREFILL CHUNKS of running sequences still computing their prompt, then
  3. ADMISSIONS from the waiting queue, their cached prefix claimed and the rest chunked.
While decodes run, prompt tokens per step are capped (`PrefillCap`), so one long prompt
cannot stall every stream for a second; the cap may grow with the decodes it sits beside (a
step's rows then stay within a fixed multiple of a decode-only step's); with no decode to
protect, prompts get the whole budget.

An encoder-decoder sequence's encoder input runs once, whole, in the step that admits it
(`encoder_seqs`): its tokens count against that step's prompt budget, and an input longer
than the budget runs as the step's first prompt work, alone, rather than never.

When blocks run out, a sequence is preempted: its blocks are freed and it goes back to the
front of the queue, to be recomputed later (its full blocks usually survive in the prefix
cache). The victim comes from the client (`group_id`: the HTTP request a sequence belongs to)
that holds the most running sequences, newest first, so one client's huge request yields to
the others rather than the other way round. Admission is fair the same way: the next waiting
request is the one whose client runs the fewest sequences (then the smallest, then the
earliest); and a client with nothing running that cannot fit takes the room from a client
running more sequences than it asks for, one whole request at a time (a request's sequences
are preempted together).
"""
from __future__ import annotations

from collections import Counter, deque
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
    # Encoder-decoder sequences admitted this step: their encoder inputs run before the
    # decoder, and fill their (new) cross blocks.
    encoder_seqs: list[Sequence] = field(default_factory=list)
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


@dataclass(frozen=True, slots=True)
class PrefillCap:
    """Prompt tokens a step may take beside `num_decodes` decodes: per_decode of them per
    decode, at least `floor`, at most `ceiling` (per_decode 0: a fixed cap of `floor`)."""

    floor: int
    ceiling: int
    per_decode: int = 0

    def __call__(self, num_decodes: int) -> int:
        return min(max(self.floor, self.per_decode * num_decodes), self.ceiling)


@dataclass(slots=True)
class _Budget:
    tokens: int                          # tokens this step may still compute
    prefill: int                         # of those, prompt tokens (a cap while decodes run)
    num_prompt_tokens: int = 0           # prompt (and encoder) tokens spent so far

    def prompt_tokens(self, wanted: int) -> int:
        return min(wanted, self.tokens, self.prefill)

    def spend(self, num_tokens: int, is_prompt: bool) -> None:
        # An encoder input runs whole and may overdraw the budget: nothing more fits then.
        self.tokens = max(self.tokens - num_tokens, 0)
        if is_prompt:
            self.prefill = max(self.prefill - num_tokens, 0)
            self.num_prompt_tokens += num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_prefill_tokens: int | PrefillCap | None = None):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        if not isinstance(max_prefill_tokens, PrefillCap):
            max_prefill_tokens = PrefillCap(max_prefill_tokens or max_num_batched_tokens, max_num_batched_tokens)
        self.prefill_cap = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._preempt_for_starved_client(batch)
        made_room = len(batch.preempted)
        num_decodes = sum(seq.num_uncomputed_tokens == 1 for seq in self.running)
        budget = _Budget(self.max_num_batched_tokens,
                         self.prefill_cap(num_decodes) if num_decodes else self.max_num_batched_tokens)
        self._schedule_decodes(batch, budget)
        # Blocks ran out while decoding: no prompt gets more this step.
        if len(batch.preempted) == made_room:
            self._schedule_prompt_chunks(batch, budget)
        if len(batch.preempted) == made_room:
            self._admit_waiting(batch, budget)
        return batch

    # -- the three passes ---------------------------------------------------------------

    def _schedule_decodes(self, batch: ScheduledBatch, budget: _Budget) -> None:
        for seq in [s for s in self.running if s.num_uncomputed_tokens == 1]:
            if budget.tokens == 0:
                return
            if seq.status != SequenceStatus.RUNNING:           # preempted by an earlier one
                continue
            if self._allocate_or_preempt(seq, 1, batch):
                batch.add(seq, 1)
                # A prompt's last token may come this way (its chunks left one): fork then too.
                self.running.extend(self._fork_if_prefilled(seq, 1, batch))
                budget.spend(1, is_prompt=False)

    def _schedule_prompt_chunks(self, batch: ScheduledBatch, budget: _Budget) -> None:
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:
            num_new = budget.prompt_tokens(seq.num_uncomputed_tokens)
            if num_new == 0:
                return
            if seq.status != SequenceStatus.RUNNING:
                continue
            if not self._allocate_or_preempt(seq, num_new, batch):
                return
            batch.add(seq, num_new)
            self.running.extend(self._fork_if_prefilled(seq, num_new, batch))
            budget.spend(num_new, is_prompt=True)

    def _admit_waiting(self, batch: ScheduledBatch, budget: _Budget) -> None:
        size = self.block_manager.block_size
        while self.waiting and budget.prompt_tokens(1):
            seq = self._next_waiting()
            if len(self.running) + 1 + len(seq.siblings) > self.max_num_seqs:
                return
            cached = self.block_manager.find_cached_prefix(seq) if seq.num_computed_tokens == 0 else []
            if seq.prompt_logits_from is not None:
                cached = cached[: seq.prompt_logits_from // size]
            num_new = budget.prompt_tokens(seq.num_uncomputed_tokens - len(cached) * size)
            num_encoder = self._encoder_tokens(seq, num_new, budget)
            if num_encoder is None or not self.block_manager.allocate(seq, num_new, cached, batch.blocks_to_copy):
                return
            if num_encoder:
                batch.encoder_seqs.append(seq)
            self.waiting.remove(seq)
            self._count_prefix_lookup(batch, seq.num_tokens, len(cached))
            seq.status = SequenceStatus.RUNNING
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = len(cached) * size
            seq.num_computed_tokens += len(cached) * size
            self.running.append(seq)
            batch.add(seq, num_new)
            self.running.extend(self._fork_if_prefilled(seq, num_new, batch))
            budget.spend(num_new + num_encoder, is_prompt=True)

    def _encoder_tokens(self, seq: Sequence, num_new: int, budget: _Budget) -> int | None:
        """Encoder tokens seq's admission runs: 0 for none (a decoder-only sequence); None
        when they do not fit what this step has left beside its num_new decoder tokens, unless
        nothing else has spent prompt budget yet (an input longer than the budget runs alone)."""
        if not seq.encoder_token_ids or seq.cross_block_table:
            return 0
        wanted = num_new + seq.num_encoder_tokens
        if budget.prompt_tokens(wanted) == wanted or budget.num_prompt_tokens == 0:
            return seq.num_encoder_tokens
        return None

    # -- fairness -------------------------------------------------------------------------

    def _next_waiting(self) -> Sequence:
        """The waiting request whose client runs the fewest sequences; then the smallest (a
        request's n completions run together); then the earliest."""
        running = Counter(seq.group_id for seq in self.running)
        return min(self.waiting, key=lambda seq: (running[seq.group_id], len(seq.siblings)))

    def _preempt_for_starved_client(self, batch: ScheduledBatch) -> None:
        """A client with nothing running whose next request cannot fit takes the room from the
        client running the most, one whole request at a time, while that client runs more
        sequences than the starved request asks for (so two equal clients never take turns)."""
        if not self.waiting:
            return
        seq = self._next_waiting()
        if any(s.group_id == seq.group_id for s in self.running):
            return
        wanted = 1 + len(seq.siblings)
        while not self._fits(seq):
            victims = self._largest_clients_newest_request()
            if not victims or self._group_size(victims[0].group_id) <= wanted:
                return
            for victim in victims:
                self.running.remove(victim)
                self.preempt(victim)
                batch.preempted.append(victim)

    def _fits(self, seq: Sequence) -> bool:
        if len(self.running) + 1 + len(seq.siblings) > self.max_num_seqs:
            return False
        # Its first chunk needs at least one block (and an encoder-decoder's its cross blocks);
        # more need not be free this step.
        needed = self.block_manager.num_missing_cross_blocks(seq)
        return self.block_manager.num_free_blocks > needed or seq.num_tokens <= len(seq.block_table)

    def _largest_clients_newest_request(self) -> list[Sequence]:
        if not self.running:
            return []
        sizes = Counter(seq.group_id for seq in self.running)
        group = max(sizes, key=sizes.__getitem__)
        newest = next(seq for seq in reversed(self.running) if seq.group_id == group)
        return [seq for seq in self.running if seq.request_id == newest.request_id]

    def _group_size(self, group_id: str) -> int:
        return sum(1 for seq in self.running if seq.group_id == group_id)

    def _pick_victim(self, batch: ScheduledBatch) -> Sequence | None:
        """Newest sequence of the client running the most, among those this step has not
        scheduled yet (the one asking for blocks included)."""
        scheduled = {id(seq) for seq in batch.seqs} | {id(seq) for seq, _ in batch.samples}
        candidates = [seq for seq in self.running if id(seq) not in scheduled]
        if not candidates:
            return None
        sizes = Counter(seq.group_id for seq in self.running)
        return max(reversed(candidates), key=lambda seq: sizes[seq.group_id])

    # -- blocks ---------------------------------------------------------------------------

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch) -> bool:
        """Blocks for seq's next tokens, preempting others until they fit. False when seq
        itself had to go."""
        while not self.block_manager.allocate(seq, num_new, copies=batch.blocks_to_copy):
            victim = self._pick_victim(batch)
            if victim is None:
                victim = seq
            self.running.remove(victim)
            self.preempt(victim)
            batch.preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _count_prefix_lookup(self, batch: ScheduledBatch, num_tokens: int, num_hit_blocks: int) -> None:
        # Once per admission, never per blocked attempt.
        if self.block_manager.enable_prefix_caching:
            batch.num_prefix_queries += num_tokens
            batch.num_prefix_hits += num_hit_blocks * self.block_manager.block_size

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
