"""The block manager: which KV blocks each sequence owns. Integers only, no torch.

Invariants (checked by the property tests):
- every block is either free (ref count 0, in `free_blocks`) or referenced (ref count =
  the number of block tables holding it), never both;
- a block in the prefix cache holds exactly the tokens its hash names. Its hash chains over
  every earlier block of the sequence: hash((parent hash, block tokens)). An encoder-decoder
  sequence's chain starts from its encoder input (decoder K/V depend on it), so two requests
  share decoder blocks only when they encode the same input.

An encoder-decoder sequence also owns `cross_block_table`: blocks for its encoder output's K/V,
taken with its first decoder block (all or nothing) and freed with the rest. They are never
cached: they go back at the front of the free list, to be reused before any cached block.

Freed blocks keep their cached contents and sit in `free_blocks` in least-recently-freed
order; a new allocation takes the oldest and only then forgets what it held (LRU eviction).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence as Seq

from engine.sequence import Sequence

_ROOT_HASH = 0


def ceil_div(a: int, b: int) -> int:
    """Blocks of size b that hold a tokens."""
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached_blocks: dict[int, int] = {}        # hash -> block id

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free_blocks) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return ceil_div(num_tokens, self.block_size)

    # -- prefix cache -------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks holding the longest cached prefix of seq's tokens (not yet claimed).

        At least one token is always left to compute: its logits start the generation.
        """
        if not self.enable_prefix_caching:
            return []
        self._hash_full_blocks(seq)
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits = []
        for block_hash in seq.block_hashes[:max_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def cache_computed_blocks(self, seq: Sequence) -> None:
        """Publish seq's full, computed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        self._hash_full_blocks(seq)
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        for i in range(num_full):
            block, block_hash = seq.block_table[i], seq.block_hashes[i]
            if self.block_hash[block] is None and block_hash not in self.cached_blocks:
                self.block_hash[block] = block_hash
                self.cached_blocks[block_hash] = block

    def _hash_full_blocks(self, seq: Sequence) -> None:
        size = self.block_size
        root = hash(tuple(seq.encoder_token_ids)) if seq.encoder_token_ids else _ROOT_HASH
        parent = seq.block_hashes[-1] if seq.block_hashes else root
        for i in range(len(seq.block_hashes), seq.num_tokens // size):
            parent = hash((parent, tuple(seq.token_ids[i * size: (i + 1) * size])))
            seq.block_hashes.append(parent)

    # -- allocation ---------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int, cached: Seq[int] = (),
                 copies: list[tuple[int, int]] | None = None) -> bool:
        """Give seq blocks for `cached` (prefix hits, appended to its table) plus
        num_new_tokens more tokens. All or nothing: False leaves everything unchanged.

        A shared, partly filled last block about to be written is replaced by a private
        copy first; the (source, destination) pair is appended to `copies`.
        """
        num_tokens = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        num_new_blocks = self.blocks_needed(num_tokens) - len(seq.block_table) - len(cached)
        num_cross_blocks = self.num_missing_cross_blocks(seq)
        needs_copy = self._needs_copy_on_write(seq, num_new_tokens)
        claimed_free = sum(1 for b in cached if self.ref_counts[b] == 0)
        if needs_copy and copies is None:
            raise ValueError("a copy-on-write needs a `copies` list")
        if max(num_new_blocks, 0) + num_cross_blocks + claimed_free + needs_copy > self.num_free_blocks:
            return False
        if needs_copy:
            source = seq.block_table[-1]
            self.ref_counts[source] -= 1
            seq.block_table[-1] = self._take_free_block()
            copies.append((source, seq.block_table[-1]))
        for block in cached:
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
        seq.block_table.extend(cached)
        seq.block_table.extend(self._take_free_block() for _ in range(num_new_blocks))
        seq.cross_block_table.extend(self._take_free_block() for _ in range(num_cross_blocks))
        return True

    def num_missing_cross_blocks(self, seq: Sequence) -> int:
        """Blocks an encoder-decoder sequence still needs for its encoder output: all of them
        until it is first given blocks, none after (0 for decoder-only sequences)."""
        return 0 if seq.cross_block_table else self.blocks_needed(seq.num_encoder_tokens)

    def _needs_copy_on_write(self, seq: Sequence, num_new_tokens: int) -> bool:
        partial = seq.num_computed_tokens % self.block_size
        return (num_new_tokens > 0 and partial != 0 and len(seq.block_table) > 0
                and len(seq.block_table) == self.blocks_needed(seq.num_computed_tokens)
                and self.ref_counts[seq.block_table[-1]] > 1)

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old_hash = self.block_hash[block]
        if old_hash is not None:                        # evict what it cached
            del self.cached_blocks[old_hash]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """child shares every block of parent (n > 1 completions of one prompt)."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        for block in parent.cross_block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.cross_block_table = list(parent.cross_block_table)

    def free(self, seq: Sequence) -> None:
        # Tail blocks are freed first so they are evicted before the prefix others may share.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        for block in seq.cross_block_table:             # nothing cached: reused first
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
                self.free_blocks.move_to_end(block, last=False)
        seq.cross_block_table = []

    def reset_prefix_cache(self) -> None:
        for block, block_hash in enumerate(self.block_hash):
            if block_hash is not None and self.ref_counts[block] == 0:
                del self.cached_blocks[block_hash]
                self.block_hash[block] = None
