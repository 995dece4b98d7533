"""The block manager: allocation, prefix caching, copy-on-write forks, and its invariants
under random operation sequences (hypothesis)."""
from conftest import make_seq
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.kv_cache import BlockManager


def check_invariants(bm: BlockManager, live_seqs) -> None:
    expected = [0] * bm.num_blocks
    for seq in live_seqs:
        for block in seq.block_table:
            expected[block] += 1
    assert bm.ref_counts == expected
    assert set(bm.free_blocks) == {b for b in range(bm.num_blocks) if expected[b] == 0}
    for block_hash, block in bm.cached_blocks.items():
        assert bm.block_hash[block] == block_hash
    assert sum(h is not None for h in bm.block_hash) == len(bm.cached_blocks)


def computed(bm: BlockManager, seq, num_tokens: int) -> None:
    """Pretend a step computed num_tokens of seq."""
    seq.num_computed_tokens += num_tokens
    bm.cache_computed_blocks(seq)


def test_allocate_is_all_or_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(0, 10)
    assert bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 1
    big = make_seq(1, 9)
    assert not bm.allocate(big, 9)
    assert big.block_table == [] and bm.num_free_blocks == 1
    bm.free(seq)
    assert bm.num_free_blocks == 4


def test_prefix_hit_reuses_full_blocks_and_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = make_seq(0, 12, first_token=5)
    assert bm.allocate(first, 12)
    computed(bm, first, 12)
    second = make_seq(0, 12, first_token=5, request_id="again")     # identical prompt
    hits = bm.find_cached_prefix(second)
    assert hits == first.block_table[:2]                              # not the last block: 1 token left
    longer = make_seq(0, 14, first_token=5, request_id="longer")
    assert bm.find_cached_prefix(longer) == first.block_table[:3]
    assert bm.allocate(longer, 2, cached=bm.find_cached_prefix(longer))
    assert longer.block_table[:3] == first.block_table and bm.ref_counts[first.block_table[0]] == 2


def test_freed_cached_blocks_stay_reusable_until_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq(0, 4)
    bm.allocate(a, 4)
    computed(bm, a, 4)
    table = list(a.block_table)
    bm.free(a)
    assert bm.find_cached_prefix(make_seq(0, 5)) == table
    # Fill the pool with other tokens: the cached blocks are evicted, oldest first.
    other = make_seq(1, 8)
    assert bm.allocate(other, 8)
    assert bm.find_cached_prefix(make_seq(0, 5)) == []
    check_invariants(bm, [other])


def test_fork_shares_blocks_and_copies_the_partial_tail_on_write():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent = make_seq(0, 6)
    bm.allocate(parent, 6)
    parent.num_computed_tokens = 6
    child = make_seq(1, 6)
    bm.fork(parent, child)
    child.num_computed_tokens = 6
    assert child.block_table == parent.block_table
    copies = []
    assert bm.allocate(child, 1, copies=copies)                      # writes into shared block 1
    assert copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]
    assert bm.allocate(parent, 1, copies=copies)                     # now the sole owner: no copy
    assert len(copies) == 1
    check_invariants(bm, [parent, child])


operation = st.tuples(st.sampled_from(["alloc", "grow", "fork", "free", "hit"]),
                      st.integers(0, 7), st.integers(1, 12))


@settings(max_examples=300, deadline=None)
@given(st.lists(operation, max_size=60), st.booleans())
def test_invariants_hold_under_random_operations(ops, prefix_caching):
    bm = BlockManager(num_blocks=12, block_size=3, enable_prefix_caching=prefix_caching)
    live = {}
    next_id = 0
    for op, slot, n in ops:
        seq = live.get(slot)
        if op == "alloc" and seq is None:
            seq = make_seq(0, n, first_token=slot % 2, request_id=f"r{next_id}")  # shared prefixes
            next_id += 1
            hits = bm.find_cached_prefix(seq)
            if bm.allocate(seq, n - len(hits) * bm.block_size, cached=hits):
                computed(bm, seq, n)
                live[slot] = seq
        elif op == "grow" and seq is not None:
            seq.token_ids += [7] * n
            if bm.allocate(seq, n, copies=[]):
                computed(bm, seq, n)
            else:
                del seq.token_ids[-n:]
        elif op == "fork" and seq is not None and (slot + 1) % 8 not in live:
            child = make_seq(next_id, 0)
            next_id += 1
            child.token_ids, child.num_prompt_tokens = list(seq.token_ids), seq.num_prompt_tokens
            bm.fork(seq, child)
            child.num_computed_tokens = seq.num_computed_tokens
            live[(slot + 1) % 8] = child
        elif op == "free" and seq is not None:
            bm.free(live.pop(slot))
        elif op == "hit":
            bm.find_cached_prefix(make_seq(0, n, first_token=slot % 2))
        check_invariants(bm, live.values())
    for seq in live.values():
        bm.free(seq)
    assert bm.num_free_blocks == bm.num_blocks
