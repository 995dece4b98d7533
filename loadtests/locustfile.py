"""Locust users for attnserve: TGI generate and stream, OpenAI chat streaming, TEI embed.

    make loadtest                                              # headless, CSV + HTML in reports/
    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000   # the web UI on :8089

The mix is set by the user classes' weights: of every 10 simulated users,
    3 GenerateUser    POST /generate               one prompt, max_new_tokens, greedy
    3 StreamUser      POST /generate_stream        the same body, read as SSE to the last event
    2 ChatStreamUser  POST /v1/chat/completions    stream: true, read to `data: [DONE]`
    2 EmbedUser       POST /embed                  1 to 4 prompts per call
Each waits 0.05-0.5 s between requests. Prompts are the bundled loadtests/prompts.txt, picked at
random (so some repeat and the prefix cache gets hits).

A stream counts in locust's statistics from its request to its last event; its time to first
token is a second entry of request type "TTFT" under the same name (client side: request sent
-> the first token event; for chat, the first chunk with text, since the first names the role).
A stream that ends without its last event, or with an error
event, is a failure.

Options (flag or environment): --max-new-tokens / LOCUST_MAX_NEW_TOKENS (default 64),
--attnserve-api-key / LOCUST_ATTNSERVE_API_KEY (sent as a bearer token when set).
"""
from __future__ import annotations

import json
import random
import sys
import time
from pathlib import Path

from locust import HttpUser, between, events, task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import prompt_texts  # noqa: E402  (the repo root is not on locust's path)

PROMPTS = prompt_texts()


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, env_var="LOCUST_MAX_NEW_TOKENS",
                        help="tokens generated per request (default 64)")
    parser.add_argument("--attnserve-api-key", default="", env_var="LOCUST_ATTNSERVE_API_KEY",
                        help="bearer key, when the server has --api-key")


class AttnserveUser(HttpUser):
    abstract = True
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        self.max_new_tokens = getattr(options, "max_new_tokens", 64)
        key = getattr(options, "attnserve_api_key", "")
        if key:
            self.client.headers["Authorization"] = f"Bearer {key}"

    def stream(self, path: str, body: dict, has_text, is_last) -> None:
        """POST a streaming request and read its SSE events to the end, timing the first text."""
        started = time.perf_counter()
        first_text_ms = None
        num_bytes = 0
        finished = False
        with self.client.post(path, json=body, stream=True, catch_response=True, name=path) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines(decode_unicode=True):
                num_bytes += len(line) + 1
                if not line.startswith("data:"):
                    continue
                data = line[len("data:"):].strip()
                event = None if data == "[DONE]" else json.loads(data)
                if event is not None and "error" in event:
                    response.failure(f"error event: {data[:200]}")
                    return
                if first_text_ms is None and event is not None and has_text(event):
                    first_text_ms = (time.perf_counter() - started) * 1000
                if is_last(data, event):
                    finished = True
                    break
            # Counted from the request to the last event, not to the headers.
            response.request_meta["response_time"] = (time.perf_counter() - started) * 1000
            response.request_meta["response_length"] = num_bytes
            if not finished:
                response.failure("the stream ended before its last event")
                return
            response.success()
        if first_text_ms is not None:
            self.environment.events.request.fire(
                request_type="TTFT", name=path, response_time=first_text_ms, response_length=0,
                exception=None, context={})

    def prompt(self) -> str:
        return random.choice(PROMPTS)


class GenerateUser(AttnserveUser):
    weight = 3

    @task
    def generate(self) -> None:
        self.client.post("/generate", json={"inputs": self.prompt(),
                                            "parameters": {"max_new_tokens": self.max_new_tokens}})


class StreamUser(AttnserveUser):
    weight = 3

    @task
    def generate_stream(self) -> None:
        self.stream("/generate_stream",
                    {"inputs": self.prompt(), "parameters": {"max_new_tokens": self.max_new_tokens}},
                    has_text=lambda event: "token" in event,
                    is_last=lambda data, event: event is not None and event.get("generated_text") is not None)


class ChatStreamUser(AttnserveUser):
    weight = 2

    @task
    def chat_stream(self) -> None:
        self.stream("/v1/chat/completions",
                    {"messages": [{"role": "user", "content": self.prompt()}],
                     "max_tokens": self.max_new_tokens, "stream": True},
                    has_text=_chat_has_text, is_last=lambda data, event: data == "[DONE]")


class EmbedUser(AttnserveUser):
    weight = 2

    @task
    def embed(self) -> None:
        self.client.post("/embed", json={"inputs": random.sample(PROMPTS, random.randint(1, 4))})


def _chat_has_text(event: dict) -> bool:
    # The first chunk only names the role; text (or the end) comes with the first token.
    return any(c["delta"].get("content") or c.get("finish_reason") for c in event.get("choices", []))
