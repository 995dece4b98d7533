"""The scheduler on the CPU with no model: fake sampled tokens drive it (vLLM's way)."""
from conftest import make_scheduler, make_seq

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
