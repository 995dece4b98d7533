"""The naive baseline: the server a Python user writes around Hugging Face transformers.

    python -m benchmarks.peers.transformers_server --model smollm2-135m-instruct --port 8001

One request at a time (an asyncio lock, first come first served) through `model.generate`,
float32, greedy, streamed token by token as OpenAI /v1/completions chunks. It accepts only what
the benchmark sends: prompt, max_tokens, stream, ignore_eos (EOS masked until max_tokens).
Tokens are streamed one chunk each (a TextIteratorStreamer would batch them into words, which
would make its inter-token latencies incomparable).
"""
from __future__ import annotations

import argparse
import asyncio
import json

import torch
import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from transformers.generation.streamers import BaseStreamer

from engine.loader import resolve_model_path


class TokenQueue(BaseStreamer):
    """generate()'s new token ids, handed to an asyncio queue; None at the end."""

    def __init__(self, queue: asyncio.Queue, loop: asyncio.AbstractEventLoop):
        self.queue, self.loop = queue, loop
        self.is_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.is_prompt:                          # generate() first pushes the prompt
            self.is_prompt = False
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def load(model: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path(model)
    where, extra = (path.parent, {"gguf_file": path.name}) if path.is_file() else (path, {})
    tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    return AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).eval(), tokenizer


def create_app(model, tokenizer) -> FastAPI:
    app = FastAPI()
    lock = asyncio.Lock()

    @torch.inference_mode()
    def generate(ids: torch.Tensor, max_tokens: int, ignore_eos: bool, streamer: TokenQueue) -> None:
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                       min_new_tokens=max_tokens if ignore_eos else 0, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id or 0, streamer=streamer)

    async def events(body: dict):
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        async with lock:
            queue: asyncio.Queue = asyncio.Queue()
            loop = asyncio.get_running_loop()
            work = asyncio.ensure_future(asyncio.to_thread(
                generate, ids, body.get("max_tokens", 16), body.get("ignore_eos", False), TokenQueue(queue, loop)))
            generated: list[int] = []
            text = ""
            while (token := await queue.get()) is not None:
                generated.append(token)
                new_text = tokenizer.decode(generated, skip_special_tokens=True)
                if new_text.endswith("\ufffd"):         # an unfinished character: wait for more
                    continue
                delta, text = new_text[len(text):], new_text
                if delta:
                    yield _sse({"object": "text_completion", "choices": [{"index": 0, "text": delta}]})
            await work
        yield _sse({"object": "text_completion", "choices": [],
                    "usage": {"prompt_tokens": ids.shape[1], "completion_tokens": len(generated)}})
        yield "data: [DONE]\n\n"

    @app.post("/v1/completions")
    async def completions(body: dict):
        return StreamingResponse(events(body), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load(args.model)
    uvicorn.run(create_app(model, tokenizer), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
