"""The scheduler on the CPU with no model: fake sampled tokens drive it (vLLM's way)."""
from conftest import make_scheduler, make_seq

from engine.scheduler import PrefillCap
from engine.sequence import SequenceStatus


def run_step(scheduler, token=1):
    """Schedule, pretend the model ran, append a fake token to every sampled sequence."""
    batch = scheduler.schedule()
    scheduler.after_step(batch)
    for seq, _ in batch.samples:
        seq.append_token(token)
    return batch


def test_decodes_first_then_waiting_prompts_fill_the_budget():
    s = make_scheduler(max_num_batched_tokens=10)
    a, b = make_seq(0, 6), make_seq(1, 6)
    s.add(a)
    s.add(b)
    first = run_step(s)
    assert [x.seq_id for x in first.seqs] == [0, 1] and first.num_new_tokens == [6, 4]
    assert [seq.seq_id for seq, _ in first.samples] == [0]            # b's prompt is unfinished
    second = run_step(s)
    assert second.num_new_tokens == [1, 2]                             # a decodes, b's last chunk
    assert {seq.seq_id for seq, _ in second.samples} == {0, 1}


def test_long_prompt_is_chunked_across_steps_including_chunks_that_split_blocks():
    s = make_scheduler(block_size=4, max_num_batched_tokens=5)
    seq = make_seq(0, 13)
    s.add(seq)
    chunks = [run_step(s).num_new_tokens[0] for _ in range(3)]
    assert chunks == [5, 5, 3]
    assert seq.num_computed_tokens == 13 and seq.num_output_tokens == 1
    assert len(seq.block_table) == 4


def test_max_num_seqs_bounds_admission():
    s = make_scheduler(max_num_seqs=2, max_num_batched_tokens=64)
    for i in range(3):
        s.add(make_seq(i, 3))
    batch = run_step(s)
    assert [x.seq_id for x in batch.seqs] == [0, 1] and len(s.waiting) == 1


def test_out_of_blocks_preempts_the_newest_and_recomputes_it_later():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64, prefix_caching=False)
    old, new = make_seq(0, 7), make_seq(1, 8)
    s.add(old)
    s.add(new)
    run_step(s)                                   # old: 2 blocks (7 + 1 token), new: 2 blocks
    assert s.block_manager.num_free_blocks == 0
    batch = run_step(s)                           # old needs a 3rd block for token 9: new goes
    assert batch.preempted == [new] and new.status == SequenceStatus.WAITING
    assert new.num_computed_tokens == 0 and s.waiting[0] is new and new.num_output_tokens == 1
    assert [x.seq_id for x in batch.seqs] == [0]
    s.finish(old, SequenceStatus.FINISHED_STOPPED)
    batch = run_step(s)
    assert batch.seqs == [new] and batch.num_new_tokens == [9]       # prompt + its token, again
    assert new.num_output_tokens == 2


def test_the_newest_sequence_preempts_itself_when_it_cannot_grow():
    s = make_scheduler(num_blocks=2, block_size=2, max_num_batched_tokens=64, prefix_caching=False)
    a, b = make_seq(0, 1), make_seq(1, 2)
    s.add(a)
    s.add(b)
    run_step(s)                                   # a: 1 block with room, b: 1 full block
    batch = run_step(s)                           # b needs a 2nd block and is itself the newest
    assert batch.preempted == [b] and batch.seqs == [a] and s.waiting[0] is b


def test_prefix_hit_computes_only_the_suffix():
    s = make_scheduler(block_size=4, max_num_batched_tokens=64)
    first = make_seq(0, 14, first_token=3)
    s.add(first)
    run_step(s)
    second = make_seq(0, 14, first_token=3, request_id="second")
    second.token_ids[-2:] = [999, 998]           # same 3-block prefix, different tail
    s.add(second)
    batch = run_step(s)
    index = batch.seqs.index(second)
    assert batch.num_new_tokens[index] == 2 and second.num_cached_tokens == 12
    assert second.block_table[:3] == first.block_table[:3]


def test_forked_siblings_sample_from_the_parents_row_then_decode_alone():
    s = make_scheduler(block_size=4, max_num_batched_tokens=64)
    parent = make_seq(0, 6)
    parent.siblings = [make_seq(1, 6), make_seq(2, 6)]
    for sibling in parent.siblings:
        sibling.token_ids = list(parent.token_ids)
    siblings = list(parent.siblings)
    s.add(parent)
    batch = run_step(s)
    assert batch.seqs == [parent]
    assert [(seq, index) for seq, index in batch.samples] == [(parent, 0), (siblings[0], 0), (siblings[1], 0)]
    assert all(x.block_table == parent.block_table for x in siblings)
    batch = run_step(s)
    assert len(batch.seqs) == 3 and len(batch.blocks_to_copy) == 2    # two copy the shared tail
    tails = {x.block_table[-1] for x in [parent, *siblings]}
    assert len(tails) == 3


def test_siblings_fork_when_the_prompts_last_chunk_is_a_single_token():
    # 6 prompt tokens in 5-token steps: the last one is scheduled with the decodes, and the
    # siblings must still fork from it (they were left behind, their request never finished).
    s = make_scheduler(block_size=4, max_num_batched_tokens=5)
    parent = make_seq(0, 6)
    parent.siblings = [make_seq(1, 6)]
    sibling = parent.siblings[0]
    sibling.token_ids = list(parent.token_ids)
    s.add(parent)
    assert run_step(s).num_new_tokens == [5]
    second = run_step(s)
    assert second.num_new_tokens == [1] and [seq for seq, _ in second.samples] == [parent, sibling]
    assert sibling.status == SequenceStatus.RUNNING and sibling.num_output_tokens == 1 and not parent.siblings


def test_finish_frees_blocks_and_aborting_a_waiting_sequence_is_clean():
    s = make_scheduler(num_blocks=8, block_size=4)
    running, waiting = make_seq(0, 5), make_seq(1, 40)
    s.add(running)
    run_step(s)
    s.add(waiting)
    s.finish(waiting, SequenceStatus.FINISHED_ABORTED)
    s.finish(running, SequenceStatus.FINISHED_ABORTED)
    assert s.block_manager.num_free_blocks == 8 and not s.has_unfinished()


def test_prefix_lookups_are_counted_once_per_admission_not_per_blocked_attempt():
    s = make_scheduler(num_blocks=4, block_size=4, max_num_batched_tokens=64)
    hog = make_seq(0, 12)
    s.add(hog)
    queries = run_step(s).num_prefix_queries      # 3 of 4 blocks (4 with its next token)
    blocked = make_seq(1, 8)
    s.add(blocked)
    for _ in range(3):
        queries += run_step(s).num_prefix_queries  # cannot be admitted: no blocks
    assert queries == 12
    s.finish(hog, SequenceStatus.FINISHED_STOPPED)
    queries += run_step(s).num_prefix_queries
    assert queries == 12 + 8


# -- decodes never wait behind a prompt --------------------------------------------------------

def test_prompts_are_capped_while_decodes_run_and_get_the_whole_budget_alone():
    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=64,
                       max_prefill_tokens=8)
    alone = make_seq(0, 100)
    s.add(alone)
    assert run_step(s).num_new_tokens == [64]             # nobody decodes: the whole budget
    run_step(s)                                           # its last 36, and its first token
    decoders = [make_seq(i, 3) for i in range(1, 4)]
    for seq in decoders:
        s.add(seq)
    assert run_step(s).num_new_tokens == [1, 3, 3, 2]     # one decode, then 8 prompt tokens
    long_prompt = make_seq(9, 100)
    s.add(long_prompt)
    for _ in range(3):
        batch = run_step(s)
        decodes = [n for n in batch.num_new_tokens if n == 1]
        assert batch.num_new_tokens[:len(decodes)] == decodes and len(decodes) >= 4     # decodes first
        assert sum(n for n in batch.num_new_tokens if n > 1) <= 8                       # prompts capped


def test_a_cap_that_grows_with_the_decodes_beside_it():
    cap = PrefillCap(floor=4, ceiling=40, per_decode=2)
    assert [cap(n) for n in (1, 2, 3, 10, 30)] == [4, 4, 6, 20, 40]

    def chunk_beside(num_decodes: int) -> list[int]:
        s = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=32, max_num_batched_tokens=128,
                           max_prefill_tokens=cap)
        for i in range(num_decodes):
            s.add(make_seq(i, 2))
        run_step(s)                                       # their prompts, alone: the whole budget
        s.add(make_seq(99, 500))
        return run_step(s).num_new_tokens

    assert chunk_beside(2) == [1, 1, 4]                   # the floor
    assert chunk_beside(6) == [1] * 6 + [12]              # two per decode
    assert chunk_beside(25) == [1] * 25 + [40]            # the ceiling


def test_a_prompt_chunk_never_takes_a_decodes_place():
    s = make_scheduler(num_blocks=256, block_size=4, max_num_seqs=8, max_num_batched_tokens=6)
    decoders = [make_seq(i, 1) for i in range(3)]
    for seq in decoders:
        s.add(seq)
    run_step(s)
    s.add(make_seq(9, 50))
    for _ in range(5):
        batch = run_step(s)
        assert all(seq in batch.seqs for seq in decoders)  # 3 decodes each step, the prompt gets 3


# -- fairness between clients -----------------------------------------------------------------

def grouped(seq_id: int, group: str, num_prompt_tokens: int = 3, siblings: int = 0):
    seq = make_seq(seq_id, num_prompt_tokens, max_tokens=10_000)
    seq.group_id = group
    seq.siblings = [make_seq(seq_id * 100 + k + 1, num_prompt_tokens, request_id=seq.request_id)
                    for k in range(siblings)]
    for sibling in seq.siblings:
        sibling.token_ids, sibling.group_id = list(seq.token_ids), group
    return seq


def test_a_client_with_nothing_running_takes_room_from_the_client_running_the_most():
    s = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=8, max_num_batched_tokens=256)
    big = [grouped(i, "big", siblings=3) for i in range(4)]          # 4 requests x n=4: 16 sequences
    for seq in big:
        s.add(seq)
    for _ in range(3):
        run_step(s)
    assert len(s.running) == 8 and all(seq.group_id == "big" for seq in s.running)
    canary = grouped(99, "canary")
    s.add(canary)
    batch = run_step(s)
    assert canary in batch.seqs
    assert {seq.request_id for seq in batch.preempted} == {"r1"}      # the newest big request, whole
    for _ in range(3):
        run_step(s)
        assert canary in s.running or canary.is_finished


def test_equal_clients_never_take_turns_preempting_each_other():
    s = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=4, max_num_batched_tokens=256)
    first, second = grouped(0, "a", siblings=3), grouped(1, "b", siblings=3)
    s.add(first)
    s.add(second)
    preempted = sum(len(run_step(s).preempted) for _ in range(20))
    assert preempted == 0 and all(seq.group_id == "a" for seq in s.running)


def test_blocks_are_taken_from_the_client_running_the_most_not_from_the_newest_sequence():
    s = make_scheduler(num_blocks=9, block_size=4, max_num_seqs=8, max_num_batched_tokens=256,
                       prefix_caching=False)
    hogs = [grouped(i, "hog", num_prompt_tokens=4) for i in range(3)]
    lone = grouped(9, "lone", num_prompt_tokens=4)                  # admitted last: the newest
    for seq in [*hogs, lone]:
        s.add(seq)
    preempted = []
    for _ in range(6):                                              # 2 blocks each, then a third
        preempted += run_step(s).preempted
    assert preempted == [hogs[-1]] and lone in s.running


def test_among_equally_served_clients_the_smaller_request_goes_first():
    s = make_scheduler(num_blocks=512, block_size=4, max_num_seqs=16, max_num_batched_tokens=4)
    large, small = grouped(0, "a", num_prompt_tokens=4, siblings=7), grouped(1, "b", num_prompt_tokens=4)
    s.add(large)
    s.add(small)
    assert run_step(s).seqs == [small]
