"""Structured outputs over HTTP, through the clients people use: the openai SDK's
chat.completions.parse(response_format=PydanticModel), json_object, vLLM's guided_* fields on
both OpenAI routes, TGI's grammar through text_generation and huggingface_hub, logit_bias, and
the errors (a schema that does not compile is a 400 naming it, before anything is queued)."""
import json
import re
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from service_helpers import API_KEY, main_server, sse_events

SCHEMA = {"type": "object",
          "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
          "required": ["city", "days", "tags"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]{1,5}-[0-9]{2}"


class Trip(BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = Field(ge=1, le=9)
    by_train: bool


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


ASK = [{"role": "user", "content": "Plan a trip."}]


# -- OpenAI --------------------------------------------------------------------------------------

def test_sdk_parse_returns_the_pydantic_object(client):
    for seed in range(3):
        out = client.chat.completions.parse(model="tiny", messages=ASK, response_format=Trip, seed=seed, max_tokens=200)
        assert out.choices[0].finish_reason == "stop"
        assert isinstance(out.choices[0].message.parsed, Trip)
    with client.chat.completions.stream(model="tiny", messages=ASK, response_format=Trip, seed=7,
                                        max_tokens=200) as stream:
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Trip)


def test_json_schema_n_completions_streamed_and_not(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": SCHEMA, "strict": True}}
    out = client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, n=4, seed=1, max_tokens=300)
    for choice in out.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, response_format=fmt, n=2, seed=1,
                                                 max_tokens=300, stream=True))
    texts = ["", ""]
    for chunk in chunks:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == [out.choices[0].message.content, out.choices[1].message.content]   # same seeds, same text


def test_json_object_parses(client):
    out = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                         n=8, seed=5, max_tokens=400)
    finished = [c for c in out.choices if c.finish_reason == "stop"]
    assert len(finished) >= 2                             # random weights: some may run out of tokens
    for choice in finished:
        assert isinstance(json.loads(choice.message.content), dict)
    for choice in out.choices:
        assert choice.message.content.lstrip().startswith("{")


def test_guided_choice_and_regex_on_both_routes(client):
    choices = ["pizza", "pasta", "risotto al funghi"]
    for seed in range(4):
        chat = client.chat.completions.create(model="tiny", messages=ASK, seed=seed, max_tokens=50,
                                              extra_body={"guided_choice": choices})
        assert chat.choices[0].message.content in choices
        text = client.completions.create(model="tiny", prompt="Dinner:", seed=seed, max_tokens=50,
                                         extra_body={"guided_regex": REGEX})
        assert re.fullmatch(REGEX, text.choices[0].text) and text.choices[0].finish_reason == "stop"
    completion = client.completions.create(model="tiny", prompt="A trip:", seed=3, max_tokens=300,
                                           extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                               "name": "trip", "schema": SCHEMA}}})
    jsonschema.validate(json.loads(completion.choices[0].text), SCHEMA)
    # TGI's response_format form, as huggingface_hub's chat_completion sends it.
    tgi_form = client.chat.completions.create(model="tiny", messages=ASK, seed=2, max_tokens=50,
                                              response_format={"type": "regex", "value": REGEX})
    assert re.fullmatch(REGEX, tgi_form.choices[0].message.content)


def test_a_schema_that_does_not_compile_is_a_400_naming_it_before_anything_is_queued(server, client):
    before = server.metric("attnserve_prompt_tokens_total")
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model="tiny", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": "object", "properties": {
                "x": {"type": "array", "uniqueItems": True}}}}})
    error = raised.value.body
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "invalid_grammar"
    assert "uniqueItems" in error["message"]
    r = server.post("/v1/completions", json={"prompt": "hi", "guided_regex": "([a-z]"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    r = server.post("/v1/chat/completions", json={"messages": ASK, "stream": True, "guided_grammar": "start: nope"})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")   # not a stream
    assert server.metric("attnserve_prompt_tokens_total") == before


def test_logit_bias_over_http(server, client):
    for prompt in ("The cat sat", "The cat", "Once upon a time", "def add(a, b):"):
        greedy = server.post("/generate", json={"inputs": prompt, "parameters": {
            "max_new_tokens": 1, "details": True, "top_n_tokens": 2}}).json()["details"]
        first, second = greedy["top_tokens"][0]
        if "\ufffd" not in first["text"] + second["text"] and first["text"] != second["text"]:
            break                                   # two whole, distinct tokens: comparable as text
    banned = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                       logit_bias={str(first["id"]): -100})
    assert banned.choices[0].text == second["text"]                  # the runner-up, once the first is out
    forced = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=3, seed=0,
                                            logit_bias={"77": 100}, extra_body={"ignore_eos": True})
    assert forced.choices[0].message.content == server.post("/detokenize", json={"inputs": [77, 77, 77]}).json()["text"]
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.completions.create(model="tiny", prompt="x", logit_bias={"5": 1, "100000": -1})
    assert raised.value.body["param"] == "logit_bias" and "100000" in raised.value.body["message"]


# -- TGI -----------------------------------------------------------------------------------------

def test_text_generation_client_grammar_on_generate_and_stream(server):
    from text_generation import Client
    from text_generation.types import Grammar, GrammarType
    tgi = Client(server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)
    json_grammar = Grammar(type=GrammarType.Json, value=SCHEMA)
    out = tgi.generate("A trip:", max_new_tokens=300, do_sample=True, seed=1, grammar=json_grammar)
    jsonschema.validate(json.loads(out.generated_text), SCHEMA)
    assert out.details.finish_reason.value == "eos_token"
    streamed = "".join(r.token.text for r in tgi.generate_stream("A trip:", max_new_tokens=300, do_sample=True,
                                                                 seed=1, grammar=json_grammar))
    assert streamed == out.generated_text
    regex = tgi.generate("Code:", max_new_tokens=50, grammar=Grammar(type=GrammarType.Regex, value=REGEX))
    assert re.fullmatch(REGEX, regex.generated_text)


def test_huggingface_hub_grammar(server):
    from huggingface_hub import InferenceClient
    hub = InferenceClient(base_url=server.url, api_key=API_KEY)
    text = hub.text_generation("Code:", max_new_tokens=50, grammar={"type": "regex", "value": REGEX}, seed=3,
                               do_sample=True)
    assert re.fullmatch(REGEX, text)
    pieces = list(hub.text_generation("Trip:", max_new_tokens=300, stream=True, seed=3, do_sample=True,
                                      grammar={"type": "json", "value": json.dumps(SCHEMA)}))
    jsonschema.validate(json.loads("".join(pieces)), SCHEMA)


def test_tgi_grammar_errors(server):
    r = server.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "(a"}}})
    assert r.status_code == 400 and r.json()["error_type"] == "validation"
    assert r.json()["error"].startswith("parameters.grammar.value: the regular expression does not compile")
    r = server.post("/generate", json={"inputs": "x", "parameters": {"grammar": {"type": "json", "value": "{nope"}}})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]
    r = server.post("/generate_stream", json={"inputs": "x", "parameters": {"grammar": {"type": "json_schema",
                                                                                          "value": {"schema": 3}}}})
    assert r.status_code == 422 and r.headers["content-type"].startswith("application/json")
    with server.client() as http:
        with http.stream("POST", "/generate_stream", json={"inputs": "x", "parameters": {
                "max_new_tokens": 300, "grammar": {"type": "json_schema", "value": {"name": "t", "schema": SCHEMA}},
                "do_sample": True, "seed": 2}}) as r:
            events = [json.loads(e) for e in sse_events(r.iter_lines())]
    jsonschema.validate(json.loads(events[-1]["generated_text"]), SCHEMA)
