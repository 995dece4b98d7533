"""The HTTP API on a tiny random LLaMA, through clients nobody here wrote: the official
`openai` client, huggingface_hub's InferenceClient (TGI routes), and httpx."""
from __future__ import annotations

import json

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from service_helpers import API_KEY, EMBEDDING_MODEL, LABELS, SPLADE, main_server, sse_events

PROMPT = "The cat sat on the"


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


@pytest.fixture(scope="module")
def oai(server):
    return OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tgi(server):
    return InferenceClient(base_url=server.url, api_key=API_KEY, timeout=60)


def model_id(server) -> str:
    return server.get("/v1/models").json()["data"][0]["id"]


# -- OpenAI ---------------------------------------------------------------------------------

def test_models_lists_the_served_model(server, oai, tiny_llama):
    models = oai.models.list().data
    assert models[0].id == str(tiny_llama) and models[0].object == "model"


def test_completion(server, oai):
    out = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=7, temperature=0,
                                 extra_body={"ignore_eos": True})
    assert out.id.startswith("cmpl-") and out.object == "text_completion"
    assert out.model == model_id(server) and out.created > 0
    assert len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    prompt_tokens = len(server.post("/tokenize", json={"inputs": PROMPT}).json())
    assert out.usage.prompt_tokens == prompt_tokens
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == prompt_tokens + 7
    again = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=7, temperature=0,
                                   extra_body={"ignore_eos": True})
    assert again.choices[0].text == out.choices[0].text           # greedy is deterministic


def test_completion_stream_equals_non_stream_for_a_seed(server, oai):
    kwargs = dict(model=model_id(server), prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234,
                  extra_body={"ignore_eos": True})
    whole = oai.completions.create(**kwargs).choices[0].text
    chunks = list(oai.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole
    assert chunks[-2].choices[0].finish_reason == "length"
    other_seed = oai.completions.create(**{**kwargs, "seed": 99}).choices[0].text
    assert other_seed != whole


def test_completion_n_and_prompt_list(server, oai):
    out = oai.completions.create(model=model_id(server), prompt=["Once upon", "The dog"], n=2,
                                 max_tokens=3, seed=7, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    streamed = list(oai.completions.create(model=model_id(server), prompt=["Once upon", "The dog"], n=2,
                                           max_tokens=3, seed=7, stream=True, extra_body={"ignore_eos": True}))
    by_index: dict[int, str] = {}
    for chunk in streamed:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + choice.text
    assert by_index == {c.index: c.text for c in out.choices}


def test_completion_logprobs(server, oai):
    out = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=4, temperature=0,
                                 logprobs=3, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(chosen, abs=1e-4)   # greedy picks the top token
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0


def test_completion_stop_string(server, oai):
    base = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True}).choices[0].text
    stop = base.strip()[1:3] if len(base.strip()) >= 3 else base.strip()[:1]
    assert stop
    out = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=12, temperature=0,
                                 stop=[stop], extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "stop"
    assert stop not in out.choices[0].text and base.startswith(out.choices[0].text)


def test_echo_prepends_the_prompt(server, oai):
    out = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=2, temperature=0, echo=True,
                                 logprobs=1, extra_body={"ignore_eos": True})
    assert out.choices[0].text.startswith(PROMPT)
    lp = out.choices[0].logprobs
    prompt = server.post("/tokenize", json={"inputs": PROMPT}).json()
    assert len(lp.tokens) == len(prompt) + 2
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])   # (tests/test_prompt_logprobs.py: values)
    assert all(len(top) == 1 for top in lp.top_logprobs[1:])
    assert lp.text_offset[:len(prompt)] == [t["start"] for t in prompt]
    assert lp.text_offset[len(prompt)] == len(PROMPT)
    chunks = list(oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=2, temperature=0,
                                         echo=True, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text


def test_token_id_prompt(server, oai):
    ids = [t["id"] for t in server.post("/tokenize", json={"inputs": PROMPT}).json()]
    by_ids = oai.completions.create(model=model_id(server), prompt=ids, max_tokens=5, temperature=0)
    by_text = oai.completions.create(model=model_id(server), prompt=PROMPT, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_chat(server, oai):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    out = oai.chat.completions.create(model=model_id(server), messages=messages, max_tokens=6,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert out.id.startswith("chatcmpl-") and out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant" and out.choices[0].finish_reason == "length"
    # The prompt is the model's own chat template (tests/conftest.py CHAT_TEMPLATE), tokenized as is.
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) \
        + "<|im_start|>assistant\n"
    assert out.usage.prompt_tokens == len(server.post("/tokenize", json={"inputs": rendered}).json())
    assert out.usage.completion_tokens == 6


def test_chat_stream_equals_non_stream_and_reports_usage(server, oai):
    kwargs = dict(model=model_id(server), messages=[{"role": "user", "content": "Tell a story"}],
                  max_tokens=10, temperature=0.8, seed=42, extra_body={"ignore_eos": True})
    whole = oai.chat.completions.create(**kwargs)
    chunks = list(oai.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_n_seed_and_logprobs(server, oai):
    out = oai.chat.completions.create(model=model_id(server), messages=[{"role": "user", "content": "Hi"}],
                                      n=3, max_tokens=5, seed=5, logprobs=True, top_logprobs=2,
                                      extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2]
    for choice in out.choices:
        content = choice.logprobs.content
        assert len(content) == 5
        assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in content)
    assert out.usage.completion_tokens == 15


def test_chat_content_parts(server, oai):
    out = oai.chat.completions.create(
        model=model_id(server), max_tokens=3, temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}])
    plain = oai.chat.completions.create(model=model_id(server), max_tokens=3, temperature=0,
                                        messages=[{"role": "user", "content": "Hi there"}])
    assert out.choices[0].message.content == plain.choices[0].message.content


# -- TGI ------------------------------------------------------------------------------------

def test_tgi_text_generation(server, tgi):
    text = tgi.text_generation(PROMPT, max_new_tokens=6)
    assert isinstance(text, str) and text
    details = tgi.text_generation(PROMPT, max_new_tokens=6, details=True, decoder_input_details=True,
                                  top_n_tokens=2)
    assert details.generated_text == text                       # do_sample=false: greedy
    d = details.details
    assert d.generated_tokens == len(d.tokens) <= 6
    assert d.finish_reason in ("length", "eos_token")
    assert d.seed is None
    assert len(d.prefill) == len(server.post("/tokenize", json={"inputs": PROMPT}).json())
    assert len(d.top_tokens) == len(d.tokens) and all(len(t) == 2 for t in d.top_tokens)
    assert all(tok.logprob <= 0 for tok in d.tokens)


def test_tgi_stream_matches_generate(server, tgi):
    whole = tgi.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=3, details=True)
    events = list(tgi.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=3, stream=True,
                                      details=True))
    assert [e.index for e in events] == list(range(1, len(events) + 1))
    assert events[-1].generated_text == whole.generated_text
    assert all(e.generated_text is None for e in events[:-1])
    assert "".join(e.token.text for e in events) == whole.generated_text
    assert events[-1].details.finish_reason == whole.details.finish_reason
    assert events[-1].details.seed == 3 == whole.details.seed
    tokens = list(tgi.text_generation(PROMPT, max_new_tokens=8, do_sample=True, seed=3, stream=True))
    assert "".join(tokens) == whole.generated_text


def test_tgi_sampling_reports_a_seed_that_reproduces(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 8, "do_sample": True, "details": True,
                                            "ignore_eos": True}}
    first = server.post("/generate", json=body).json()
    seed = first["details"]["seed"]
    assert isinstance(seed, int)
    again = server.post("/generate", json={**body, "parameters": {**body["parameters"], "seed": seed}}).json()
    assert again["generated_text"] == first["generated_text"]


def test_tgi_return_full_text_truncate_and_stop(server):
    base = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "ignore_eos": True}}
    text = server.post("/generate", json=base).json()["generated_text"]
    full = server.post("/generate", json={**base, "parameters": {**base["parameters"],
                                                                 "return_full_text": True}}).json()
    assert full["generated_text"] == PROMPT + text
    truncated = server.post("/generate", json={"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "truncate": 2, "details": True, "decoder_input_details": True}}).json()
    assert len(truncated["details"]["prefill"]) == 2
    stop = text.strip()[:2]
    stopped = server.post("/generate", json={**base, "parameters": {**base["parameters"], "stop": [stop],
                                                                    "details": True}}).json()
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    assert stopped["generated_text"].endswith(stop)             # TGI keeps the stop sequence
    assert text.startswith(stopped["generated_text"])


def test_generate_stream_sse_format(server):
    with server.client() as client, client.stream(
            "POST", "/generate_stream", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 4,
                                                                              "ignore_eos": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(e) for e in sse_events(r.iter_lines())]
    assert len(events) == 4
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 4, "seed": None,
                                     "input_length": len(server.post("/tokenize", json={"inputs": PROMPT}).json())}
    assert set(events[0]["token"]) == {"id", "text", "logprob", "special"}


def test_tokenize_and_detokenize(server):
    tokens = server.post("/tokenize", json={"inputs": "The cat sat"}).json()
    assert "".join(t["text"] for t in tokens) == "The cat sat"
    assert [("The cat sat")[t["start"]:t["stop"]] for t in tokens] == [t["text"] for t in tokens]
    text = server.post("/detokenize", json={"inputs": [t["id"] for t in tokens]}).json()["text"]
    assert text == "The cat sat"


# -- encoders (the real all-MiniLM-L6-v2, a tiny classifier with a head) ----------------------

def cosine(a, b) -> float:
    return sum(x * y for x, y in zip(a, b)) / (sum(x * x for x in a) * sum(y * y for y in b)) ** 0.5


def test_openai_embeddings(server, oai):
    texts = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."]
    out = oai.embeddings.create(model=EMBEDDING_MODEL, input=texts)       # the client asks for base64
    vectors = [d.embedding for d in out.data]
    assert [d.index for d in out.data] == [0, 1, 2] and out.model == EMBEDDING_MODEL
    assert all(len(v) == 384 and abs(sum(x * x for x in v) - 1) < 1e-4 for v in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2]) + 0.3
    assert out.usage.prompt_tokens == out.usage.total_tokens > 3 * 3
    floats = server.post("/v1/embeddings", json={"input": texts, "encoding_format": "float"}).json()
    for vector, data in zip(vectors, floats["data"]):
        assert data["embedding"] == pytest.approx(vector, abs=1e-6)
    one = oai.embeddings.create(model=EMBEDDING_MODEL, input="A man is eating food.", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)   # batching changes nothing


def test_tei_embed(server):
    texts = ["A man is eating food.", "ok"]
    vectors = server.post("/embed", json={"inputs": texts}).json()
    assert len(vectors) == 2 and len(vectors[0]) == 384
    raw = server.post("/embed", json={"inputs": texts[0], "normalize": False}).json()
    norm = sum(x * x for x in raw[0]) ** 0.5
    assert abs(norm - 1) > 1e-3 and [x / norm for x in raw[0]] == pytest.approx(vectors[0], abs=1e-5)
    client = InferenceClient(base_url=server.url + "/embed", api_key=API_KEY)
    assert client.feature_extraction(texts[0])[0].tolist() == pytest.approx(vectors[0], abs=1e-5)
    long = "word " * 400
    r = server.post("/embed", json={"inputs": long})
    assert r.status_code == 400 and "256" in r.json()["error"]
    assert len(server.post("/embed", json={"inputs": long, "truncate": True}).json()[0]) == 384


def test_tei_classify_with_the_head_and_zero_shot(server):
    scores = server.post("/classify", json={"inputs": ["I love it", "I hate it"]}).json()
    assert len(scores) == 2
    for row in scores:
        assert sorted(s["label"] for s in row) == sorted(LABELS)
        assert [s["score"] for s in row] == sorted((s["score"] for s in row), reverse=True)
        assert sum(s["score"] for s in row) == pytest.approx(1, abs=1e-5)
    assert server.post("/predict", json={"inputs": ["I love it", "I hate it"]}).json() == scores
    zero_shot = server.post("/classify", json={"inputs": "The match ended 2-1",
                                               "candidate_labels": ["sports", "politics"]}).json()
    assert sorted(s["label"] for s in zero_shot[0]) == ["politics", "sports"]
    client = InferenceClient(base_url=server.url + "/classify", api_key=API_KEY)
    best = client.text_classification("I love it", top_k=1)
    assert len(best) == 1 and best[0].label == scores[0][0]["label"]


def test_models_lists_every_served_model(server, oai, tiny_llama):
    cards = {m.id: m for m in oai.models.list().data}
    assert set(cards) == {str(tiny_llama), EMBEDDING_MODEL, SPLADE,
                          server.args[server.args.index("--classifier-model") + 1]}
    info = server.get("/info").json()
    assert info["embedding_model_id"] == EMBEDDING_MODEL


def test_embed_metrics(server):
    inputs = server.metric("attnserve_embed_inputs_total")
    batches = server.metric("attnserve_embed_batch_size_count")
    assert server.post("/embed", json={"inputs": ["a", "b", "c"]}).status_code == 200
    assert server.post("/v1/embeddings", json={"input": "d"}).status_code == 200
    assert server.metric("attnserve_embed_inputs_total") - inputs == 4
    assert server.metric("attnserve_embed_batch_size_count") - batches >= 2


# -- operations ---------------------------------------------------------------------------

def test_health_ready_info(server, tiny_llama):
    assert server.get("/health").json() == {"status": "ok"}
    assert server.get("/ready").status_code == 200
    info = server.get("/info").json()
    assert info["model_id"] == str(tiny_llama)
    assert info["max_model_len"] == 512 and info["block_size"] == 16
    assert info["model_device_type"] == "cpu" and info["model_dtype"] == "float32"
    assert 503 in server.ready_statuses       # /ready answered 503 (not a refused connection) while loading


def test_request_id_is_echoed_or_assigned(server):
    r = server.get("/info", headers={"X-Request-Id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    assigned = server.get("/info").headers["x-request-id"]
    assert len(assigned) >= 16 and assigned != "abc-123"


def test_openapi_documents_routes_and_errors(server):
    spec = server.get("/openapi.json").json()
    paths = spec["paths"]
    for path in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions",
                 "/v1/models", "/v1/embeddings", "/embed", "/classify", "/predict", "/tokenize",
                 "/detokenize", "/health", "/ready", "/info", "/metrics"):
        assert path in paths, path
    completions = paths["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "413", "422", "429", "503"} <= set(completions)
    assert completions["422"]["content"]["application/json"]["schema"]["$ref"].endswith("OpenAIErrorResponse")
    stream = paths["/generate_stream"]["post"]["responses"]["200"]["content"]
    assert list(stream) == ["text/event-stream"]
    event = stream["text/event-stream"]["schema"]["properties"]["data"]["contentSchema"]["anyOf"]
    assert event[0]["$ref"].endswith("/StreamResponse") and event[1]["$ref"].endswith("/NativeError")
    chat = paths["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert "ChatCompletionChunk" in json.dumps(chat["text/event-stream"])
    assert chat["application/json"]["schema"]["$ref"].endswith("/ChatCompletion")
    generate = paths["/generate"]["post"]
    assert generate["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("GenerateResponse")
    assert generate["responses"]["429"]["content"]["application/json"]["schema"]["$ref"].endswith("NativeError")
    params = spec["components"]["schemas"]["GenerateParameters"]["properties"]
    assert params["max_new_tokens"]["anyOf"][0]["minimum"] == 1
    assert server.get("/docs").status_code == 200


def test_metrics_count_exactly_what_was_sent(server):
    route = "/generate"
    before = {name: server.metric(name) for name in (
        "attnserve_prompt_tokens_total", "attnserve_generation_tokens_total",
        "attnserve_time_to_first_token_seconds_count", "attnserve_queue_time_seconds_count")}
    before_requests = server.metric("attnserve_requests_total", route=route, status="200")
    before_errors = server.metric("attnserve_requests_total", route=route, status="422")
    before_itl = server.metric("attnserve_inter_token_latency_seconds_count")
    prompts = ["one two three", "The dog sat on the log", "Paged attention"]
    num_prompt = sum(len(server.post("/tokenize", json={"inputs": p}).json()) for p in prompts)
    for i, prompt in enumerate(prompts):
        r = server.post(route, json={"inputs": prompt, "parameters": {"max_new_tokens": 3 + i, "ignore_eos": True}})
        assert r.status_code == 200
    assert server.post(route, json={"inputs": ""}).status_code == 422
    assert server.metric("attnserve_requests_total", route=route, status="200") - before_requests == 3
    assert server.metric("attnserve_requests_total", route=route, status="422") - before_errors == 1
    assert server.metric("attnserve_prompt_tokens_total") - before["attnserve_prompt_tokens_total"] == num_prompt
    assert server.metric("attnserve_generation_tokens_total") - before["attnserve_generation_tokens_total"] == 3 + 4 + 5
    assert server.metric("attnserve_time_to_first_token_seconds_count") - before["attnserve_time_to_first_token_seconds_count"] == 3
    assert server.metric("attnserve_queue_time_seconds_count") - before["attnserve_queue_time_seconds_count"] == 3
    assert server.metric("attnserve_inter_token_latency_seconds_count") - before_itl == 2 + 3 + 4
    text = server.metrics()
    for name in ("attnserve_requests_total", "attnserve_preemptions_total", "attnserve_prefix_cache_queries_total",
                 "attnserve_prefix_cache_hits_total", "attnserve_num_requests_running",
                 "attnserve_num_requests_waiting", "attnserve_kv_cache_usage_ratio", "attnserve_engine_alive",
                 "attnserve_request_duration_seconds_bucket", "attnserve_engine_step_duration_seconds_bucket",
                 "attnserve_batch_size_bucket", "attnserve_build_info", "attnserve_embed_inputs_total",
                 "attnserve_embed_batch_size_bucket", "attnserve_aborted_requests_total"):
        assert name in text, name
    assert server.metric("attnserve_engine_alive") == 1
    assert server.metric("attnserve_prefix_cache_queries_total") > 0


def test_prefix_cache_hits_are_counted(server):
    prompt = "Paged attention keeps keys and values in fixed-size blocks. " * 4   # > 2 blocks
    hits = server.metric("attnserve_prefix_cache_hits_total")
    for _ in range(2):
        assert server.post("/generate", json={"inputs": prompt, "parameters": {"max_new_tokens": 1}}).status_code == 200
    assert server.metric("attnserve_prefix_cache_hits_total") - hits >= 32


def test_the_key_never_reaches_the_logs(server):
    server.get("/info", headers={"Authorization": "Bearer wrong-key-1234"})
    logs = server.logs()
    assert "POST /generate 200" in logs                         # one line per request
    assert API_KEY not in logs and "wrong-key-1234" not in logs
    assert PROMPT not in logs                                   # no prompts without --log-prompts
    assert "Traceback" not in logs
