"""The server's state: which models are loaded, whether it admits work, and its lifecycle.

    loading --(models loaded and warm)--> ready --(SIGTERM)--> draining --> stopped
        \\--(a model failed to load)--> failed

Loading runs on a daemon thread so the HTTP server answers (503) while it lasts.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, AsyncIterator, Callable, TypeVar

from fastapi import Request

from service.errors import APIError
from service.metrics import Metrics
from service.settings import Settings
from service.tokenize_pool import TokenizePool

logger = logging.getLogger("service")
T = TypeVar("T")

VERSION = "0.1.0"
# task -> (what it is called, the flag that serves it)
_TASKS = {"generate": ("generation", "--model"), "embed": ("embedding", "--embedding-model"),
          "similarity": ("embedding", "--embedding-model"),
          "classify": ("classifier", "--classifier-model"), "rerank": ("reranker", "--reranker-model"),
          "embed_sparse": ("sparse-embedding (SPLADE)", "--embedding-model and a masked-LM checkpoint"),
          "fill_mask": ("masked-LM (fill-mask)", "--embedding-model and a masked-LM checkpoint")}
# an encoder flag's role -> the tasks a model it names serves (those the checkpoint can)
_ROLE_TASKS = {"embed": ("embed", "similarity", "embed_sparse", "fill_mask"), "classify": ("classify",),
               "rerank": ("rerank",)}
_ROLE_FLAGS = {"embed": "--embedding-model", "classify": "--classifier-model", "rerank": "--reranker-model"}
_WARMUP_PROMPT = "Hello"
# After --drain-timeout, what is aborted gets this long to be answered; the process then exits.
_DRAIN_GRACE_S = 1.5


@dataclass
class RequestInfo:
    """What the request log line and the request metrics need; routes fill it in."""
    request_id: str
    route: str
    arrival: float = field(default_factory=time.monotonic)   # engine clock: TTFT and queue time
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt: str | None = None            # logged only with --log-prompts
    model: str = ""                      # the model that served it (the requests_total label)
    extra: dict[str, Any] = field(default_factory=dict)


class Server:
    def __init__(self, settings: Settings, on_fatal: Callable[[str], None] | None = None):
        self.settings = settings
        self.metrics = Metrics()
        self.status = "loading"          # loading | ready | draining | failed | stopped
        self.error: str | None = None
        self.on_fatal = on_fatal
        self.generator = None            # AsyncLLMEngine
        self.encoders: dict[str, Any] = {}   # model name -> EncoderEngine
        self.tasks: dict[str, list[str]] = {}   # task -> names of the encoders serving it, the default first
        self.model_id = settings.model or next(name for _, name, _ in settings.encoders())
        self.num_admitting = 0           # sequences past the queue check, not yet in the engine
        self.num_in_flight = 0           # requests on the model routes not yet answered (middleware)
        # Admission's tokenizing (generation, embeddings) has threads of its own; the /tokenize
        # and /detokenize routes have processes of their own (service/tokenize_pool.py), started
        # with the generation model: a flood of those holds neither this process's lock nor
        # admission's threads.
        self._admission_pool = ThreadPoolExecutor(4, thread_name_prefix="tokenize-admission")
        self.tokenize_pool: TokenizePool | None = None
        self.num_tokenizing = 0          # /tokenize and /detokenize calls running (event loop only)
        self.started_at = int(time.time())
        self._drained: asyncio.Task | None = None
        self.metrics.set_build(VERSION, self.model_id, settings.device, settings.dtype)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self) -> None:
        """Load and warm every model, then start the engine loops; never raises."""
        try:
            await _in_daemon_thread(self._load)
            if self.generator is not None:
                self.tokenize_pool = await TokenizePool.start(self.generator.tokenizer.to_json(),
                                                              self.settings.max_tokenize_concurrency)
        except Exception as exc:         # a bad checkpoint, no memory, ...
            logger.exception("loading failed")
            self.status, self.error = "failed", f"{type(exc).__name__}: {exc}"
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            return
        if self.status == "loading":     # not draining already
            self.status = "ready"
            logger.info("ready: serving %s", self.model_id)

    def _load(self) -> None:
        from engine.async_engine import AsyncLLMEngine
        from engine.llm_engine import LLMEngine
        s = self.settings
        self._load_encoders()
        if s.model is None:                    # an encoder-only server, like TEI
            self._watch_encoders()
            return
        started = time.monotonic()
        engine = LLMEngine(s.model, s.engine_config())
        _warm_up(engine)
        generator = AsyncLLMEngine(engine)
        self._watch(generator)
        limits = generator.limits
        logger.info("loaded %s on %s (%s) in %.1fs: max_model_len %d, %d KV blocks", s.model,
                    limits.device, limits.dtype, time.monotonic() - started, limits.max_model_len,
                    limits.num_blocks)
        self.generator = generator
        generator.start()

    def _load_encoders(self) -> None:
        """Every encoder flag's models (one engine per name), each serving the tasks of its
        flag that its checkpoint can; with no --classifier-model (--reranker-model) the
        embedding models classify zero-shot (rerank by cosine)."""
        roles = {role for role, _, _ in self.settings.encoders()}
        specs = self.settings.encoders() + [("classify", name, path) for role, name, path in self.settings.encoders()
                                            if role == "embed" and "classify" not in roles] \
            + [("rerank", name, path) for role, name, path in self.settings.encoders()
               if role == "embed" and "rerank" not in roles]
        for role, name, path in specs:
            if name not in self.encoders:
                self.encoders[name] = self._load_encoder(name, path)
            can = self.encoders[name].limits.tasks
            tasks = [task for task in _ROLE_TASKS[role] if task in can]
            explicit = (role, name, path) in self.settings.encoders()
            if not tasks and explicit:
                raise ValueError(f"{_ROLE_FLAGS[role]} {name}: this checkpoint serves {', '.join(sorted(can))}, "
                                 f"none of {', '.join(_ROLE_TASKS[role])}")
            for task in tasks:
                if name not in self.tasks.setdefault(task, []):
                    self.tasks[task].append(name)

    def _load_encoder(self, name: str, path: str):
        from engine.encoder_engine import EncoderEngine
        started = time.monotonic()
        encoder = EncoderEngine(path, self.settings.encoder_config(), name=name)
        encoder.start()
        encoder.warm_up()                                       # one real forward
        encoder.on_batch = partial(self.metrics.observe_embed_batch, name)
        limits = encoder.limits
        logger.info("loaded encoder %s (%s) in %.1fs: max length %d, dimension %d, serves %s", name, path,
                    time.monotonic() - started, limits.max_length, limits.hidden_size, ", ".join(sorted(limits.tasks)))
        return encoder

    def _watch_encoders(self) -> None:
        """With no generation model, engine_alive follows the encoders; the id is the first's."""
        encoders = list(self.encoders.values())
        self.model_id = self.encoder_ids().get("embed") or next(iter(self.encoders))
        self.metrics.set_build(VERSION, self.model_id, self.settings.device, self.settings.dtype)
        self.metrics.bind_engine(lambda: 0, lambda: 0, lambda: 0.0,
                                 lambda: all(encoder.is_alive for encoder in encoders))

    def _watch(self, generator) -> None:
        metrics, limits = self.metrics, generator.limits
        generator.add_step_listener(metrics.observe_step)
        generator.add_death_listener(self._generator_stopped)
        metrics.set_build(VERSION, self.model_id, limits.device, limits.dtype)
        metrics.bind_engine(lambda: generator.stats().num_running,
                            lambda: generator.stats().num_waiting,
                            lambda: generator.stats().kv_cache_usage,
                            lambda: generator.is_alive)
        self.token_text = lru_cache(maxsize=1 << 16)(
            lambda token_id: generator.tokenizer.decode([token_id], skip_special_tokens=False))

    def _generator_stopped(self, message: str) -> None:
        """The generation engine stopped for good (a tensor-parallel rank died): every request
        has failed (503), /ready and /health say 503, and the process exits non-zero."""
        if self.on_fatal is not None:
            self.on_fatal(f"the generation engine stopped: {message}")

    async def drain(self) -> None:
        """Stop admitting; let running requests finish up to --drain-timeout, abort the rest."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await asyncio.shield(self._drained)

    async def _drain(self) -> None:
        if self.status in ("loading", "ready"):
            self.status = "draining"
        timeout = self.settings.drain_timeout
        answered_by = time.monotonic() + timeout + _DRAIN_GRACE_S
        logger.info("draining: %d request(s) in flight, up to %.0fs",
                    self.generator.num_unfinished if self.generator else 0, timeout)
        # Generation and the encoders drain side by side, against the one deadline.
        await asyncio.gather(self._drain_generator(timeout), *(
            asyncio.to_thread(encoder.stop, True, timeout)
            for encoder in {id(e): e for e in self.encoders.values()}.values()))
        # What was aborted is answered (503, or a stream's error event) before the exit.
        while self.num_in_flight and time.monotonic() < answered_by:
            await asyncio.sleep(0.02)

    async def _drain_generator(self, timeout: float) -> None:
        if self.generator is not None and not await self.generator.drain(timeout, grace=_DRAIN_GRACE_S / 2):
            logger.warning("drain timeout: aborted the requests still running")

    async def stop(self) -> None:
        await self.drain()
        if self.generator is not None:
            self.generator.abort_all()
            await asyncio.sleep(0.05)    # let the loop deliver the aborts
            self.generator.stop(timeout=1.0)
        self._admission_pool.shutdown(wait=False, cancel_futures=True)
        if self.tokenize_pool is not None:
            await self.tokenize_pool.stop()
        self.status = "stopped"

    # -- tokenizer work -------------------------------------------------------------------------

    async def tokenizing(self, fn: Callable[..., T], *args: Any) -> T:
        """Admission's tokenizing, on its own threads."""
        return await asyncio.get_running_loop().run_in_executor(self._admission_pool, partial(fn, *args))

    def tokenize_slot(self) -> "TokenizeSlot":
        """A slot for one /tokenize or /detokenize call, held until its answer is sent (429
        when --max-tokenize-concurrency are busy)."""
        if self.num_tokenizing >= self.settings.max_tokenize_concurrency:
            raise self.tokenize_slots_full()
        self.num_tokenizing += 1
        return TokenizeSlot(self)

    def tokenize_slots_full(self) -> APIError:
        limit = self.settings.max_tokenize_concurrency
        return APIError(429, f"{limit} tokenize calls are running (--max-tokenize-concurrency); retry later",
                        headers={"Retry-After": "1"}, code="queue_full")

    # -- admission ----------------------------------------------------------------------------

    def require_ready(self) -> None:
        if self.status == "ready":
            return
        raise APIError(503, {
            "loading": "the model is still loading; retry shortly",
            "failed": f"the model failed to load: {self.error}",
        }.get(self.status, "the server is shutting down"), headers={"Retry-After": "1"})

    def require_generator(self) -> None:
        """Ready, and serving a generation model (an encoder-only server has none)."""
        self.require_ready()
        self.resolve_model("generate", None)

    def encoder_ids(self) -> dict[str, str]:
        """task -> the id of its default encoder (the first named), once loaded."""
        return {task: names[0] for task, names in self.tasks.items() if names}

    def served_models(self, task: str) -> list[str]:
        """Ids of the models serving a task ("generate" or an encoder task: "embed",
        "similarity", "classify", "rerank", "embed_sparse", "fill_mask"), the default first."""
        if task == "generate":
            return [self.model_id] if self.generator is not None else []
        return list(self.tasks.get(task, []))

    def encoder(self, task: str, requested: str | None = None):
        """The EncoderEngine serving `task` under the name a request gave (see resolve_model)."""
        return self.encoders[self.resolve_model(task, requested)]

    def resolve_model(self, task: str, requested: str | None) -> str:
        """The id of the model a request names; none named: the task's default (the first).
        A name no model has falls back to the one model of its task, as TGI and llama.cpp's
        server do (clients send placeholders: "gpt-3.5-turbo", "dummy"); with several of a task,
        or with --strict-model-names, it is a 404 listing them."""
        served = self.served_models(task)
        if requested in served or (requested is None and served):
            return requested or served[0]
        what, flag = _TASKS[task]
        if requested in self.encoders or (requested is not None and requested == self.model_id):
            raise APIError(404, f"the model {requested!r} does not serve {task.replace('_', ' ')}; "
                           f"{', '.join(map(repr, served)) or 'no model'} does (see /v1/models)",
                           param="model", code="model_not_found")
        if len(served) == 1 and not self.settings.strict_model_names:
            return served[0]
        if not served:
            raise APIError(404, f"this server serves no {what} model (start it with {flag})",
                           param="model", code="model_not_found")
        raise APIError(404, f"the model {requested!r} does not exist; this server serves "
                       f"{', '.join(map(repr, served))} for {what} (see /v1/models)",
                       param="model", code="model_not_found")

    @property
    def max_model_len(self) -> int:
        return self.generator.limits.max_model_len

    @property
    def tokenizer(self):
        return self.generator.tokenizer


def server_of(request: Request) -> Server:
    return request.app.state.server


def info_of(request: Request) -> RequestInfo:
    return request.scope["attnserve.info"]


class TokenizeSlot:
    """One /tokenize or /detokenize call, answered by a worker of the tokenize pool."""

    def __init__(self, server: Server):
        self.server, self.released = server, False

    async def tokenize(self, text: str, add_special_tokens: bool) -> AsyncIterator[bytes]:
        """The /tokenize answer's items as JSON, comma-joined, a piece at a time."""
        async with self.server.tokenize_pool.worker() as worker:
            async for piece in worker.call(b"T", {"add_special_tokens": add_special_tokens}, text.encode()):
                yield piece

    async def detokenize(self, ids: list[int], skip_special_tokens: bool) -> str:
        async with self.server.tokenize_pool.worker() as worker:
            pieces = [piece async for piece in worker.call(b"I", {"skip_special_tokens": skip_special_tokens},
                                                           array("q", ids).tobytes())]
        return b"".join(pieces).decode()

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.server.num_tokenizing -= 1

    async def __aenter__(self) -> "TokenizeSlot":
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.release()


def _warm_up(engine) -> None:
    """One real forward and sample, so the first client does not pay for lazy init."""
    from engine.sampling import SamplingParams
    prompt = engine.tokenizer.encode(_WARMUP_PROMPT) or [0]
    engine.add_request("warmup", prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.reset_prefix_cache()


async def _in_daemon_thread(fn: Callable[[], Any]) -> Any:
    """Like asyncio.to_thread, but a shutdown does not wait for the thread."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def run():
        try:
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(_settle, future, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, future, result, None)

    threading.Thread(target=run, name="model-loader", daemon=True).start()
    return await future


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
