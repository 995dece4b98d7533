"""Every error path through real requests: status code, shape, and what the message names.
(429 and 503 need servers of their own: tests/test_service_lifecycle.py.)"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError
from service_helpers import API_KEY, EMBEDDING_MODEL, main_server


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


def native_error(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    assert "Traceback" not in r.text
    return body["error"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in r.text
    return body["error"]


# -- 422 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, field", [
    ({"inputs": "hi", "foo": 1}, "foo"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 4, "bogus": True}}, "parameters.bogus"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "many"}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 10**30}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "parameters.max_new_tokens"),
    ({"inputs": "hi", "parameters": {"temperature": -0.5}}, "parameters.temperature"),
    ({"inputs": "hi", "parameters": {"temperature": 101}}, "parameters.temperature"),
    ({"inputs": "hi", "parameters": {"top_p": 0}}, "parameters.top_p"),
    ({"inputs": "hi", "parameters": {"seed": 2**70}}, "parameters.seed"),
    ({"inputs": "hi", "parameters": {"stop": ["x"] * 17}}, "parameters.stop"),
    ({"inputs": "hi", "parameters": {"best_of": 2}}, "parameters.best_of"),
    ({"inputs": "hi", "parameters": {"watermark": True}}, "parameters.watermark"),
    ({"inputs": "hi", "parameters": {"top_n_tokens": 50}}, "parameters.top_n_tokens"),
    ({"inputs": "hi", "parameters": {"details": "yes"}}, "parameters.details"),
    ({"inputs": ""}, "inputs"),
    ({"inputs": 42}, "inputs"),
    ({"parameters": {}}, "inputs"),
])
def test_generate_validation(server, body, field):
    for route in ("/generate", "/generate_stream"):
        message = native_error(server.post(route, json=body), 422, "validation")
        assert message.startswith(field + ":") or f"; {field}:" in message, message


def test_max_new_tokens_above_the_model_length(server):
    message = native_error(server.post("/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 513}}),
                           422, "validation")
    assert "parameters.max_new_tokens" in message and "512" in message


def test_huge_json_number_and_nan(server):
    r = server.post("/generate", content=b'{"inputs": "hi", "parameters": {"temperature": 1e999}}',
                    headers={"Content-Type": "application/json"})
    assert "parameters.temperature" in native_error(r, 422, "validation")
    r = server.post("/generate", content=b'{"inputs": "hi", "parameters": {"top_p": NaN}}',
                    headers={"Content-Type": "application/json"})
    native_error(r, 422, "validation")


def test_invalid_utf8_and_broken_json(server):
    for raw in (b'{"inputs": "\xff\xfe caf\xe9"}', b'{"inputs": "hi"', b"\x00\x01\x02"):
        r = server.post("/generate", content=raw, headers={"Content-Type": "application/json"})
        assert native_error(r, 422, "validation").startswith("body:")
    r = server.post("/v1/completions", content=b'{"prompt": "\xc3\x28"}', headers={"Content-Type": "application/json"})
    assert openai_error(r, 422)["param"] == "body"


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "max_tokens": 10, "frobnicate": 1}, "frobnicate"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": "hi", "max_tokens": 100000}, "max_tokens"),
    ({"prompt": "hi", "n": 0}, "n"),
    ({"prompt": "hi", "n": 17}, "n"),
    ({"prompt": "hi", "n": 9}, "n"),                  # more than --max-num-seqs 8
    ({"prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"prompt": "hi", "temperature": "warm"}, "temperature"),
    ({"prompt": "hi", "stop": ""}, "stop"),
    ({"prompt": "hi", "suffix": "tail"}, "suffix"),
    ({"prompt": "hi", "logit_bias": {"999999": 10}}, "logit_bias"),          # outside the vocabulary
    ({"prompt": "hi", "logit_bias": {"5": 101}}, "logit_bias.5"),
    ({"prompt": "hi", "logit_bias": {"five": 1}}, "logit_bias.five.[key]"),
    ({"prompt": "hi", "guided_choice": []}, "guided_choice"),
    ({"prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"prompt": "hi", "response_format": {"type": "json_schema"}}, "response_format"),
    ({"prompt": "hi", "response_format": {"type": "regex"}}, "response_format"),
    ({"prompt": "hi", "echo": 0}, "echo"),
    ({"prompt": "hi", "max_tokens": "16"}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 16.5}, "max_tokens"),
    ({"prompt": ["hi"] * 33}, "prompt"),
    ({"prompt": [999999]}, "prompt"),
])
def test_completions_validation(server, body, param):
    error = openai_error(server.post("/v1/completions", json=body), 422)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [{"id": "x"}]}]}, "messages.0.tool_calls.0.function"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, "body"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}, "tools.0.function"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": {"type": "function", "function": {"name": "f"}},
      "tools": [{"type": "function", "function": {"name": "g"}}]}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "g"}}] * 2},
     "tools"),
    ({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools.0.function.name"),
    ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"add_generation_prompt": False}},
     "chat_template_kwargs"),
    ({"messages": [{"role": "user", "content": "hi"}], "tool_choice": "required", "guided_regex": "x",
      "tools": [{"type": "function", "function": {"name": "g"}}]}, "guided_regex"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10**6}, "max_completion_tokens"),
])
def test_chat_validation(server, body, param):
    error = openai_error(server.post("/v1/chat/completions", json=body), 422)
    assert error["param"] == param, error


def test_a_stream_request_that_fails_validation_is_a_plain_error(server):
    r = server.post("/v1/chat/completions", json={"messages": [], "stream": True})
    assert r.headers["content-type"].startswith("application/json")
    openai_error(r, 422)


def test_clients_see_typed_errors(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=None, prompt="hi", max_tokens=10**6)
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-17")
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    with pytest.raises(HubValidationError):
        InferenceClient(base_url=server.url, api_key=API_KEY).text_generation("hi", max_new_tokens=10**6)


@pytest.mark.parametrize("route, body, field", [
    ("/embed", {"inputs": []}, "inputs"),
    ("/embed", {"inputs": ""}, "inputs"),
    ("/embed", {"inputs": ["ok", ""]}, "inputs"),
    ("/embed", {"inputs": "ok", "pooling": "cls"}, "pooling"),
    ("/embed", {"inputs": [[1, 2, 10**9]]}, "inputs"),
    ("/embed", {"inputs": ["x"] * 2049}, "inputs"),
    ("/embed", {"inputs": "ok", "truncation_direction": "Middle"}, "truncation_direction"),
    ("/classify", {"inputs": "ok", "candidate_labels": ["a", "a"]}, "candidate_labels"),
    ("/classify", {"inputs": "ok", "candidate_labels": []}, "candidate_labels"),
    ("/classify", {"inputs": "ok", "raw_scores": True}, "raw_scores"),
    ("/predict", {"inputs": [["a", "b"]]}, "inputs"),
])
def test_encoder_validation(server, route, body, field):
    message = native_error(server.post(route, json=body), 422, "validation")
    assert message.startswith(field), message


def test_embeddings_validation(server):
    assert server.post("/v1/embeddings", json={"input": "hi", "model": "ada"}).json()["model"] == EMBEDDING_MODEL
    assert openai_error(server.post("/v1/embeddings", json={"input": "hi", "dimensions": 385}), 422)["param"] == "dimensions"
    assert openai_error(server.post("/v1/embeddings", json={"input": []}), 422)["param"] == "input"
    assert openai_error(server.post("/v1/embeddings", json={"input": "hi", "encoding_format": "int8"}), 422)["param"] == "encoding_format"
    too_long = openai_error(server.post("/v1/embeddings", json={"input": "word " * 400}), 400)
    assert "256" in too_long["message"]


# -- 400 --------------------------------------------------------------------------------------

def test_prompt_too_long_names_both_lengths(server):
    prompt = "Paged attention keeps keys. " * 200
    num_tokens = len(server.post("/tokenize", json={"inputs": prompt}).json())
    assert num_tokens >= 512
    message = native_error(server.post("/generate", json={"inputs": prompt}), 400, "validation")
    assert str(num_tokens) in message and "511" in message
    error = openai_error(server.post("/v1/completions", json={"prompt": prompt}), 400)
    assert str(num_tokens) in error["message"] and error["code"] == "context_length_exceeded"
    chat = openai_error(server.post("/v1/chat/completions",
                                    json={"messages": [{"role": "user", "content": prompt}]}), 400)
    assert "511" in chat["message"]
    # truncate keeps the last N tokens: the same prompt then runs.
    ok = server.post("/generate", json={"inputs": prompt, "parameters": {"truncate": 100, "max_new_tokens": 2}})
    assert ok.status_code == 200


# -- 401 --------------------------------------------------------------------------------------

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}])
def test_api_key_required(server, headers):
    r = httpx.post(server.url + "/generate", json={"inputs": "hi"}, headers=headers)
    native_error(r, 401, "unauthorized")
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi"}, headers=headers)
    assert openai_error(r, 401)["type"] == "authentication_error"
    for path in ("/info", "/v1/models", "/openapi.json", "/docs"):
        assert httpx.get(server.url + path, headers=headers).status_code == 401


def test_open_routes_need_no_key(server):
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(server.url + path).status_code == 200


# -- 404 / 405 --------------------------------------------------------------------------------

def test_unknown_model_and_route(server):
    error = openai_error(server.get("/v1/models/not-a-model"), 404)
    assert error["param"] == "model" and "not-a-model" in error["message"]
    openai_error(server.get("/v1/nothing"), 404)
    native_error(server.get("/nothing"), 404, "not_found")
    native_error(server.get("/generate"), 405, "validation")


# -- 413 --------------------------------------------------------------------------------------

def test_body_too_large(server):
    big = json.dumps({"inputs": "x" * (10 * 2**20)}).encode()
    message = native_error(server.post("/generate", content=big, headers={"Content-Type": "application/json"}),
                           413, "validation")
    assert str(4 * 2**20) in message

    def chunks():                                   # no Content-Length: counted as it arrives
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"y" * 2**20
        yield b'"}'
    r = server.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    openai_error(r, 413)
    assert server.get("/health").status_code == 200
