"""What real OpenAI, TGI and Hugging Face clients send must just work: each rule through the
client that sends it, against a real server (TGI's own `text_generation` client, huggingface_hub's
InferenceClient, LangChain, the openai SDK), and a walk of /openapi.json that sends `null` for
every optional field of every route."""
from __future__ import annotations

import asyncio
import copy
import json

import httpx
import pytest
from huggingface_hub import InferenceClient
from openai import NotFoundError, OpenAI
from service_helpers import (API_KEY, EMBEDDING_MODEL, LABELS, NO_ENCODER, TINY_ARGS, main_server,
                             shared_server, sse_events)

PROMPT = "The cat sat on the"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WORDS_400 = " ".join(["serving"] * 400)


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


@pytest.fixture(scope="module")
def capped(request, tiny_llama):
    """Operator caps: at most 16 new tokens per request, 4 when a request names none."""
    return shared_server(request, "capped", ["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER,
                                             "--max-new-tokens-limit", "16", "--default-max-tokens", "4"])


@pytest.fixture(scope="module")
def strict(request, tiny_llama):
    return shared_server(request, "strict-names", ["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER,
                                                   "--strict-model-names"])


@pytest.fixture(scope="module")
def truncating(request):
    return shared_server(request, "auto-truncate", ["--model", "none", "--embedding-model", EMBEDDING_MODEL,
                                                    "--auto-truncate"])


# -- TGI's own client -------------------------------------------------------------------------

def tgi_kwargs() -> dict:
    return dict(max_new_tokens=5, details=None, decoder_input_details=True, top_n_tokens=2,
                stop_sequences=["zzzz"], seed=7, do_sample=True)


def check_tgi_response(response, num_prompt_tokens: int) -> None:
    details = response.details
    assert details.generated_tokens == 5 and len(details.tokens) == 5
    assert details.seed == 7 and details.finish_reason.value in ("length", "eos_token")
    assert [t.id for t in details.prefill] and len(details.prefill) == num_prompt_tokens
    assert all(len(top) == 2 for top in details.top_tokens)
    assert response.generated_text == "".join(t.text for t in details.tokens)


def test_text_generation_client(server):
    from text_generation import Client
    client = Client(server.url, headers=AUTH, timeout=60)
    kwargs = tgi_kwargs()
    kwargs.pop("details")
    num_prompt_tokens = len(server.post("/tokenize", json={"inputs": PROMPT}).json())
    first = client.generate(PROMPT, **kwargs)
    check_tgi_response(first, num_prompt_tokens)
    assert client.generate(PROMPT, **kwargs).generated_text == first.generated_text   # seeded
    streamed = list(client.generate_stream(PROMPT, max_new_tokens=5, seed=7, do_sample=True,
                                           stop_sequences=["zzzz"]))
    assert "".join(r.token.text for r in streamed) == first.generated_text
    assert streamed[-1].generated_text == first.generated_text


def test_text_generation_async_client(server):
    from text_generation import AsyncClient
    kwargs = tgi_kwargs()
    kwargs.pop("details")

    async def run():
        return await AsyncClient(server.url, headers=AUTH, timeout=60).generate(PROMPT, **kwargs)
    num_prompt_tokens = len(server.post("/tokenize", json={"inputs": PROMPT}).json())
    check_tgi_response(asyncio.run(run()), num_prompt_tokens)


def test_the_compat_route_answers_a_list_as_tgi_does(server):
    r = server.post("/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}})
    assert r.status_code == 200 and isinstance(r.json(), list) and len(r.json()) == 1
    assert set(r.json()[0]) >= {"generated_text"}
    assert isinstance(server.post("/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}).json(),
                      dict)


# -- model names ------------------------------------------------------------------------------

def served_model(server) -> str:
    return next(m["id"] for m in server.get("/v1/models").json()["data"] if m["task"] == "generate")


def test_inference_client_chat_without_a_model(server):
    client = InferenceClient(base_url=server.url, api_key=API_KEY, timeout=60)
    out = client.chat_completion([{"role": "user", "content": "Hi"}], max_tokens=4)
    assert out.choices[0].message.content is not None
    assert out.model == served_model(server)


@pytest.mark.parametrize("placeholder", ["gpt-3.5-turbo", "dummy", "tgi"])
def test_a_placeholder_name_falls_back_to_the_one_model_of_its_task(server, placeholder):
    oai = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    chat = oai.chat.completions.create(model=placeholder, max_tokens=3,
                                       messages=[{"role": "user", "content": "Hi"}])
    assert chat.model == served_model(server)
    embedding = oai.embeddings.create(model=placeholder, input="a sentence")
    assert embedding.model == EMBEDDING_MODEL


def test_strict_model_names_refuse_what_is_not_served(strict):
    oai = OpenAI(base_url=strict.url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(NotFoundError) as raised:
        oai.chat.completions.create(model="gpt-3.5-turbo", max_tokens=3, messages=[{"role": "user", "content": "Hi"}])
    assert raised.value.body["code"] == "model_not_found"
    assert served_model(strict) in raised.value.body["message"]


def test_models_retrieve(server):
    oai = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    card = oai.models.retrieve(served_model(server))
    assert card.id == served_model(server) and card.object == "model"
    assert oai.models.retrieve(EMBEDDING_MODEL).id == EMBEDDING_MODEL
    with pytest.raises(NotFoundError):
        oai.models.retrieve("not-a-model")


# -- LangChain --------------------------------------------------------------------------------

def test_langchain_chat_openai_without_a_model_name(server):
    from langchain_openai import ChatOpenAI
    chat = ChatOpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_tokens=4, max_retries=0)
    assert isinstance(chat.invoke("Hi").content, str)
    assert isinstance("".join(chunk.content for chunk in chat.stream("Hi")), str)
    assert len(chat.batch(["Hi", "Hello"])) == 2


def test_langchain_embeddings_truncated_by_the_server(truncating):
    from langchain_openai import OpenAIEmbeddings
    embeddings = OpenAIEmbeddings(base_url=truncating.url + "/v1", api_key="unused", max_retries=0,
                                  check_embedding_ctx_length=False)
    vector = embeddings.embed_documents([WORDS_400])[0]
    assert len(vector) == 384
    truncated = truncating.post("/embed", json={"inputs": WORDS_400, "truncate": True}).json()[0]
    assert max(abs(a - b) for a, b in zip(vector, truncated)) < 1e-5


def test_embeddings_truncate_prompt_tokens_per_request(server):
    too_long = server.post("/v1/embeddings", json={"input": WORDS_400})
    assert too_long.status_code == 400
    r = server.post("/v1/embeddings", json={"input": WORDS_400, "truncate_prompt_tokens": -1})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == 256               # MiniLM's maximum
    short = server.post("/v1/embeddings", json={"input": WORDS_400, "truncate_prompt_tokens": 10}).json()
    assert short["usage"]["prompt_tokens"] == 10


# -- parameters where clients put them --------------------------------------------------------

def test_zero_shot_classification_through_the_hub_client(server):
    client = InferenceClient(base_url=server.url + "/classify", api_key=API_KEY, timeout=60)
    out = client.zero_shot_classification("The match ended two to one", ["sports", "politics"])
    assert sorted(o.label for o in out) == ["politics", "sports"]
    assert abs(sum(o.score for o in out) - 1) < 1e-5
    multi = client.zero_shot_classification("The match ended two to one", ["sports", "politics"],
                                            multi_label=True)
    assert all(0 <= o.score <= 1 for o in multi) and abs(sum(o.score for o in multi) - 1) > 1e-6


def test_text_classification_and_feature_extraction_through_the_hub_client(server):
    client = InferenceClient(base_url=server.url + "/classify", api_key=API_KEY, timeout=60)
    labels = client.text_classification("I love this", top_k=2)
    assert len(labels) == 2 and {o.label for o in labels} <= set(LABELS)
    vectors = InferenceClient(base_url=server.url + "/embed", api_key=API_KEY).feature_extraction(
        "a sentence", normalize=True, truncate=True)
    assert vectors.shape[-1] == 384


# -- explicit null ------------------------------------------------------------------------------

BASE_BODIES = {
    "/generate": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": PROMPT, "parameters": {"max_new_tokens": 2}},
    "/v1/completions": {"prompt": PROMPT, "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
    "/v1/embeddings": {"input": "a sentence"},
    "/embed": {"inputs": "a sentence"},
    "/classify": {"inputs": "a sentence"},
    "/predict": {"inputs": "a sentence"},
    "/tokenize": {"inputs": PROMPT},
    "/detokenize": {"inputs": [5, 6, 7]},
    "/rerank": {"query": "a question", "texts": ["a sentence"]},
    "/v1/rerank": {"query": "a question", "documents": ["a sentence", {"text": "another"}]},
    "/v2/rerank": {"query": "a question", "documents": ["a sentence"]},
    "/similarity": {"inputs": {"source_sentence": "a sentence", "sentences": ["another"]}, "parameters": {}},
    "/embed_sparse": {"inputs": "a sentence"},
    "/fill_mask": {"inputs": "a [MASK] sentence", "parameters": {}},
}
# What keeps a request short once its cap is null: the rest of the model's length is long.
KEEP = {"max_new_tokens", "max_tokens"}


def resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def object_branch(spec: dict, schema: dict) -> dict | None:
    for branch in [schema, *schema.get("anyOf", [])]:
        branch = resolve(spec, branch)
        if branch.get("type") == "object" and "properties" in branch:
            return branch
    return None


def allows_null(spec: dict, schema: dict) -> bool:
    schema = resolve(spec, schema)
    return schema.get("type") == "null" or any(allows_null(spec, b) for b in schema.get("anyOf", []))


def optional_fields(spec: dict, schema: dict, path: str = ""):
    """(path, property schema) of every optional property, nested objects and arrays included."""
    schema = object_branch(spec, schema)
    if schema is None:
        return
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        where = f"{path}.{name}" if path else name
        if name not in required:
            yield where, prop
        yield from optional_fields(spec, prop, where)
        items = resolve(spec, prop).get("items") or next(
            (resolve(spec, b).get("items") for b in prop.get("anyOf", []) if "items" in resolve(spec, b)), None)
        if isinstance(items, dict):
            yield from optional_fields(spec, items, where + "[]")


def nulled(spec: dict, schema: dict, body: dict) -> dict:
    """body with every optional field null, at every depth the body reaches."""
    body = copy.deepcopy(body)
    schema = object_branch(spec, schema)
    required = set(schema.get("required", []))
    for name, prop in schema["properties"].items():
        if name in body and isinstance(body[name], dict) and object_branch(spec, prop):
            body[name] = nulled(spec, prop, body[name])
        elif name in body and isinstance(body[name], list) and body[name] and isinstance(body[name][0], dict):
            items = resolve(spec, prop).get("items") or resolve(spec, resolve(spec, prop)["anyOf"][0])["items"]
            body[name] = [nulled(spec, items, item) for item in body[name]]
        elif name not in required and name not in KEEP:
            body[name] = None
    return body


def request_schema(spec: dict, path: str) -> dict:
    return spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]


def test_every_optional_field_is_documented_as_nullable(server):
    spec = server.get("/openapi.json").json()
    for path in BASE_BODIES:
        for where, prop in optional_fields(spec, request_schema(spec, path)):
            assert allows_null(spec, prop), f"{path}: {where} does not accept null"


@pytest.mark.parametrize("path", sorted(BASE_BODIES))
def test_every_optional_field_accepts_null(server, path):
    spec = server.get("/openapi.json").json()
    body = nulled(spec, request_schema(spec, path), BASE_BODIES[path])
    r = server.post(path, json=body)
    assert r.status_code == 200, (json.dumps(body), r.text)
    top_level_null = {k: (v if k in BASE_BODIES[path] and k not in ("parameters",) else None)
                      for k, v in body.items()}
    r = server.post(path, json=top_level_null)
    assert r.status_code == 200, (json.dumps(top_level_null), r.text)


# -- length caps ------------------------------------------------------------------------------

def test_the_default_cap_applies_when_a_request_names_none(capped):
    chat = capped.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                      "ignore_eos": True}).json()
    assert chat["usage"]["completion_tokens"] == 4
    tgi = capped.post("/generate", json={"inputs": PROMPT, "parameters": {"details": True, "ignore_eos": True}})
    assert tgi.json()["details"]["generated_tokens"] == 4
    completion = capped.post("/v1/completions", json={"prompt": PROMPT, "ignore_eos": True}).json()
    assert completion["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("path, body, field", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 17}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 17}, "max_tokens"),
    ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 17}}, "parameters.max_new_tokens"),
])
def test_a_request_over_the_limit_is_refused_naming_it(capped, path, body, field):
    r = capped.post(path, json=body)
    assert r.status_code == 422, r.text
    message = r.text
    assert field in message and "16" in message and "--max-new-tokens-limit" in message
    ok = dict(body)
    ok.update({"max_tokens": 16} if "max_tokens" in body else {"parameters": {"max_new_tokens": 16}})
    assert capped.post(path, json=ok).status_code == 200


# -- error messages a person can act on ---------------------------------------------------------

def test_an_unknown_route_is_not_found(server):
    r = server.post("/v2/generate", json={})
    assert r.status_code == 404 and r.json()["error_type"] == "not_found"


def test_an_empty_prompt_is_one_sentence(server):
    r = server.post("/v1/completions", json={"prompt": "", "max_tokens": 2})
    message = r.json()["error"]["message"]
    assert r.status_code == 422 and message.count("prompt") >= 1 and ";" not in message, message


@pytest.mark.parametrize("path, body, wrong, right", [
    ("/generate", {"inputs": PROMPT, "parameters": {"stop_sequences": ["x"]}}, "stop_sequences", "stop"),
    ("/v1/completions", {"prompt": PROMPT, "max_new_tokens": 2}, "max_new_tokens", "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stop_sequences": ["x"]},
     "stop_sequences", "stop"),
])
def test_a_field_spelled_as_another_client_spells_it_is_named(server, path, body, wrong, right):
    r = server.post(path, json=body)
    assert r.status_code == 422
    assert wrong in r.text and f"use {right!r}" in r.text, r.text


def test_candidate_labels_are_optional_in_the_openapi_document(server):
    spec = server.get("/openapi.json").json()
    assert "candidate_labels" not in spec["components"]["schemas"]["ClassifyRequest"].get("required", [])


def test_a_dropped_stream_counts_as_499(server):
    before = server.metric("attnserve_requests_total", route="/generate_stream", status="499")
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 400, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate_stream", json=body, headers=AUTH, timeout=60) as r:
        next(sse_events(r.iter_lines()))                       # one token, then leave
    for _ in range(100):
        if server.metric("attnserve_requests_total", route="/generate_stream", status="499") > before:
            break
        asyncio.run(asyncio.sleep(0.05))
    assert server.metric("attnserve_requests_total", route="/generate_stream", status="499") == before + 1
