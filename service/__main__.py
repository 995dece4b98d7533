"""`python -m service`: run the server (flags, or ATTNSERVE_* environment variables).

SIGTERM / SIGINT drain first: the server answers 503 to new requests (and /ready goes 503)
while running requests finish, up to --drain-timeout; then uvicorn stops and the process
exits 0. A second signal stops at once. A model that fails to load exits 1.
"""
from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
from types import FrameType

import uvicorn
from pydantic import ValidationError
from uvicorn.protocols.http.auto import AutoHTTPProtocol

# Before torch loads OpenMP: idle OpenMP workers spin by default, and in a server their
# spinning steals the cores the event loop, the clients and the encoder need (engine steps
# measured 3-5x slower under HTTP load); passive waiting cost nothing measurable alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from service.app import create_app  # noqa: E402  (imports torch)
from service.settings import Settings, load_settings  # noqa: E402

logger = logging.getLogger("service")
_FAIL_EXIT_GRACE_S = 30.0      # past --drain-timeout, how long a fatal error's shutdown may take


class DrainingServer(uvicorn.Server):
    """uvicorn, with a drain between the signal and the shutdown."""

    def __init__(self, config: uvicorn.Config, app_server):
        super().__init__(config)
        self.app_server = app_server
        self.exit_code = 0
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if self._draining or loop is None:
            self.should_exit = True               # a second signal: stop now
            self.force_exit = self._draining and sig == signal.SIGINT
            return
        self._draining = True
        logger.info("received %s: draining", signal.Signals(sig).name)
        loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self._drain()))

    async def _drain(self) -> None:
        try:
            await self.app_server.drain()
        except Exception:
            logger.exception("drain failed")
        self.should_exit = True                   # no signal is re-raised: the process exits 0

    def fail(self, message: str) -> None:
        logger.error("exiting: %s", message)
        self.exit_code = 1
        self.should_exit = True
        # Should the shutdown itself hang (a collective stuck on a dead GPU rank), exit anyway.
        deadline = self.app_server.settings.drain_timeout + _FAIL_EXIT_GRACE_S
        watchdog = threading.Timer(deadline, _exit_now, args=(deadline,))
        watchdog.daemon = True
        watchdog.start()


def _exit_now(deadline: float) -> None:
    logger.error("still running %.0fs after a fatal error: exiting now", deadline)
    logging.shutdown()
    os._exit(1)


class ReadTimeoutProtocol(AutoHTTPProtocol):
    """uvicorn's HTTP protocol (httptools or h11) with a deadline on each request's head: a
    connection that has not sent a whole request line and headers `read_timeout` seconds after
    it opened, or after its previous answer, is closed. (uvicorn only times out a keep-alive
    connection that stays silent, and stops that clock at the first byte: a client sending one
    header a minute would hold a connection, and a file descriptor, forever.) The deadline on
    the body is the middleware's."""
    read_timeout = 60.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._start_head_clock()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._start_head_clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_clock()
        super().connection_lost(exc)

    def _start_head_clock(self) -> None:
        self._stop_head_clock()
        if self.read_timeout:
            self._head_timer = self.loop.call_later(self.read_timeout, self._head_timed_out)

    def _stop_head_clock(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        head_received = self.cycle is not None and not self.cycle.response_complete
        if not head_received and not self.transport.is_closing():
            self.transport.close()


def steady_malloc() -> None:
    """glibc: two malloc arenas, and blocks of 4 MiB and more mmapped (so given back when freed).

    By default glibc keeps an arena per thread and raises its mmap threshold up to 32 MiB after
    each large free, so the tensors of prefill, decode and encoder batches of ever-new shapes are
    carved from heaps that fragment: a 10-minute soak grew RSS 7.6% (1727 -> 1858 MiB), for no
    leak; with two arenas and a fixed threshold, +0.75%, at the same throughput. The threshold
    was 128 KiB; then every activation of an encoder batch (a 16-sentence batch's are 0.5-2 MB)
    was a fresh mmap, zeroed page by page by the kernel: 3.4 ms of kernel time per one-sentence
    /embed request under load, 1.0 ms at 4 MiB. The trim threshold keeps 8 MiB of free heap top
    for the next batch rather than returning and faulting it in again. MALLOC_ARENA_MAX or
    MALLOC_MMAP_THRESHOLD_ in the environment win."""
    if "MALLOC_ARENA_MAX" in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:                          # not glibc: nothing to tune
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 4 * 2**20)
    libc.mallopt(m_trim_threshold, 8 * 2**20)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    try:
        settings: Settings = load_settings(argv)
    except ValidationError as exc:
        for error in exc.errors():
            where = ".".join(map(str, error["loc"])) or "settings"
            print(f"python -m service: {where}: {error['msg']}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        launched = _launched_rank(settings)
    except ValueError as exc:
        print(f"python -m service: {exc}", file=sys.stderr)
        return 2
    if launched is not None and launched != 0:     # torchrun: this process serves one shard
        return _serve_rank(settings)
    steady_malloc()
    logger.info("starting with %s", settings)
    holder: dict[str, DrainingServer] = {}
    app = create_app(settings, on_fatal=lambda message: holder["server"].fail(message))
    protocol = type("ReadTimeoutProtocol", (ReadTimeoutProtocol,), {"read_timeout": settings.read_timeout})
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            access_log=False, timeout_graceful_shutdown=10, lifespan="on",
                            log_config=None, http=protocol)
    server = holder["server"] = DrainingServer(config, app.state.server)
    server.run()
    return server.exit_code


def _launched_rank(settings: Settings) -> int | None:
    """The rank torchrun gave this process (None: not launched); the launch must match the flags."""
    from engine.tp_worker import check_launch, launched_rank
    rank = launched_rank()
    if rank is not None:
        check_launch(settings.tensor_parallel_size)
        for handler in logging.getLogger().handlers:
            handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s"))
    return rank


def _serve_rank(settings: Settings) -> int:
    """Rank 1.. under torchrun: load this rank's shard and run rank 0's steps; no HTTP."""
    from engine.tp_worker import serve_rank
    try:
        serve_rank(settings.model, settings.engine_config())
    except Exception:
        logger.exception("this tensor-parallel rank failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
