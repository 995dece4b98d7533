"""The asyncio bridge: one background thread owns the LLMEngine and drives step(); asyncio
callers talk to it through an inbox and read their request's own outbox.

    stream = await engine.add_request(prompt, params)   # admission errors raise here
    async for output in stream: ...                    # incremental RequestOutputs
    # leaving the loop early (client gone) aborts the request; its blocks are free
    # within one engine step.

Tokenization runs in a worker thread, never on the event loop nor in the engine thread.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Callable
from typing import Sequence as Seq

from engine.device import use_cpu_threads
from engine.errors import EngineStoppedError, RequestFailedError
from engine.limits import GenerationStats
from engine.llm_engine import LLMEngine, StepStats
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

_STALL_SECONDS = 60.0     # a step slower than this means the engine is stuck


@dataclass(slots=True)
class _Add:
    request_id: str
    prompt_ids: list[int]
    prompt: str | None
    params: SamplingParams
    arrival_time: float
    group_id: str | None
    stream: "RequestStream"
    admitted: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


class RequestStream:
    """Async iterator of one request's outputs; abandoning it aborts the request."""

    def __init__(self, request_id: str, engine: "AsyncLLMEngine", loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self):
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:                  # cancelled: the client is gone
            self.abort()
            raise
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
            if item.error:
                raise RequestFailedError(item.error)
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.limits = engine.limits
        # (free blocks, usage) as of the last step; the engine thread replaces it whole.
        self._block_stats = (engine.block_manager.num_free_blocks, engine.block_manager.usage)
        engine.step_listeners.append(self._publish)
        self._inbox: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._num_submitted = 0                 # in the inbox, not yet handed to the engine
        self._unscheduled: set[str] = set()     # in the engine, not yet given a first step
        self.step_started_at: float | None = None
        self.error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def is_alive(self) -> bool:
        """The loop thread runs and no step has been stuck for long."""
        if self._thread is None or not self._thread.is_alive() or self.error is not None:
            return False
        started = self.step_started_at
        return started is None or time.monotonic() - started < _STALL_SECONDS

    @property
    def num_waiting(self) -> int:
        """Requests accepted and not yet scheduled: what --max-queue bounds."""
        with self._lock:
            return self._num_submitted + len(self._unscheduled)

    @property
    def num_running(self) -> int:
        with self._lock:
            return len(self._streams) - len(self._unscheduled)

    @property
    def num_unfinished(self) -> int:
        return len(self._streams)

    def stats(self) -> GenerationStats:
        """A consistent snapshot, safe from any thread."""
        with self._lock:
            waiting = self._num_submitted + len(self._unscheduled)
            running = len(self._streams) - len(self._unscheduled)
        num_free_blocks, usage = self._block_stats
        return GenerationStats(running, waiting, num_free_blocks, usage)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """listener(stats) after every engine step, on the engine thread."""
        self.engine.step_listeners.append(listener)

    def _publish(self, stats: StepStats) -> None:
        self._block_stats = (stats.num_free_blocks, stats.kv_cache_usage)

    # -- requests -----------------------------------------------------------------------

    async def add_request(self, prompt: str | Seq[int], params: SamplingParams,
                          request_id: str | None = None, arrival_time: float | None = None,
                          group_id: str | None = None) -> RequestStream:
        """Admit a request (group_id: the client request it belongs to, for fair scheduling).
        InvalidParameter for a prompt the engine cannot run."""
        if not self.is_alive:
            raise EngineStoppedError("the engine loop is not running")
        arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        request_id = request_id or f"req-{next(self._ids)}"
        text = prompt if isinstance(prompt, str) else None
        prompt_ids = (await asyncio.to_thread(self.tokenizer.encode, prompt)
                      if text is not None else list(prompt))
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, self, loop)
        admitted = loop.create_future()
        with self._lock:
            self._num_submitted += 1
        self._inbox.put(_Add(request_id, prompt_ids, text, params, arrival_time, group_id, stream, admitted))
        try:
            await admitted                      # raises what add_request raised
        except asyncio.CancelledError:
            self.abort(request_id)
            raise
        return stream

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def abort_all(self) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self.abort(request_id)

    async def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every request to finish, then abort the rest.
        True when all finished on their own. The caller stops admitting first."""
        deadline = time.monotonic() + timeout
        while self.num_unfinished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.num_unfinished:
            return True
        self.abort_all()
        while self.num_unfinished and self.is_alive:
            await asyncio.sleep(0.05)
        return False

    # -- the engine thread --------------------------------------------------------------

    def _loop(self) -> None:
        use_cpu_threads(self.engine.num_threads)
        try:
            while not self._stop.is_set():
                self._drain_inbox(block=not self.engine.has_unfinished_requests())
                if self.engine.has_unfinished_requests():
                    self.step_started_at = time.monotonic()
                    self._deliver(self._step())
                    self.step_started_at = None
        except BaseException as exc:            # a bug in the loop itself: fail everyone loudly
            logger.exception("engine loop died")
            self.error = exc
            for stream in list(self._streams.values()):
                stream.put(EngineStoppedError(f"engine loop died: {exc}"))
            raise

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as exc:
            logger.exception("engine step failed; failing the requests in flight")
            return self.engine.fail_all(f"{type(exc).__name__}: {exc}")

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.2) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item: _Add | _Abort) -> None:
        if isinstance(item, _Abort):
            self.engine.abort_request(item.request_id)
            return
        try:
            self.engine.add_request(item.request_id, item.prompt_ids, item.params, item.arrival_time,
                                    prompt_text=item.prompt, group_id=item.group_id)
        except Exception as exc:
            with self._lock:
                self._num_submitted -= 1
            _resolve(item.admitted, exc)
            return
        with self._lock:
            self._num_submitted -= 1
            self._unscheduled.add(item.request_id)
            self._streams[item.request_id] = item.stream
        _resolve(item.admitted, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            # Requests the scheduler picked up this step stop counting as waiting.
            self._unscheduled -= {rid for rid in self._unscheduled
                                  if rid not in self.engine.requests
                                  or self.engine.requests[rid].metrics.first_scheduled_time is not None}
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                if output.finished:
                    del self._streams[output.request_id]
                stream.put(output)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    def set_result():
        if future.done():
            return
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
    future.get_loop().call_soon_threadsafe(set_result)
