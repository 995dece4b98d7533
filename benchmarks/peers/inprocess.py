"""attnserve's engine without HTTP: AsyncLLMEngine, configured from the same flags the server
gets, driven by the same closed-loop clients. HTTP tokens/s over these is the server overhead.

    python -m benchmarks.peers.inprocess spec.json out.json

A chunk is an engine output that adds text, as the server's stream sends one.
"""
from __future__ import annotations

import asyncio
import sys
import time

from benchmarks.peers.clients import RequestRecord, closed_loop, read_spec, write_results
from engine.async_engine import AsyncLLMEngine
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams


def build_engine(model: str, server_args: list[str]) -> AsyncLLMEngine:
    """The engine `python -m service --model model *server_args` would build."""
    from service.settings import load_settings
    s = load_settings(["--model", model, *server_args])
    engine = LLMEngine(s.model, s.engine_config())
    async_engine = AsyncLLMEngine(engine)
    async_engine.start()
    return async_engine


async def run_levels(engine: AsyncLLMEngine, warmup: str, levels: list[tuple[int, list[str]]],
                     output_len: int) -> list[tuple[int, list[RequestRecord]]]:
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    async def send(prompt: str) -> RequestRecord:
        record = RequestRecord(start=time.perf_counter())
        last = None
        try:
            async for last in await engine.add_request(prompt, params):
                if last.outputs[0].delta_text:
                    record.chunk_times.append(time.perf_counter())
        except Exception as exc:                        # noqa: BLE001 - reported per request
            record.error = f"{type(exc).__name__}: {exc}"
        record.end = time.perf_counter()
        record.num_tokens = len(last.outputs[0].token_ids) if last is not None else 0
        return record

    await send(warmup)
    return [(c, await closed_loop(send, prompts, c)) for c, prompts in levels]


def main(spec_path: str, out_path: str) -> None:
    spec = read_spec(spec_path)
    engine = build_engine(spec["model"], spec.get("server_args", []))
    try:
        levels = [(lv["concurrency"], lv["prompts"]) for lv in spec["levels"]]
        results = asyncio.run(run_levels(engine, spec["warmup"], levels, spec["output_len"]))
    finally:
        engine.stop()
    write_results(out_path, results, {"max_num_seqs": engine.engine.config.max_num_seqs})


if __name__ == "__main__":
    main(*sys.argv[1:3])
