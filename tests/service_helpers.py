"""A real attnserve server in a subprocess (`python -m service` on 127.0.0.1 and a free port),
for the service tests to talk to with real clients.

    server = ServerProcess(["--model", str(path)]).start()     # waits for /ready
    server.url, server.get("/info"), server.metric("attnserve_requests_total", route="/generate")
    server.stop()  # SIGTERM; returns the exit code

`shared_server(request, name, args)` starts one per name and session (stopped at its end).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-5f2c"
TINY_ARGS = ["--kv-cache-memory", "16MiB", "--max-num-seqs", "8", "--log-level", "info"]
NO_ENCODER = ["--embedding-model", "none"]
EMBEDDING_MODEL = "all-minilm-l6-v2"          # small: the real one loads in a couple of seconds
LABELS = ("negative", "neutral", "positive")
SPLADE = "splade"                             # the main server's name for its tiny SPLADE model


def descendants(pid: int) -> set[int]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parent = int(stat.rpartition(")")[2].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """True while `pid` runs (a zombie awaiting its parent counts as gone)."""
    try:
        return open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None, api_key: str | None = None,
                 launcher: list[str] | None = None):
        self.port = free_port()
        self.launcher = launcher                 # None: python -m service; or torchrun ... -m service
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["--host", "127.0.0.1", "--port", str(self.port), *args]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), self.env.get("PYTHONPATH")]))
        self.api_key = api_key
        self.log_path = Path(tempfile.mkstemp(prefix="attnserve-test-", suffix=".log")[1])
        atexit.register(self.log_path.unlink, missing_ok=True)
        self.proc: subprocess.Popen | None = None
        self.ready_statuses: list[int] = []      # what /ready answered while starting

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def start(self, timeout: float = 90.0, wait: bool = True) -> "ServerProcess":
        log = open(self.log_path, "wb")
        launcher = self.launcher or [sys.executable, "-m", "service"]
        self.proc = subprocess.Popen([*launcher, *self.args], cwd=REPO,
                                     env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.logs()[-4000:]}")
            try:
                status = httpx.get(self.url + "/ready", timeout=2).status_code
            except httpx.TransportError:
                time.sleep(0.05)
                continue
            self.ready_statuses.append(status)
            if status == 200:
                return
            time.sleep(0.05)
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.logs()[-4000:]}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers=self.headers, timeout=kwargs.pop("timeout", 60), **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                         timeout=kwargs.pop("timeout", 30), **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, headers={**self.headers, **kwargs.pop("headers", {})},
                          timeout=kwargs.pop("timeout", 60), **kwargs)

    def metrics(self) -> str:
        return self.get("/metrics").text

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample (0 when absent), matching every given label."""
        total = None
        for line in self.metrics().splitlines():
            if line.startswith("#"):
                continue
            match = re.match(r"^([a-zA-Z_:][\w:]*)(\{.*\})? (\S+)$", line)
            if not match or match.group(1) != name:
                continue
            found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            if all(found.get(k) == v for k, v in labels.items()):
                total = (total or 0.0) + float(match.group(3))
        return total or 0.0

    def wait_idle(self, timeout: float = 5.0) -> dict:
        """/info once nothing runs or waits and every KV block is free (or the last seen)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.get("/info").json()
            idle = (info["num_requests_running"] == 0 and info["num_requests_waiting"] == 0
                    and info["num_free_blocks"] == info["num_blocks"])
            if idle or time.monotonic() > deadline:
                return info
            time.sleep(0.05)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")


_shared: dict[str, ServerProcess] = {}


def shared_server(request, name: str, args: list[str], api_key: str | None = None) -> ServerProcess:
    """One server per name for the whole session, stopped when the session ends."""
    if name not in _shared:
        server = ServerProcess(args, api_key=api_key)
        _shared[name] = server
        request.config.add_cleanup(server.stop)
        server.start()
    return _shared[name]


def sse_events(lines):
    """The `data:` payloads of an SSE line iterator, as they come."""
    return (line[len("data:"):].strip() for line in lines if line.startswith("data:"))


def main_server(request) -> ServerProcess:
    """The session's main server: tiny LLaMA, the real MiniLM embedder, a tiny SPLADE model
    (sparse embeddings and fill-mask: no dense embeddings, so MiniLM stays the one embedder),
    a tiny classifier with a head, and an API key."""
    llama, splade = request.getfixturevalue("tiny_llama"), request.getfixturevalue("tiny_splade")
    return shared_server(request, "main", ["--model", str(llama), *TINY_ARGS, "--embedding-model",
                                           EMBEDDING_MODEL, "--embedding-model", f"{SPLADE}={splade}",
                                           "--classifier-model", tiny_classifier(request)],
                         api_key=API_KEY)


def edges_server(request) -> ServerProcess:
    """The tiny LLaMA with the real MiniLM embedder behind a small encoder queue, no API key: the
    server the reliability-edge tests and the hostile-load benchmark's test share."""
    llama = request.getfixturevalue("tiny_llama")
    return shared_server(request, "edges", ["--model", str(llama), *TINY_ARGS, "--embedding-model",
                                            EMBEDDING_MODEL, "--max-encoder-queue", "16"])


_classifier: list[str] = []


def tiny_classifier(request) -> str:
    """A random tiny BertForSequenceClassification (3 labels) with MiniLM's tokenizer."""
    if not _classifier:
        import torch
        import transformers

        from engine.loader import resolve_model_path
        directory = Path(tempfile.mkdtemp(prefix="attnserve-classifier-"))
        request.config.add_cleanup(lambda: shutil.rmtree(directory, ignore_errors=True))
        torch.manual_seed(0)
        config = transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=128, num_labels=len(LABELS),
            id2label=dict(enumerate(LABELS)), label2id={label: i for i, label in enumerate(LABELS)})
        transformers.BertForSequenceClassification(config).eval().save_pretrained(directory)
        source = resolve_model_path(EMBEDDING_MODEL)
        for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            shutil.copy(source / name, directory / name)
        _classifier.append(str(directory))
    return _classifier[0]
