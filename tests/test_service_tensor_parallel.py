"""`python -m service --tensor-parallel-size 2` against real clients: the same tokens as one
process, no rank left behind by SIGTERM, a killed rank fails its request and ends the server,
and the same server launched by torchrun (rank 0 serves, rank 1 only computes)."""
from __future__ import annotations

import os
import re
import signal
import sys
import threading
import time

import pytest
from service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess, alive, descendants, free_port

from engine import LLM, SamplingParams

PROMPTS = ["The cat sat", "def add(a, b):", "Once upon a time"]
GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "details": True}


@pytest.fixture(scope="module")
def expected_tokens(tiny_llama) -> list[list[int]]:
    """What one process generates for PROMPTS, greedy."""
    llm = LLM(str(tiny_llama), num_kv_blocks=64)
    params = SamplingParams(max_tokens=GREEDY["max_new_tokens"], temperature=0, ignore_eos=True)
    return [out.token_ids for out in llm.generate(PROMPTS, params)]


def tp_args(model, size: int = 2) -> list[str]:
    return ["--model", str(model), *TINY_ARGS, *NO_ENCODER, "--tensor-parallel-size", str(size)]


def generated_tokens(server: ServerProcess) -> list[list[int]]:
    answers = [server.post("/generate", json={"inputs": p, "parameters": GREEDY}) for p in PROMPTS]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    return [[token["id"] for token in a.json()["details"]["tokens"]] for a in answers]


def rank_pid(server: ServerProcess, rank: int) -> int:
    """The pid a rank logs once it is ready."""
    deadline = time.monotonic() + 10
    while not (found := re.search(rf"rank {rank} of \d+ \(pid (\d+)\) ready", server.logs())):
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.05)
    return int(found.group(1))


def test_two_ranks_answer_as_one_process_and_sigterm_stops_every_rank(tiny_llama, expected_tokens):
    server = ServerProcess(tp_args(tiny_llama)).start()
    try:
        assert generated_tokens(server) == expected_tokens
        ranks = descendants(server.proc.pid)
        assert ranks                                   # the worker (and its helpers) run below the server
        assert server.stop() == 0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ranks if alive(pid)], server.logs()[-3000:]
        assert "tensor-parallel ranks stopped" in server.logs()
    finally:
        server.stop()


def test_a_rank_killed_mid_request_fails_it_and_the_server_exits_1(tiny_llama):
    server = ServerProcess(tp_args(tiny_llama)).start()
    try:
        answer = {}
        request = threading.Thread(target=lambda: answer.update(response=server.post(
            "/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 450, "ignore_eos": True}})))
        request.start()
        deadline = time.monotonic() + 30
        while server.get("/info").json()["num_requests_running"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        worker = rank_pid(server, 1)
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        request.join(30)
        assert answer["response"].status_code in (500, 503), answer["response"].text
        assert "rank 1" in answer["response"].json()["error"]
        assert server.proc.wait(30) == 1
        assert time.monotonic() - killed < 15
        logs = server.logs()
        assert f"tensor-parallel rank 1 (pid {worker}) was killed by SIGKILL" in logs
        assert "exiting: the generation engine stopped" in logs
    finally:
        server.stop()


def test_torchrun_starts_the_ranks_and_rank_0_serves(tiny_llama, expected_tokens):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "service"]
    server = ServerProcess(tp_args(tiny_llama), launcher=torchrun).start()
    try:
        assert generated_tokens(server) == expected_tokens
        ranks = descendants(server.proc.pid)
        server.stop()
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in ranks if alive(pid)], server.logs()[-3000:]
        logs = server.logs()
        assert "rank1" in logs and "rank 1 stopped" in logs, logs[-3000:]
    finally:
        server.stop()
