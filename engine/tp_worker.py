"""A tensor-parallel rank's own process: joining the group, loading its shard, running steps.

Ranks 1..N-1 run here, whether rank 0 started them (`worker_main`, a torch.multiprocessing
spawn target; engine/distributed.py) or a launcher did (`serve_rank`: torchrun, or anything
that sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT). A rank builds what LLMEngine builds
on rank 0, for its shard, then runs the steps rank 0 broadcasts until told to stop. It ignores
SIGINT and SIGTERM (rank 0 stops it after its own drain) and exits when rank 0 is gone: a
failed collective, or (spawned) a parent that changed.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from engine.config import EngineConfig
from engine.device import default_num_threads, resolve_device, resolve_dtype, use_cpu_threads
from engine.layers.parallel import TensorShard
from engine.loader import build_model, open_checkpoint
from engine.parallel_runner import STEP, STOP, Collectives, StepChannel, TensorParallelRunner, step_capacity
from engine.quantization import plan_quantization, quantize_model

logger = logging.getLogger(__name__)

_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_TIMEOUT = timedelta(minutes=10)     # any one collective (the group's start and the load included)


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started it; None otherwise."""
    if all(name in os.environ for name in _LAUNCHER_VARIABLES):
        return int(os.environ["RANK"])
    return None


def check_launch(tensor_parallel_size: int) -> None:
    """Under a launcher, its number of processes must be the tensor-parallel size."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if launched_rank() is not None and world != tensor_parallel_size:
        raise ValueError(f"the launcher started {world} processes but tensor_parallel_size is "
                         f"{tensor_parallel_size}: they must be equal")


def cpu_threads_per_rank(size: int) -> int | None:
    """Torch threads for each of the ranks that share this machine's cores (None: one rank)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", size)) if launched_rank() is not None else size
    return max(1, default_num_threads() // local) if local > 1 else None


def init_group(device: torch.device, rank: int, size: int, init_method: str) -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size, timeout=_TIMEOUT)


def rank_device(name: str, local_rank: int) -> torch.device:
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"with tensor parallelism each rank uses cuda:<its local rank>, not {name}: "
                         "pass device cuda (CUDA_VISIBLE_DEVICES chooses the GPUs)")
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


# -- the rank's process ------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerArgs:
    rank: int
    size: int
    init_method: str
    model: str
    config: EngineConfig
    log_level: int
    parent_pid: int
    errors: Any                                  # a multiprocessing SimpleQueue


def serve_rank(model: str | Path, config: EngineConfig) -> None:
    """A launched rank other than 0 (torchrun): join the group, load this rank's shard, run
    rank 0's steps until it says stop."""
    check_launch(config.tensor_parallel_size)
    _ignore_stop_signals()
    _serve(launched_rank(), config.tensor_parallel_size, str(model), config, "env://",
           int(os.environ.get("LOCAL_RANK", 0)))


def worker_main(args: WorkerArgs) -> None:
    """A worker process rank 0 started: serve until told to stop; on any error, report it to
    rank 0 and exit 1."""
    _ignore_stop_signals()
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s rank{args.rank} %(name)s: %(message)s")
    threading.Thread(target=_exit_with_parent, args=(args.parent_pid,), name="tp-parent", daemon=True).start()
    try:
        _serve(args.rank, args.size, args.model, args.config, args.init_method, local_rank=args.rank)
    except BaseException as exc:
        logger.exception("tensor-parallel rank %d failed", args.rank)
        args.errors.put((args.rank, f"{type(exc).__name__}: {exc}"))
        os._exit(1)


def _serve(rank: int, size: int, model: str, config: EngineConfig, init_method: str, local_rank: int) -> None:
    device = rank_device(config.device, local_rank)
    init_group(device, rank, size, init_method)
    collectives = Collectives(rank, size, device)
    runner = _build_runner(model, config, rank, size, collectives, device)
    channel = StepChannel(collectives, step_capacity(config))
    logger.info("rank %d of %d (pid %d) ready on %s: %d KV blocks", rank, size, os.getpid(), device,
                runner.num_blocks)
    while True:
        command, inputs = channel.receive()
        if command == STOP:
            break
        if command == STEP:
            runner.run(inputs)
    dist.destroy_process_group()
    logger.info("rank %d stopped", rank)


def _build_runner(model: str, config: EngineConfig, rank: int, size: int, collectives: Collectives,
                  device: torch.device) -> TensorParallelRunner:
    """What LLMEngine builds on rank 0, for another rank: its shard, quantized the same way."""
    use_cpu_threads(config.num_threads or cpu_threads_per_rank(size))
    checkpoint = open_checkpoint(model)
    dtype = resolve_dtype(config.dtype, device, checkpoint.config.dtype)
    shard = TensorShard(checkpoint.config, rank, size, collectives)
    plan = plan_quantization(config.quantization, checkpoint, device)
    module = quantize_model(build_model(checkpoint, dtype, device, plan.gguf_kernels, shard), plan)
    shard.attach(module)
    return TensorParallelRunner(module, shard, config, device, dtype, collectives)


def _ignore_stop_signals() -> None:
    # A terminal's Ctrl-C, or a process-group SIGTERM, reaches every rank: only rank 0 acts on
    # it (drain, then stop the ranks).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_with_parent(parent_pid: int) -> None:
    """A worker whose rank 0 died without a word (SIGKILL) exits: NCCL would not notice."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    logger.error("rank 0 (pid %d) is gone; exiting", parent_pid)
    os._exit(1)
