"""The processes that answer /tokenize and /detokenize (service/tokenize_worker.py), one call
at a time each; --max-tokenize-concurrency of them.

They run outside the server's process so that their Python work never holds its lock: the
event loop (`/health`, every stream) and the engine's thread keep running however large the
texts are. A worker whose call did not end cleanly (the client left mid-answer, the process
died) is replaced rather than reused: its pipe may still hold the old answer.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from typing import AsyncIterator

from service.tokenize_worker import HEADER, write_frame

logger = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 2.0


class TokenizeWorkerError(RuntimeError):
    """The worker answered an error, or died mid-call."""


class TokenizeProcess:
    def __init__(self, process: asyncio.subprocess.Process):
        self.process = process
        self.clean = True                   # no call left half-read

    @classmethod
    async def start(cls, tokenizer_json: bytes) -> "TokenizeProcess":
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service.tokenize_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        worker = cls(process)
        write_frame(process.stdin, b"C", tokenizer_json)
        await process.stdin.drain()
        await worker._read_frame()                  # b"R": loaded (a tokenizer it cannot load: EOF)
        return worker

    async def call(self, kind: bytes, options: dict, data: bytes) -> AsyncIterator[bytes]:
        """The answer's pieces as the worker writes them."""
        self.clean = False
        try:
            write_frame(self.process.stdin, kind, json.dumps(options).encode())
            write_frame(self.process.stdin, b"D", data)
            await self.process.stdin.drain()
            while True:
                kind, payload = await self._read_frame()
                if kind == b"E":
                    self.clean = True
                    return
                if kind == b"X":
                    self.clean = True
                    raise TokenizeWorkerError(payload.decode(errors="replace"))
                yield payload
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            raise TokenizeWorkerError(f"the tokenizer process exited ({self.process.returncode})") from exc

    async def _read_frame(self) -> tuple[bytes, bytes]:
        kind, length = HEADER.unpack(await self.process.stdout.readexactly(HEADER.size))
        return kind, await self.process.stdout.readexactly(length)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.stdin.close()      # the worker exits at the end of its input
            try:
                await asyncio.wait_for(self.process.wait(), _STOP_TIMEOUT_S)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()


class TokenizePool:
    def __init__(self, tokenizer_json: bytes, workers: list[TokenizeProcess]):
        self.tokenizer_json = tokenizer_json
        self.workers = workers              # every live worker, busy or idle
        self._idle: asyncio.Queue[TokenizeProcess] = asyncio.Queue()
        self._restarts: set[asyncio.Task] = set()     # held: the loop keeps only weak references
        for worker in workers:
            self._idle.put_nowait(worker)

    @classmethod
    async def start(cls, tokenizer_json: str, size: int) -> "TokenizePool":
        data = tokenizer_json.encode()
        return cls(data, list(await asyncio.gather(*(TokenizeProcess.start(data) for _ in range(size)))))

    @contextlib.asynccontextmanager
    async def worker(self) -> AsyncIterator[TokenizeProcess]:
        worker = await self._idle.get()
        try:
            yield worker
        finally:
            if worker.clean and worker.process.returncode is None:
                self._idle.put_nowait(worker)
            else:
                task = asyncio.ensure_future(self._replace(worker))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def _replace(self, worker: TokenizeProcess) -> None:
        if worker.process.returncode is None:
            worker.process.kill()
        await worker.process.wait()
        self.workers.remove(worker)
        try:
            fresh = await TokenizeProcess.start(self.tokenizer_json)
        except Exception:               # the pool serves on with one worker fewer
            logger.exception("could not restart a tokenizer process")
            return
        self.workers.append(fresh)
        self._idle.put_nowait(fresh)

    async def stop(self) -> None:
        await asyncio.gather(*(worker.stop() for worker in list(self.workers)), return_exceptions=True)
