"""An encoder-decoder step's metadata: the decoder's, plus the encoder inputs to run and
where every decoder query finds its sequence's encoder output.

A sequence of an encoder-decoder model owns two block tables in the one KV pool: its decoder
tokens' (`block_table`, as in any decoder) and its encoder output's (`cross_block_table`,
allocated with its first decoder block and freed with the others, engine/kv_cache.py). In the
step that admits it (`ScheduledBatch.encoder_seqs`: its first, or its first after a
preemption, which freed the blocks) its encoder input runs, packed with the other new ones,
and each decoder layer writes its cross K/V to those blocks; from then on cross-attention
only reads them.

    decoder rows:  | seq 0: 1 token | seq 1: 1 | seq 2: 1 (admitted now) | seq 3: 9 (recomputed) |
    cross keys:    | 37 encoder K/V | 12       | 20, written this step   | 8, written this step  |
    encoder rows:                              | seq 2: 20 tokens        | seq 3: 8 tokens       |
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.layers.attention import AttnMetadata, build_attn_metadata, build_cross_attn_metadata
from engine.scheduler import ScheduledBatch


@dataclass(frozen=True, slots=True)
class Seq2SeqMetadata:
    """Everything an encoder-decoder model needs for one step."""

    decoder: AttnMetadata                       # decoder self-attention over the paged cache
    cross: AttnMetadata                         # each decoder query over its sequence's cross blocks
    encoder: AttnMetadata | None = None         # the new encoder inputs, bidirectional; None: none run
    encoder_input_ids: torch.Tensor | None = None   # (num_encoder_tokens,) those inputs, packed
    cross_slot_mapping: torch.Tensor | None = None  # (num_encoder_tokens,) cache slot of each one's cross K/V


def build_seq2seq_metadata(batch: ScheduledBatch, decoder: AttnMetadata, block_size: int,
                           device: torch.device | str = "cpu") -> Seq2SeqMetadata:
    cross = build_cross_attn_metadata(
        batch.num_new_tokens, [seq.num_encoder_tokens for seq in batch.seqs],
        [seq.cross_block_table for seq in batch.seqs], block_size, device)
    if not batch.encoder_seqs:
        return Seq2SeqMetadata(decoder, cross)
    lengths = [seq.num_encoder_tokens for seq in batch.encoder_seqs]
    ids = [token for seq in batch.encoder_seqs for token in seq.encoder_token_ids]
    slots = [seq.cross_block_table[pos // block_size] * block_size + pos % block_size
             for seq in batch.encoder_seqs for pos in range(seq.num_encoder_tokens)]
    return Seq2SeqMetadata(
        decoder, cross, encoder=build_attn_metadata(lengths, lengths, None, 1, device, causal=False),
        encoder_input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        cross_slot_mapping=torch.tensor(slots, dtype=torch.long, device=device))
