"""The /tokenize and /detokenize worker processes (service/tokenize_pool.py): what they answer,
and that a worker left in a bad state is replaced, never reused."""
from __future__ import annotations

import asyncio
from array import array
import json
import os
import signal

import pytest

from engine.tokenizer import Tokenizer
from service import tokenize_worker
from service.tokenize_pool import TokenizePool, TokenizeWorkerError


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoints) -> Tokenizer:
    return Tokenizer.from_dir(tiny_checkpoints["llama"])


def run(scenario):
    return asyncio.run(scenario)


async def tokenize(pool: TokenizePool, text: str, add_special_tokens: bool = True) -> list[dict]:
    async with pool.worker() as worker:
        pieces = [piece async for piece in worker.call(b"T", {"add_special_tokens": add_special_tokens},
                                                       text.encode())]
    return json.loads(b"[" + b",".join(pieces) + b"]")


def expected_items(tokenizer: Tokenizer, text: str) -> list[dict]:
    """What TGI's /tokenize answers: each id with its text and character offsets."""
    items = []
    for token_id, start, stop in tokenizer.encode_with_offsets(text):
        piece = text[start:stop] if stop > start else tokenizer.decode([token_id], skip_special_tokens=False)
        items.append({"id": token_id, "text": piece, "start": start, "stop": stop})
    return items


def test_tokenize_answers_every_token_with_its_text_and_offsets(tokenizer):
    text = "The cat sat on the mat. 日本語 e\u0301 🎉 " * 700                # several pieces of 8192 tokens

    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 1)
        try:
            return await tokenize(pool, text), await tokenize(pool, "")
        finally:
            await pool.stop()

    items, empty = run(scenario())
    assert len(items) > 2 * tokenize_worker.TOKENS_PER_PIECE
    assert items == expected_items(tokenizer, text)
    assert empty == expected_items(tokenizer, "")


def test_detokenize_answers_the_decoded_text(tokenizer):
    ids = tokenizer.encode("Once upon a time there was a tiny model. " * 50)

    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 1)
        try:
            async with pool.worker() as worker:
                pieces = [p async for p in worker.call(b"I", {"skip_special_tokens": True},
                                                       array("q", ids).tobytes())]
            return b"".join(pieces).decode()
        finally:
            await pool.stop()

    assert run(scenario()) == tokenizer.decode(ids)


def test_an_error_is_answered_and_the_worker_serves_on(tokenizer):
    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 1)
        try:
            first = pool.workers[0]
            with pytest.raises(TokenizeWorkerError, match="KeyError"):
                async with pool.worker() as worker:
                    [p async for p in worker.call(b"T", {}, b"no options")]
            items = await tokenize(pool, "The cat")
            return items, pool.workers == [first] and first.process.returncode is None
        finally:
            await pool.stop()

    items, same_worker = run(scenario())
    assert items == expected_items(tokenizer, "The cat") and same_worker


def test_a_worker_that_dies_mid_call_fails_that_call_and_is_replaced(tokenizer):
    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 1)
        try:
            with pytest.raises(TokenizeWorkerError, match="exited"):
                async with pool.worker() as worker:
                    os.kill(worker.process.pid, signal.SIGKILL)
                    [p async for p in worker.call(b"T", {"add_special_tokens": True}, b"The cat " * 10_000)]
            return await tokenize(pool, "The dog")
        finally:
            await pool.stop()

    assert run(scenario()) == expected_items(tokenizer, "The dog")


def test_an_answer_left_half_read_never_reaches_the_next_call(tokenizer):
    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 1)
        try:
            async with pool.worker() as worker:
                pieces = worker.call(b"T", {"add_special_tokens": True}, ("The cat sat. " * 20_000).encode())
                await anext(pieces)                 # the client left after the first piece
                await pieces.aclose()
                abandoned = worker
            items = await tokenize(pool, "The dog")
            return items, abandoned.process.returncode, abandoned in pool.workers
        finally:
            await pool.stop()

    items, returncode, still_pooled = run(scenario())
    assert items == expected_items(tokenizer, "The dog")
    assert returncode is not None and not still_pooled


def test_workers_run_below_the_server_and_stop_with_it(tokenizer):
    async def scenario():
        pool = await TokenizePool.start(tokenizer.to_json(), 2)
        pids = [worker.process.pid for worker in pool.workers]
        niceness = [os.getpriority(os.PRIO_PROCESS, pid) for pid in pids]
        await pool.stop()
        return niceness, [worker.process.returncode for worker in pool.workers]

    niceness, returncodes = run(scenario())
    assert niceness == [min(os.getpriority(os.PRIO_PROCESS, 0) + tokenize_worker.NICENESS, 19)] * 2
    assert returncodes == [0, 0]
