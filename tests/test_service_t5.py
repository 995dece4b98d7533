"""A tiny Flan-T5-shaped model (gated-GELU, its own head, a spiece.model tokenizer) served end
to end: TGI's /generate and /generate_stream and OpenAI's completions, streaming included,
answer what the offline engine computes; /info says it is an encoder-decoder; chat is refused
(the checkpoint has no template); an input past the encoder's cap is a 400."""
from __future__ import annotations

import json

import pytest
from openai import OpenAI
from service_helpers import NO_ENCODER, TINY_ARGS, ServerProcess, sse_events

from engine import SamplingParams
from engine.llm_engine import LLM

PROMPT = "translate the river watches the garden"


@pytest.fixture(scope="module")
def t5_path(tiny_t5_checkpoints):
    return tiny_t5_checkpoints["flan_t5"]


@pytest.fixture(scope="module")
def server(t5_path):
    server = ServerProcess(["--model", str(t5_path), *TINY_ARGS, *NO_ENCODER]).start()
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def offline(t5_path):
    """What the engine generates for PROMPT without HTTP: 12 greedy tokens."""
    llm = LLM(str(t5_path), kv_cache_memory="16MiB")
    return llm.generate([PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]


def test_info_says_encoder_decoder(server, t5_path):
    info = server.get("/info").json()
    assert info["model_id"] == str(t5_path)
    assert info["model_pipeline_tag"] == "text2text-generation" and info["is_encoder_decoder"] is True
    assert info["max_total_tokens"] == info["max_input_tokens"] + info["max_model_len"] - 1


def test_generate_and_its_stream_answer_the_offline_text(server, offline):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "ignore_eos": True, "details": True,
                                             "decoder_input_details": True}}
    whole = server.post("/generate", json=body).json()
    assert whole["generated_text"] == offline.text
    details = whole["details"]
    assert details["generated_tokens"] == 12 and details["finish_reason"] == "length"
    assert [t["id"] for t in details["tokens"]] == offline.token_ids
    assert [t["id"] for t in details["prefill"]] == offline.prompt_token_ids    # the encoder's input
    with server.client() as client, client.stream("POST", "/generate_stream", json=body) as response:
        assert response.status_code == 200
        events = [json.loads(e) for e in sse_events(response.iter_lines())]
    assert [e["index"] for e in events] == list(range(1, 13))
    assert "".join(e["token"]["text"] for e in events) == offline.text
    assert events[-1]["generated_text"] == offline.text and events[-1]["details"]["finish_reason"] == "length"


def test_openai_completions_stream_equals_non_stream(server, offline):
    client = OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    assert whole.choices[0].text == offline.text and whole.usage.completion_tokens == 12
    assert whole.usage.prompt_tokens == len(offline.prompt_token_ids)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline.text
    sampled = dict(kwargs, temperature=0.9, seed=7, n=2)
    out = client.completions.create(**sampled)
    streamed = list(client.completions.create(stream=True, **sampled))
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {c.index: c.text for c in out.choices}


def test_the_prompt_has_no_logprobs(server, offline):
    """decoder_input_details lists the encoder's input with null logprobs (it is read, never
    predicted); echo with logprobs, which would promise them, is a 422 naming echo."""
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "details": True, "decoder_input_details": True}}
    prefill = server.post("/generate", json=body).json()["details"]["prefill"]
    assert [t["id"] for t in prefill] == offline.prompt_token_ids and all(t["logprob"] is None for t in prefill)
    echo = server.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "echo": True, "logprobs": 1})
    assert echo.status_code == 422 and echo.json()["error"]["param"] == "echo"
    assert "never predicts it" in echo.json()["error"]["message"]
    plain_echo = server.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "echo": True}).json()
    assert plain_echo["choices"][0]["text"].startswith(PROMPT)


def test_chat_needs_a_template_and_long_inputs_are_refused(server):
    chat = server.post("/v1/chat/completions", json={"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert chat.status_code == 400 and "chat template" in chat.json()["error"]["message"]
    limit = server.get("/info").json()["max_input_tokens"]
    too_long = server.post("/generate", json={"inputs": "the garden " * limit, "parameters": {"max_new_tokens": 2}})
    assert too_long.status_code == 400
    assert f"encodes at most {limit} prompt tokens" in too_long.json()["error"]
