"""Tensor-parallel ranks over torch.distributed: nccl on CUDA, gloo on the CPU.

`LLM(..., tensor_parallel_size=N)` / `--tensor-parallel-size N`. The engine's process is rank
0: it starts ranks 1..N-1 itself, as `torch.multiprocessing` (spawn) workers that join a process
group on a free loopback port. Each rank builds its shard of the model (engine/layers/parallel.py)
and of the KV cache, then runs the steps rank 0 broadcasts (engine/parallel_runner.py) until
rank 0 tells it to stop. Under torchrun (or any launcher that sets RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT), on one machine or several, every process runs the same command:
rank 0 serves, the others become workers (engine/tp_worker.py) and join from the environment.

When a rank dies: rank 0 watches the workers it started; one that exits or is killed is
reported in one log line naming it, the others are killed (so no collective waits on them),
the engine's failure listeners run (the server goes not-ready and exits non-zero) and the
step in flight raises TensorParallelError. Under a launcher a dead rank fails the next
collective, and the launcher stops the rest. A worker whose rank 0 is gone (its collective
fails, or its parent process changed) exits. While idle, rank 0 sends a heartbeat every few
seconds, so every collective carries a finite timeout. Workers ignore SIGINT and SIGTERM:
rank 0 stops them after its own drain, from `shutdown()` or at exit.
"""
from __future__ import annotations

import atexit
import logging
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from engine.config import EngineConfig, ModelConfig
from engine.errors import TensorParallelError
from engine.layers.parallel import TensorShard, check_tensor_parallel_size
from engine.parallel_runner import NOOP, STOP, Collectives, StepChannel, TensorParallelRunner, step_capacity
from engine.tp_worker import (WorkerArgs, check_launch, init_group, launched_rank, rank_device, serve_rank,
                              worker_main)

logger = logging.getLogger(__name__)

_HEARTBEAT_S = 5.0                   # rank 0's idle heartbeat
_STOP_TIMEOUT_S = 10.0               # how long workers get to stop before they are killed
_ATTRIBUTION_S = 2.0                 # a failed step waits this long for the watcher to name a dead rank


class TensorParallelGroup:
    """Rank 0's side of a tensor-parallel engine: its shard, the collectives, the workers."""

    def __init__(self, shard: TensorShard, collectives: Collectives, ranks: "_Ranks"):
        self.shard, self.collectives, self._ranks = shard, collectives, ranks
        self.size = shard.size
        weakref.finalize(self, ranks.stop).atexit = False       # atexit: _Ranks registers its own

    @classmethod
    def start(cls, model: str | Path, config: EngineConfig, model_config: ModelConfig) -> "TensorParallelGroup":
        """Start (or, under a launcher, join) the other ranks; they load their shards while
        the caller loads rank 0's. On a launched rank other than 0 this serves that rank and
        then exits the process."""
        size = config.tensor_parallel_size
        check_tensor_parallel_size(model_config, size)          # before any process starts
        rank = launched_rank()
        if rank is not None:
            check_launch(size)
            if rank != 0:
                serve_rank(model, config)
                raise SystemExit(0)
        if dist.is_initialized():
            raise RuntimeError("a torch.distributed process group already exists in this process "
                               "(another tensor-parallel engine?): shut it down first")
        device = rank_device(config.device, 0)
        if rank is not None:
            ranks = _Ranks([], None)
            init_group(device, 0, size, "env://")
        else:
            ranks = _spawn(str(model), config, size, device)
        collectives = Collectives(0, size, device)
        logger.info("tensor parallelism: %d ranks (%s, %s)", size, dist.get_backend(),
                    "launched" if rank is not None else "workers started here")
        return cls(TensorShard(model_config, 0, size, collectives), collectives, ranks)

    def runner(self, model, config: EngineConfig, device: torch.device, dtype: torch.dtype) -> TensorParallelRunner:
        """Rank 0's runner over its loaded shard; from here on the ranks run steps."""
        self.shard.attach(model)
        channel = StepChannel(self.collectives, step_capacity(config))
        runner = TensorParallelRunner(model, self.shard, config, device, dtype, self.collectives,
                                      channel, self._ranks.error)
        self._ranks.serve(channel)
        return runner

    def add_failure_listener(self, listener: Callable[[str], None]) -> None:
        """listener(message) once, from a watcher thread, when a rank dies."""
        self._ranks.listeners.append(listener)

    @property
    def failure(self) -> str | None:
        return self._ranks.failure

    def shutdown(self) -> None:
        """Stop every rank (idempotent; also done at exit)."""
        self._ranks.stop()


class _Ranks:
    """The workers rank 0 started (none under a launcher) and the group's fate. Holds no
    reference to the engine, so an engine dropped without shutdown() is still finalized."""

    def __init__(self, procs: list, errors):
        self.procs = {rank: proc for rank, proc in enumerate(procs, start=1)}
        self.errors = errors                         # (rank, message) a worker sends before exiting
        self.reported: dict[int, str] = {}
        self.failure: str | None = None
        self.listeners: list[Callable[[str], None]] = []
        self.channel: StepChannel | None = None
        self.closed = threading.Event()
        self._lock = threading.Lock()
        atexit.register(self.stop)
        if self.procs:
            threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    def serve(self, channel: StepChannel) -> None:
        self.channel = channel
        threading.Thread(target=self._beat, name="tp-heartbeat", daemon=True).start()

    def fail(self, message: str) -> None:
        """The group is lost: kill the workers, tell the listeners (once)."""
        with self._lock:
            if self.failure is not None:
                return
            self.failure = message
        logger.error("%s; stopping every rank: the engine cannot go on", message)
        self.kill()
        for listener in list(self.listeners):
            try:
                listener(message)
            except Exception:
                logger.exception("a tensor-parallel failure listener failed")

    def error(self, exc: BaseException) -> TensorParallelError:
        """A step failed on rank 0: name the dead rank if the watcher sees one, end the group."""
        deadline = time.monotonic() + (_ATTRIBUTION_S if self.procs else 0)
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self.failure is None:
            logger.error("the step failed on rank 0", exc_info=exc)
            self.fail(f"the tensor-parallel step failed on rank 0 ({type(exc).__name__}: {exc})")
        return TensorParallelError(self.failure)

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.kill()

    def stop(self) -> None:
        """Tell the workers to stop, wait for them (killing any that hang), leave the group."""
        if self.closed.is_set():
            return
        self.closed.set()
        channel = self.channel
        if self.failure is None and channel is not None and channel.lock.acquire(timeout=_STOP_TIMEOUT_S):
            try:
                channel.send(STOP)
            except Exception as exc:
                logger.warning("could not tell the ranks to stop (%s); killing them", exc)
                self.kill()
            finally:
                channel.lock.release()
        elif channel is None:
            self.kill()                                  # still loading: nothing would hear STOP
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for rank, proc in self.procs.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                logger.warning("tensor-parallel rank %d did not stop; killing it", rank)
                proc.kill()
                proc.join()
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:                            # a failed group may not tear down cleanly
                logger.debug("destroy_process_group failed", exc_info=True)
        logger.info("tensor-parallel ranks stopped")

    def describe(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(1.0)                               # its sentinel fires a moment before the exit code is known
        while self.errors is not None and not self.errors.empty():
            reporter, message = self.errors.get()
            self.reported[reporter] = message
        code = proc.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 \
            else f"exited with code {code}"
        detail = f": {self.reported[rank]}" if rank in self.reported else ""
        return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}{detail}"

    def wait_for(self, fn: Callable[[], Any]) -> None:
        """Run fn (which waits on the workers) while watching them: a worker that dies first
        raises here instead of leaving fn to its timeout."""
        done, failed = threading.Event(), []

        def run():
            try:
                fn()
            except BaseException as exc:
                failed.append(exc)
            finally:
                done.set()
        threading.Thread(target=run, name="tp-start", daemon=True).start()
        while not done.wait(0.1):
            for rank, proc in self.procs.items():
                if proc.exitcode is not None:
                    raise TensorParallelError(self.describe(rank))
        if failed:
            raise failed[0]

    def _watch(self) -> None:
        waiting = {proc.sentinel: rank for rank, proc in self.procs.items()}
        while waiting and not self.closed.is_set():
            for sentinel in multiprocessing.connection.wait(list(waiting), timeout=1.0):
                rank = waiting.pop(sentinel)
                if not self.closed.is_set():
                    self.fail(self.describe(rank))
                    return

    def _beat(self) -> None:
        channel = self.channel
        while not self.closed.wait(_HEARTBEAT_S / 5):
            if self.failure is not None:
                return
            if time.monotonic() - channel.last_sent < _HEARTBEAT_S or not channel.lock.acquire(blocking=False):
                continue
            try:
                if not self.closed.is_set():
                    channel.send(NOOP)
            except Exception as exc:
                self.fail(f"a heartbeat to the tensor-parallel ranks failed ({type(exc).__name__}: {exc})")
                return
            finally:
                channel.lock.release()


# -- starting the workers (rank 0) ----------------------------------------------------------

def _spawn(model: str, config: EngineConfig, size: int, device: torch.device) -> _Ranks:
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs; {torch.cuda.device_count()} are visible")
    init_method = f"tcp://127.0.0.1:{_free_port()}"
    context = torch.multiprocessing.get_context("spawn")
    errors = context.SimpleQueue()
    level = logging.getLogger().getEffectiveLevel()
    procs = []
    for rank in range(1, size):
        args = WorkerArgs(rank, size, init_method, model, config, level, os.getpid(), errors)
        procs.append(context.Process(target=worker_main, args=(args,), name=f"attnserve-tp-rank{rank}",
                                     daemon=True))
        procs[-1].start()
    ranks = _Ranks(procs, errors)
    try:
        ranks.wait_for(lambda: init_group(device, 0, size, init_method))
    except BaseException:
        ranks.closed.set()
        ranks.kill()
        raise
    return ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
