"""The asyncio bridge: one background thread owns the LLMEngine and drives step(); asyncio
callers talk to it through an inbox and read their request's own outbox.

    stream = await engine.add_request(prompt, params)   # admission errors raise here
    async for output in stream: ...                    # incremental RequestOutputs
    # leaving the loop early (client gone) aborts the request; its blocks are free
    # within one engine step.

Tokenization (and compiling a request's grammar) runs in a worker thread, never on the event
loop nor in the engine thread.
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
from engine.errors import EngineStoppedError, RequestFailedError, TensorParallelError
from engine.limits import GenerationStats
from engine.llm_engine import LLMEngine, StepStats
from engine.outputs import RequestOutput
from engine.sampling import SamplingParams

logger = logging.getLogger(__name__)

_STALL_SECONDS = 60.0     # a step slower than this means the engine is stuck


@dataclass(slots=True)
class _Add:
    """Prompts admitted together, all or none (one client request's)."""
    request_ids: list[str]
    prompts: list[tuple[list[int], str | None]]      # (token ids, text if given as text)
    params: SamplingParams
    arrival_time: float
    group_id: str | None
    streams: list["RequestStream"]
    admitted: asyncio.Future


@dataclass(slots=True)
class _Abort:
    request_id: str


@dataclass(slots=True)
class _Fatal:
    """The engine cannot go on (a tensor-parallel rank died): stop the loop."""
    message: str


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
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Fatal] = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # request id -> its sequences (n), while in the inbox / in the engine before its first step
        self._submitted: dict[str, int] = {}
        self._unscheduled: dict[str, int] = {}
        self._refusing = False                  # past the drain deadline: admit nothing more
        self.step_started_at: float | None = None
        self.error: BaseException | None = None
        self._death_listeners: list[Callable[[str], None]] = []
        if engine.tensor_parallel is not None:  # a rank that dies stops the loop, idle or not
            engine.tensor_parallel.add_failure_listener(lambda message: self._inbox.put(_Fatal(message)))

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, then the engine's tensor-parallel ranks (if any)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.engine.shutdown()

    def add_death_listener(self, listener: Callable[[str], None]) -> None:
        """listener(message), on the engine thread, if the engine stops for good on its own
        (EngineStoppedError: a tensor-parallel rank died); every request has failed by then."""
        self._death_listeners.append(listener)

    @property
    def is_alive(self) -> bool:
        """The loop thread runs and no step has been stuck for long."""
        if self._thread is None or not self._thread.is_alive() or self.error is not None:
            return False
        started = self.step_started_at
        return started is None or time.monotonic() - started < _STALL_SECONDS

    @property
    def num_unfinished(self) -> int:
        """Requests admitted or being admitted that have not finished."""
        with self._lock:
            return len(self._streams) + len(self._submitted)

    def stats(self) -> GenerationStats:
        """A consistent snapshot, safe from any thread."""
        with self._lock:
            waiting = len(self._submitted) + len(self._unscheduled)
            waiting_seqs = sum(self._submitted.values()) + sum(self._unscheduled.values())
            running = len(self._streams) - len(self._unscheduled)
        num_free_blocks, usage = self._block_stats
        return GenerationStats(running, waiting, waiting_seqs, num_free_blocks, usage)

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """listener(stats) after every engine step, on the engine thread."""
        self.engine.step_listeners.append(listener)

    def _publish(self, stats: StepStats) -> None:
        self._block_stats = (stats.num_free_blocks, stats.kv_cache_usage)

    # -- requests -----------------------------------------------------------------------

    async def add_request(self, prompt: str | Seq[int], params: SamplingParams,
                          request_id: str | None = None, arrival_time: float | None = None,
                          group_id: str | None = None) -> RequestStream:
        """Admit one prompt; see add_requests."""
        (stream,) = await self.add_requests([prompt], params, [request_id] if request_id else None,
                                            arrival_time, group_id)
        return stream

    async def add_requests(self, prompts: Seq[str | Seq[int]], params: SamplingParams,
                           request_ids: Seq[str] | None = None, arrival_time: float | None = None,
                           group_id: str | None = None) -> list[RequestStream]:
        """Admit prompts together, all or none, in one engine iteration (group_id: the client
        request they belong to, for fair scheduling). Raises InvalidParameter for a prompt the
        engine cannot run, EngineStoppedError when it is not running or is shutting down."""
        if not self.is_alive or self._refusing:
            raise EngineStoppedError("the engine is not running" if not self._refusing
                                     else "the server is shutting down")
        arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        request_ids = list(request_ids or [f"req-{next(self._ids)}" for _ in prompts])
        encoded = await asyncio.to_thread(self._prepare, prompts, params)
        loop = asyncio.get_running_loop()
        streams = [RequestStream(request_id, self, loop) for request_id in request_ids]
        admitted = loop.create_future()
        with self._lock:
            self._submitted.update((request_id, params.n) for request_id in request_ids)
        self._inbox.put(_Add(request_ids, encoded, params, arrival_time, group_id, streams, admitted))
        if self.error is not None:              # the loop died meanwhile: nothing will read the inbox
            self._refuse_inbox(self.error)
        try:
            await admitted                      # raises what the engine raised
        except asyncio.CancelledError:
            for request_id in request_ids:
                self.abort(request_id)
            raise
        return streams

    def _prepare(self, prompts: Seq[str | Seq[int]], params: SamplingParams) -> list[tuple[list[int], str | None]]:
        """Off the engine thread: tokenize, and compile the grammar (InvalidGrammar raises here,
        and the engine thread finds it compiled)."""
        if params.guided_decoding is not None:
            self.engine.grammars.compile(params.guided_decoding)
        return self._encode_all(prompts)

    def _encode_all(self, prompts: Seq[str | Seq[int]]) -> list[tuple[list[int], str | None]]:
        return [(self.tokenizer.encode(p), p) if isinstance(p, str) else (list(p), None) for p in prompts]

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def abort_all(self) -> None:
        """Abort every request, and refuse those still on their way in."""
        self._refusing = True
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self.abort(request_id)

    async def drain(self, timeout: float, grace: float = 2.0) -> bool:
        """Wait up to `timeout` seconds for every request to finish, then abort the rest
        (those being admitted too) and give their answers up to `grace` seconds to go out.
        True when all finished on their own. The caller stops admitting first."""
        deadline = time.monotonic() + timeout
        while self.num_unfinished and self.error is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if not self.num_unfinished:
            return True
        self.abort_all()
        deadline = time.monotonic() + grace
        while self.num_unfinished and self.is_alive and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
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
        except EngineStoppedError as exc:       # the engine cannot go on (a rank died): stop for good
            logger.error("engine stopped: %s", exc)
            self._die(exc)
        except BaseException as exc:            # a bug in the loop itself: fail everyone loudly
            logger.exception("engine loop died")
            self._die(exc)
            raise

    def _die(self, exc: BaseException) -> None:
        """Fail every request, in the engine or on its way in; tell the death listeners."""
        self.error = exc
        with self._lock:
            streams = list(self._streams.values())
            self._streams.clear()
            self._unscheduled.clear()
        for stream in streams:
            stream.put(EngineStoppedError(f"engine loop died: {exc}"))
        self._refuse_inbox(exc)
        if isinstance(exc, EngineStoppedError):
            for listener in self._death_listeners:
                listener(str(exc))

    def _refuse_inbox(self, exc: BaseException) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Add):
                with self._lock:
                    for request_id in item.request_ids:
                        self._submitted.pop(request_id, None)
                _resolve(item.admitted, EngineStoppedError(f"engine loop died: {exc}"))

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except EngineStoppedError:
            raise
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

    def _handle(self, item: _Add | _Abort | _Fatal) -> None:
        if isinstance(item, _Abort):
            self.engine.abort_request(item.request_id)
            return
        if isinstance(item, _Fatal):
            raise TensorParallelError(item.message)
        try:
            self._add_all(item)
        except Exception as exc:
            with self._lock:
                for request_id in item.request_ids:
                    self._submitted.pop(request_id, None)
            _resolve(item.admitted, exc)
            return
        with self._lock:
            for request_id, stream in zip(item.request_ids, item.streams):
                self._unscheduled[request_id] = self._submitted.pop(request_id)
                self._streams[request_id] = stream
        _resolve(item.admitted, None)

    def _add_all(self, item: _Add) -> None:
        """Every prompt of the item, or none: one that fails takes back those before it."""
        if self._refusing:
            raise EngineStoppedError("the server is shutting down")
        added = []
        try:
            for request_id, (prompt_ids, text) in zip(item.request_ids, item.prompts):
                self.engine.add_request(request_id, prompt_ids, item.params, item.arrival_time,
                                        prompt_text=text, group_id=item.group_id)
                added.append(request_id)
        except Exception:
            for request_id in added:
                self.engine.abort_request(request_id)
            raise

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        with self._lock:
            # Requests the scheduler picked up this step stop counting as waiting.
            requests = self.engine.requests
            for rid in [rid for rid in self._unscheduled
                        if rid not in requests or requests[rid].metrics.first_scheduled_time is not None]:
                del self._unscheduled[rid]
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
