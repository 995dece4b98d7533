"""A tiny Mixture-of-Experts model (Qwen2-MoE: routed experts, a shared expert, a dense layer)
served end to end: TGI's /generate and /generate_stream and OpenAI's completions, streaming
included, answer what the offline engine computes."""
from __future__ import annotations

import json

import pytest
from openai import OpenAI
from service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess, sse_events

from engine import SamplingParams
from engine.llm_engine import LLM

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def moe_path(tiny_moe_checkpoints):
    return tiny_moe_checkpoints["qwen2_moe"]


@pytest.fixture(scope="module")
def server(moe_path):
    server = ServerProcess(["--model", str(moe_path), *TINY_ARGS, *NO_ENCODER]).start()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def offline_text(moe_path) -> str:
    """What the engine generates for PROMPT without HTTP: 12 greedy tokens."""
    llm = LLM(str(moe_path), kv_cache_memory="16MiB")
    return llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text


def test_info_names_the_moe_model(server, moe_path):
    info = server.get("/info").json()
    assert info["model_id"] == str(moe_path)


def test_generate_and_its_stream_answer_the_offline_text(server, offline_text):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "ignore_eos": True, "details": True}}
    whole = server.post("/generate", json=body).json()
    assert whole["generated_text"] == offline_text
    assert whole["details"]["generated_tokens"] == 12 and whole["details"]["finish_reason"] == "length"
    with server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(e) for e in sse_events(response.iter_lines())]
    assert [e["index"] for e in events] == list(range(1, 13))
    assert "".join(e["token"]["text"] for e in events) == offline_text
    assert events[-1]["generated_text"] == offline_text and events[-1]["details"]["finish_reason"] == "length"


def test_openai_completions_stream_equals_non_stream(server, offline_text):
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == offline_text and whole.usage.completion_tokens == 12
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline_text
    sampled = dict(kwargs, temperature=0.9, seed=7, n=2)
    out = client.completions.create(**sampled)
    streamed = list(client.completions.create(stream=True, **sampled))
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {c.index: c.text for c in out.choices}
