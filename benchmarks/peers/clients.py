"""What every system's run produces: one RequestRecord per request, timed on the client side.

    records = await closed_loop(send, prompts, concurrency)   # send(prompt) -> RequestRecord

HTTP targets are driven by `stream_completion` (OpenAI /v1/completions, stream=true, SSE parsed
here); drivers in a subprocess (`python -m benchmarks.peers.X spec.json out.json`) read a spec and
write their records with `read_spec` / `write_results`.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import httpx


@dataclass(slots=True)
class RequestRecord:
    start: float                                        # perf_counter() when the request was sent
    chunk_times: list[float] = field(default_factory=list)   # each content chunk's arrival
    end: float = 0.0
    num_tokens: int = 0                                 # usage.completion_tokens, else chunks seen
    error: str | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @classmethod
    def from_dict(cls, d: dict) -> "RequestRecord":
        return cls(**d)


async def closed_loop(send: Callable[[str], Awaitable[RequestRecord]], prompts: Sequence[str],
                      concurrency: int) -> list[RequestRecord]:
    """`concurrency` clients, each sending its next prompt as soon as its previous request ends,
    until every prompt has been sent once. Records come back in prompt order."""
    records: list[RequestRecord | None] = [None] * len(prompts)
    pending = iter(enumerate(prompts))                  # shared: each next() is atomic in asyncio

    async def client() -> None:
        for i, prompt in pending:
            records[i] = await send(prompt)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return records


# -- HTTP: OpenAI completions over SSE -------------------------------------------------

def parse_event(line: str) -> dict | str | None:
    """One SSE line -> its JSON payload, "[DONE]", or None for anything else."""
    if not line.startswith("data:"):
        return None
    data = line[len("data:"):].strip()
    if data == "[DONE]":
        return data
    try:
        return json.loads(data)
    except ValueError:
        return None


def chunk_text(event: dict) -> str:
    """The content an OpenAI completion (or chat) chunk carries."""
    text = ""
    for choice in event.get("choices") or []:
        text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return text


async def stream_completion(client: httpx.AsyncClient, url: str, body: dict) -> RequestRecord:
    """POST one streaming completion; time every chunk that carries text."""
    record = RequestRecord(start=time.perf_counter())
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                record.error = f"HTTP {response.status_code}: {response.text[:300]}"
                return record
            async for line in response.aiter_lines():
                event = parse_event(line)
                if event == "[DONE]":
                    break
                if not isinstance(event, dict):
                    continue
                if "error" in event:
                    record.error = str(event["error"])[:300]
                    break
                if chunk_text(event):
                    record.chunk_times.append(time.perf_counter())
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens", usage_tokens)
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.perf_counter()
    record.num_tokens = usage_tokens if usage_tokens is not None else len(record.chunk_times)
    if not record.chunk_times and record.error is None:
        record.error = "no content chunk"
    return record


# -- subprocess drivers ----------------------------------------------------------------

def read_spec(path: str | Path) -> dict:
    """{"model", "gguf", "threads", "output_len", "warmup", "levels": [{"concurrency", "prompts"}], ...}"""
    return json.loads(Path(path).read_text())


def write_results(path: str | Path, levels: list[tuple[int, list[RequestRecord]]], info: dict) -> None:
    Path(path).write_text(json.dumps({
        "info": info,
        "levels": [{"concurrency": c, "records": [asdict(r) for r in records]} for c, records in levels],
    }))


def read_results(path: str | Path) -> tuple[dict[int, list[RequestRecord]], dict]:
    data = json.loads(Path(path).read_text())
    levels = {lv["concurrency"]: [RequestRecord.from_dict(r) for r in lv["records"]] for lv in data["levels"]}
    return levels, data["info"]
