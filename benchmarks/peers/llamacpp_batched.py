"""llama.cpp's own best batched throughput: its batch API (llama-cpp-python's low-level
bindings), one sequence per client, all running sequences decoding together in one
llama_decode per step, as llama.cpp's `batched` and `parallel` examples do. Greedy, EOS ignored.

    python -m benchmarks.peers.llamacpp_batched spec.json out.json

Clients are closed-loop like the HTTP ones: C slots, each taking the next prompt the moment its
previous request ends. A step carries every decoding sequence's next token, then prompt tokens
of newly admitted sequences up to spec["batch_tokens"] in all (a longer prompt continues next
step). A token's time is when the llama_decode that produced it returns: no HTTP, no
detokenization. The KV cache is split per sequence (kv_unified off: independent prompts), flash
attention as llama.cpp decides (auto), spec["threads"] threads for decode and prefill.
"""
from __future__ import annotations

import logging
import sys
import time
from collections import deque
from dataclasses import dataclass, field

import llama_cpp as L
import numpy as np

from benchmarks.peers.clients import RequestRecord, read_spec, write_results

logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)      # llama.cpp's own log lines


@dataclass
class Slot:
    seq_id: int
    index: int = -1                      # which prompt it serves; -1: free
    record: RequestRecord | None = None
    pending: list[int] = field(default_factory=list)   # prompt tokens not yet decoded
    pos: int = 0                         # the next token's position
    last_token: int = 0
    num_generated: int = 0

    @property
    def is_free(self) -> bool:
        return self.index < 0


class BatchedLlama:
    def __init__(self, gguf: str, threads: int, batch_tokens: int):
        L.llama_backend_init()
        self.model = L.llama_model_load_from_file(gguf.encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        self.vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.threads, self.batch_tokens = threads, batch_tokens

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buf = (L.llama_token * (len(data) + 8))()
        n = L.llama_tokenize(self.vocab, data, len(data), buf, len(buf), True, False)
        return list(buf[:n])

    def new_context(self, num_seqs: int, tokens_per_seq: int):
        p = L.llama_context_default_params()
        p.n_seq_max = num_seqs
        p.n_ctx = num_seqs * tokens_per_seq             # split evenly: each sequence gets its share
        p.n_batch = p.n_ubatch = self.batch_tokens
        p.n_threads = p.n_threads_batch = self.threads
        p.kv_unified = False
        ctx = L.llama_init_from_model(self.model, p)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        return ctx

    def run_level(self, prompts: list[list[int]], concurrency: int, output_len: int,
                  warmup: list[int]) -> list[RequestRecord]:
        assert concurrency < self.batch_tokens, "every decoding sequence must fit one batch"
        longest = max(len(p) for p in [*prompts, warmup]) + output_len
        tokens_per_seq = -(-longest // 256) * 256          # llama.cpp rounds each share to 256
        ctx = self.new_context(concurrency, tokens_per_seq)
        batch = L.llama_batch_init(self.batch_tokens, 0, 1)
        try:
            self._serve(ctx, batch, [warmup], 1, 4)     # first decodes of a new context are slower
            L.llama_memory_clear(L.llama_get_memory(ctx), True)
            return self._serve(ctx, batch, prompts, concurrency, output_len)
        finally:
            L.llama_batch_free(batch)
            L.llama_free(ctx)

    def _serve(self, ctx, batch, prompts, concurrency: int, output_len: int) -> list[RequestRecord]:
        memory = L.llama_get_memory(ctx)
        records: list[RequestRecord | None] = [None] * len(prompts)
        waiting = deque(enumerate(prompts))
        slots = [Slot(seq_id) for seq_id in range(concurrency)]
        while waiting or not all(s.is_free for s in slots):
            now = time.perf_counter()
            for s in slots:                            # admit: a free client sends its next request
                if s.is_free and waiting:
                    s.index, prompt = waiting.popleft()
                    s.record, s.pending, s.pos, s.num_generated = RequestRecord(start=now), list(prompt), 0, 0
            sampling_rows = self._fill(batch, slots)
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed (KV cache full?)")
            now = time.perf_counter()
            for s, row in sampling_rows:
                logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, row), shape=(self.n_vocab,))
                s.last_token = int(logits.argmax())    # greedy; EOS is just another token
                s.num_generated += 1
                s.record.chunk_times.append(now)
                if s.num_generated == output_len:
                    s.record.end, s.record.num_tokens = now, output_len
                    records[s.index] = s.record
                    L.llama_memory_seq_rm(memory, s.seq_id, -1, -1)
                    s.index = -1
        return records

    def _fill(self, batch, slots: list[Slot]) -> list[tuple[Slot, int]]:
        """Decoding sequences' next tokens first, then prompt chunks; (slot, batch row) for each
        row whose logits are sampled after this step."""
        rows: list[tuple[Slot, int]] = []
        n = 0

        def add(token: int, slot: Slot, wants_logits: bool) -> None:
            nonlocal n
            batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, slot.pos, 1
            batch.seq_id[n][0], batch.logits[n] = slot.seq_id, wants_logits
            slot.pos += 1
            if wants_logits:
                rows.append((slot, n))
            n += 1

        for s in slots:
            if not s.is_free and not s.pending:
                add(s.last_token, s, True)
        for s in slots:
            if s.pending and n < self.batch_tokens:
                chunk, s.pending = s.pending[: self.batch_tokens - n], s.pending[self.batch_tokens - n:]
                for j, token in enumerate(chunk):
                    add(token, s, not s.pending and j == len(chunk) - 1)
        batch.n_tokens = n
        return rows


def main(spec_path: str, out_path: str) -> None:
    spec = read_spec(spec_path)
    llama = BatchedLlama(spec["gguf"], spec["threads"], spec.get("batch_tokens", 512))
    warmup = llama.tokenize(spec["warmup"])
    results = []
    for level in spec["levels"]:
        prompts = [llama.tokenize(p) for p in level["prompts"]]
        records = llama.run_level(prompts, level["concurrency"], spec["output_len"], warmup)
        results.append((level["concurrency"], records))
    write_results(out_path, results, {"llama_cpp": L.__version__, "threads": spec["threads"]})
    L.llama_model_free(llama.model)


if __name__ == "__main__":
    main(*sys.argv[1:3])
