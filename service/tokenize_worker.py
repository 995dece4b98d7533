"""The child process that answers /tokenize and /detokenize (service/tokenize_pool.py starts it).

In the server's own process this work starved everything else: tokenizing 1 MB of text and
writing its ~10 MB JSON answer holds Python's lock for most of a second, so while 20 clients
sent such bodies `/health` waited up to 0.7 s (BENCHMARKS.md, "Hostile load"). Here it holds
only this process's lock, at a lower CPU priority than the server.

The protocol, over stdin / stdout, is frames of (1 byte kind, 4 bytes little-endian length,
payload). The first frame in (b"C") is the tokenizer's JSON (tokenizers' `to_str()`), answered
by b"R" once it is loaded; then, per call:

    in:  b"T" {"add_special_tokens": bool}, then b"D" the text in UTF-8
         b"I" {"skip_special_tokens": bool}, then b"D" the ids as int64 (native byte order)
    out: b"P" pieces of the answer (for T, the JSON list's items, comma-joined, without the
         brackets; for I, the text in UTF-8), then b"E" (done) or b"X" an error message.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from array import array
from functools import lru_cache
from typing import BinaryIO, Iterator

import tokenizers

HEADER = struct.Struct("<cI")                # kind, payload length
TOKENS_PER_PIECE = 8192
# Below the server's threads: when the CPU is short, the event loop and the engine go first.
NICENESS = 10


def read_frame(stream: BinaryIO) -> tuple[bytes, bytes] | None:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        return None                                  # the server closed our stdin: exit
    kind, length = HEADER.unpack(header)
    payload = stream.read(length)
    if len(payload) < length:
        return None
    return kind, payload


def write_frame(stream: BinaryIO, kind: bytes, payload: bytes = b"") -> None:
    stream.write(HEADER.pack(kind, len(payload)))
    stream.write(payload)


class Worker:
    def __init__(self, tokenizer_json: str):
        self.backend = tokenizers.Tokenizer.from_str(tokenizer_json)
        self.token_text = lru_cache(maxsize=1 << 16)(
            lambda token_id: self.backend.decode([token_id], skip_special_tokens=False))

    def tokenize(self, text: str, add_special_tokens: bool) -> Iterator[bytes]:
        """The /tokenize answer's items, a piece at a time: id, text and character offsets
        (an added special token, with no span, gets its own text and offsets 0, 0)."""
        encoding = self.backend.encode(text, add_special_tokens=add_special_tokens)
        ids = encoding.ids
        for first in range(0, len(ids), TOKENS_PER_PIECE):
            items = []
            for index in range(first, min(first + TOKENS_PER_PIECE, len(ids))):
                start, stop = encoding.token_to_chars(index) or (0, 0)
                piece = text[start:stop] if stop > start else self.token_text(ids[index])
                items.append({"id": ids[index], "text": piece, "start": start, "stop": stop})
            yield json.dumps(items, ensure_ascii=False, separators=(",", ":"))[1:-1].encode()

    def detokenize(self, ids: list[int], skip_special_tokens: bool) -> Iterator[bytes]:
        yield self.backend.decode(ids, skip_special_tokens=skip_special_tokens).encode()


def serve(stdin: BinaryIO, stdout: BinaryIO) -> None:
    first = read_frame(stdin)
    if first is None:
        return
    worker = Worker(first[1].decode())
    write_frame(stdout, b"R")                        # loaded, and niced: ready
    stdout.flush()
    while (call := read_frame(stdin)) is not None and (data := read_frame(stdin)) is not None:
        (kind, options), (_, payload) = call, data
        try:
            options = json.loads(options)
            if kind == b"T":
                pieces = worker.tokenize(payload.decode(), options["add_special_tokens"])
            else:
                pieces = worker.detokenize(array("q", payload).tolist(), options["skip_special_tokens"])
            for piece in pieces:
                write_frame(stdout, b"P", piece)
            write_frame(stdout, b"E")
        except Exception as exc:                     # an answer, never a dead worker
            write_frame(stdout, b"X", f"{type(exc).__name__}: {exc}".encode())
        stdout.flush()


def main() -> None:
    os.nice(NICENESS)
    serve(sys.stdin.buffer, sys.stdout.buffer)


if __name__ == "__main__":
    main()
