"""Our kernels' own parallel_for (engine/csrc/parallel.h): every chunk runs once, from any
thread, at the same time as another thread's kernels, and in a forked child."""
from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

from engine import kernels
from engine.layers.quant_blocks import BlockRows


@pytest.fixture(scope="module")
def ops():
    module = kernels.load()
    assert module is not None
    return module


def matrix(ops, rows: int = 1536, cols: int = 576):
    packed = BlockRows.quantize(torch.randn(rows, cols, generator=torch.Generator().manual_seed(0)), 4).pack()
    return ops.QuantMatrix(packed.codes, packed.scales, packed.mins, packed.format_code, cols, rows, None)


def test_threads_calling_kernels_at_once_each_get_their_own_answer(ops):
    m = matrix(ops)
    inputs = [torch.randn(n, 576) for n in (1, 3, 17, 64)]
    expected = [m(x) for x in inputs]
    failures = []

    def hammer(seed: int) -> None:
        torch.set_num_threads(2)
        for i in range(200):
            k = (seed + i) % len(inputs)
            if not torch.equal(m(inputs[k]), expected[k]):
                failures.append((seed, i))
            if not torch.equal(ops.rms_norm(inputs[k], torch.ones(576), 1e-5),
                               ops.rms_norm(inputs[k], torch.ones(576), 1e-5)):
                failures.append(("rms", seed, i))

    threads = [threading.Thread(target=hammer, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not failures and not any(thread.is_alive() for thread in threads)


def test_more_threads_than_chunks_and_single_rows_run_every_row(ops):
    m = matrix(ops, rows=48)                        # 3 groups of 16 rows: fewer chunks than threads
    x = torch.randn(5, 576)
    reference = x @ m.rows(torch.arange(48)).T
    torch.set_num_threads(4)
    try:
        out = m(x)
    finally:
        torch.set_num_threads(2)
    assert out.shape == (5, 48) and torch.allclose(out, reference, atol=0.5, rtol=0.05)


def _child_product(queue) -> None:
    # PyTorch's own OpenMP ops hang in a child forked after the parent used them (libgomp's
    # threads are gone): the child keeps them on one thread and gives ours two.
    torch.set_num_threads(1)
    m, x = matrix(kernels.load()), torch.ones(64, 576)
    torch.set_num_threads(2)
    out = m(x)
    torch.set_num_threads(1)
    queue.put(out.tolist())


def test_a_forked_child_starts_its_own_workers(ops):
    parent = matrix(ops)(torch.ones(64, 576))       # the parent's workers exist now
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_product, args=(queue,))
    child.start()
    answer = queue.get(timeout=60)
    child.join(10)
    assert child.exitcode == 0 and torch.equal(torch.tensor(answer), parent)
