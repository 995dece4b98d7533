"""Every encoder route through a real server with several encoders, with the client a user
would pick: huggingface_hub's InferenceClient (feature_extraction, sentence_similarity,
fill_mask, text_classification), Cohere's SDK (Client and ClientV2 rerank), the openai SDK
(embeddings with dimensions); each answer equal to its reference (sentence-transformers,
transformers); bad input answered 4xx in the route family's error shape; the model chosen by
`model`; /docs describing every route and field."""
from __future__ import annotations

import httpx
import numpy as np
import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from service_helpers import API_KEY, EMBEDDING_MODEL, LABELS, shared_server, tiny_classifier

from engine.loader import resolve_model_path

sentence_transformers = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "berlin is a city in germany", "the cat sat on the mat",
             "Attention is all you need. " * 12, "ok"]
LONG_QUERY = "tell me everything about the history of the french capital " * 30


@pytest.fixture(scope="module")
def server(request, tiny_cross_encoder, tiny_splade, tiny_mlm):
    """MiniLM (embeddings, and a cosine reranker), a SPLADE model and a plain masked LM as
    embedding models; the tiny cross-encoder as the default reranker; a tiny 3-label classifier."""
    return shared_server(request, "encoders", [
        "--model", "none", "--embedding-model", EMBEDDING_MODEL, "--embedding-model", f"splade={tiny_splade}",
        "--embedding-model", f"mlm={tiny_mlm}", "--reranker-model", f"cross={tiny_cross_encoder}",
        "--reranker-model", EMBEDDING_MODEL, "--classifier-model", f"sentiment={tiny_classifier(request)}"],
        api_key=API_KEY)


@pytest.fixture(scope="module")
def st_minilm():
    return sentence_transformers.SentenceTransformer(str(resolve_model_path(EMBEDDING_MODEL)), device="cpu")


def native_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"}, body
    return body["error"]


def openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


# -- what is served ---------------------------------------------------------------------------

def test_models_and_info_list_each_encoder_with_its_tasks(server):
    cards = {card["id"]: card for card in server.get("/v1/models").json()["data"]}
    assert set(cards) == {EMBEDDING_MODEL, "splade", "mlm", "cross", "sentiment"}
    assert cards[EMBEDDING_MODEL]["task"] == "embed"
    # a --classifier-model classifies: the embedding models no longer do (zero-shot)
    assert set(cards[EMBEDDING_MODEL]["tasks"]) == {"embed", "similarity", "rerank"}
    assert (cards["splade"]["task"], set(cards["splade"]["tasks"])) == ("embed_sparse", {"embed_sparse", "fill_mask"})
    assert set(cards["mlm"]["tasks"]) == {"embed", "similarity", "embed_sparse", "fill_mask"}
    assert (cards["cross"]["task"], cards["cross"]["tasks"]) == ("rerank", ["rerank"])
    assert (cards["sentiment"]["task"], cards["sentiment"]["tasks"]) == ("classify", ["classify"])
    info = server.get("/info").json()
    assert (info["embedding_model_id"], info["reranker_model_id"], info["classifier_model_id"]) == \
        (EMBEDDING_MODEL, "cross", "sentiment")
    models = {m["id"]: m for m in info["models"]}
    assert models["cross"]["rerank_scoring"] == "cross-encoder"
    assert models[EMBEDDING_MODEL]["rerank_scoring"] == "cosine"          # a bi-encoder reranks by cosine
    assert models["splade"]["rerank_scoring"] is None and models["mlm"]["dimension"] == 32
    assert models[EMBEDDING_MODEL]["max_input_tokens"] == 256


# -- rerank -----------------------------------------------------------------------------------

def test_tei_rerank_equals_cross_encoder_predict(server, tiny_cross_encoder):
    expected = sentence_transformers.CrossEncoder(str(tiny_cross_encoder), device="cpu").predict(
        [(QUERY, d) for d in DOCUMENTS])
    answer = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "return_text": True}).json()
    assert [a["index"] for a in answer] == list(np.argsort(-expected))         # best first
    for a in answer:
        assert abs(a["score"] - expected[a["index"]]) < 1e-5 and a["text"] == DOCUMENTS[a["index"]]
    raw = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "raw_scores": True}).json()
    assert "text" not in raw[0]
    assert {a["index"]: a["score"] for a in raw}[0] == pytest.approx(float(np.log(expected[0] / (1 - expected[0]))),
                                                                      abs=1e-4)
    assert server.metric("attnserve_requests_total", route="/rerank", model="cross", status="200") >= 2


def test_rerank_by_a_bi_encoder_is_its_cosine(server, st_minilm):
    expected = st_minilm.similarity(st_minilm.encode([QUERY]), st_minilm.encode(DOCUMENTS))[0].numpy()
    answer = server.post("/rerank", json={"query": QUERY, "texts": DOCUMENTS, "model": EMBEDDING_MODEL}).json()
    for a in answer:
        assert abs(a["score"] - expected[a["index"]]) < 1e-5
    assert answer[0]["index"] == 0


def test_cohere_sdk_reranks(server, tiny_cross_encoder):
    cohere = pytest.importorskip("cohere")
    expected = sentence_transformers.CrossEncoder(str(tiny_cross_encoder), device="cpu").predict(
        [(QUERY, d) for d in DOCUMENTS])
    best = list(np.argsort(-expected))
    v2 = cohere.ClientV2(api_key=API_KEY, base_url=server.url).rerank(
        model="cross", query=QUERY, documents=DOCUMENTS, top_n=3)
    assert [r.index for r in v2.results] == best[:3]
    assert all(abs(r.relevance_score - expected[r.index]) < 1e-5 for r in v2.results)
    assert v2.meta.api_version.version == "2" and v2.meta.tokens.input_tokens > 0
    v1 = cohere.Client(api_key=API_KEY, base_url=server.url).rerank(
        model="cross", query=QUERY, documents=DOCUMENTS, return_documents=True)
    assert [r.index for r in v1.results] == best
    assert [r.document.text for r in v1.results] == [DOCUMENTS[i] for i in best]


def test_jina_shape_and_documents_cut_to_fit(server):
    """Jina / vLLM send {text} documents; a document too long beside the query is cut, never
    the query; max_tokens_per_doc cuts each document first."""
    body = {"model": "cross", "query": QUERY, "documents": [{"text": d} for d in DOCUMENTS] + ["word " * 500],
            "return_documents": True}
    answer = server.post("/v1/rerank", json=body).json()
    assert answer["model"] == "cross" and len(answer["results"]) == len(DOCUMENTS) + 1
    assert answer["usage"]["total_tokens"] == answer["meta"]["tokens"]["input_tokens"] > 0
    assert {r["index"]: r["document"]["text"] for r in answer["results"]}[0] == DOCUMENTS[0]
    short = server.post("/v1/rerank", json={**body, "max_tokens_per_doc": 2}).json()
    assert short["usage"]["total_tokens"] < answer["usage"]["total_tokens"]
    tei = server.post("/rerank", json={"query": QUERY, "texts": ["paris " * 4], "raw_scores": True}).json()
    cut = server.post("/v1/rerank", json={"model": "cross", "query": QUERY, "documents": ["paris " * 40],
                                          "max_tokens_per_doc": 4}).json()
    assert cut["results"][0]["relevance_score"] == pytest.approx(1 / (1 + np.exp(-tei[0]["score"])), abs=1e-6)


@pytest.mark.parametrize("route, body, status, field", [
    ("/rerank", {"query": QUERY, "texts": []}, 422, "texts"),
    ("/rerank", {"query": "", "texts": ["a"]}, 422, "query"),
    ("/rerank", {"query": QUERY, "texts": ["doc"] * 10_000}, 422, "texts"),
    ("/rerank", {"query": LONG_QUERY, "texts": ["a"]}, 400, None),
    ("/rerank", {"query": QUERY, "texts": ["a"], "model": "nope"}, 404, None),
    ("/rerank", {"query": QUERY, "texts": ["a"], "model": "splade"}, 404, None),
    ("/v1/rerank", {"query": QUERY, "documents": []}, 422, "documents"),
    ("/v1/rerank", {"query": QUERY, "documents": ["doc"] * 10_000}, 422, "documents"),
    ("/v1/rerank", {"query": LONG_QUERY, "documents": ["a"]}, 400, "query"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"], "model": "nope"}, 404, "model"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/v1/rerank", {"query": QUERY, "documents": ["a"], "rank_fields": ["title"]}, 422, "rank_fields"),
    ("/v2/rerank", {"query": QUERY, "documents": ["a"], "priority": 3}, 422, "priority"),
])
def test_rerank_refusals(server, route, body, status, field):
    r = server.post(route, json=body)
    if route == "/v2/rerank":                        # the native shape: only /v1 routes speak OpenAI's
        assert native_error(r, status).startswith(field)
    elif route == "/rerank":
        message = native_error(r, status)
        assert field is None or message.startswith(field), message
        if status == 404:
            assert "'cross'" in message and EMBEDDING_MODEL in message              # lists the rerankers
        if status == 400:
            assert "128" in message and "truncate" in message
    else:
        error = openai_error(r, status)
        assert error["param"] == field, error


def test_a_too_long_pair_is_cut_with_truncate(server):
    answer = server.post("/rerank", json={"query": LONG_QUERY, "texts": ["a", "b"], "truncate": True}).json()
    assert sorted(a["index"] for a in answer) == [0, 1]


# -- similarity, embeddings, Matryoshka ------------------------------------------------------

def test_sentence_similarity_client(server, st_minilm):
    sentences = ["a kitten plays", "the stock market fell", "a cat is playing"]
    expected = st_minilm.similarity(st_minilm.encode(["a cat plays"]), st_minilm.encode(sentences))[0].numpy()
    client = InferenceClient(base_url=server.url + "/similarity", api_key=API_KEY)
    scores = client.sentence_similarity("a cat plays", other_sentences=sentences)
    assert np.abs(np.array(scores) - expected).max() < 1e-5
    direct = server.post("/similarity", json={"inputs": {"source_sentence": "a cat plays", "sentences": sentences},
                                              "parameters": {"truncate": True}}).json()
    assert direct == pytest.approx(scores, abs=1e-7)
    assert native_error(server.post("/similarity", json={"inputs": {"source_sentence": "x", "sentences": []}}),
                        422).startswith("inputs.sentences")


def test_openai_embeddings_dimensions(server, st_minilm):
    texts = ["a cat", "the quick brown fox jumps over the lazy dog"]
    oai = OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    for dimensions in (64, 384):
        out = oai.embeddings.create(model=EMBEDDING_MODEL, input=texts, dimensions=dimensions)
        vectors = np.array([d.embedding for d in out.data])
        expected = st_minilm.encode(texts, truncate_dim=dimensions, normalize_embeddings=True)
        assert vectors.shape == (2, dimensions) and np.abs(vectors - expected).max() < 1e-5
    mlm = oai.embeddings.create(model="mlm", input=texts)          # another embedding model, by name
    assert mlm.model == "mlm" and len(mlm.data[0].embedding) == 32
    with pytest.raises(Exception) as refused:
        oai.embeddings.create(model=EMBEDDING_MODEL, input="x", dimensions=385)
    assert refused.value.status_code == 422
    unknown = openai_error(server.post("/v1/embeddings", json={"input": "x", "model": "nope"}), 404)
    assert EMBEDDING_MODEL in unknown["message"] and "'mlm'" in unknown["message"]   # several: listed
    assert server.metric("attnserve_embed_inputs_total", model="mlm") >= 2


def test_feature_extraction_client_with_tei_options(server, st_minilm):
    client = InferenceClient(base_url=server.url + "/embed", api_key=API_KEY)
    vector = client.feature_extraction("a cat", dimensions=16, truncate=True, truncation_direction="left")
    expected = st_minilm.encode(["a cat"], truncate_dim=16, normalize_embeddings=True)
    assert np.abs(np.asarray(vector) - expected).max() < 1e-5
    ids = [101] + [2000 + i for i in range(400)] + [102]
    left = server.post("/embed", json={"inputs": [ids], "truncate": True, "truncation_direction": "Left"}).json()
    right = server.post("/embed", json={"inputs": [ids], "truncate": True}).json()
    kept = server.post("/embed", json={"inputs": [ids[:1] + ids[-255:], ids[:255] + ids[-1:]]}).json()
    assert np.abs(np.array(left + right) - np.array(kept)).max() < 1e-6
    assert native_error(server.post("/embed", json={"inputs": "x", "prompt_name": "query"}), 422).startswith(
        "prompt_name")


# -- sparse embeddings, fill-mask ------------------------------------------------------------

def test_embed_sparse_equals_sparse_encoder(server, tiny_splade):
    from sentence_transformers import SparseEncoder
    texts = ["hello world", "a longer sentence about sparse retrieval"]
    expected = SparseEncoder(str(tiny_splade), device="cpu").encode(texts, convert_to_tensor=True).to_dense().numpy()
    answer = server.post("/embed_sparse", json={"inputs": texts}).json()
    for entries, row in zip(answer, expected):
        dense = np.zeros_like(row)
        dense[[e["index"] for e in entries]] = [e["value"] for e in entries]
        assert np.abs(dense - row).max() < 1e-5 and len(entries) == np.count_nonzero(row)
    assert native_error(server.post("/embed_sparse", json={"inputs": "x", "model": EMBEDDING_MODEL}), 404)


def test_fill_mask_client_equals_the_pipeline(server, tiny_mlm):
    pipeline = transformers.pipeline("fill-mask", model=str(tiny_mlm), tokenizer=str(tiny_mlm), device="cpu")
    client = InferenceClient(base_url=server.url + "/fill_mask", api_key=API_KEY)
    text = "paris is the [MASK] of france."
    for kwargs in ({}, {"top_k": 3}, {"targets": ["capital", "city"]}):
        expected = pipeline(text, **kwargs)
        got = client.fill_mask(text, **kwargs)
        assert [(p.token, p.token_str, p.sequence) for p in got] == \
            [(p["token"], p["token_str"], p["sequence"]) for p in expected]
        assert np.allclose([p.score for p in got], [p["score"] for p in expected], atol=1e-5, rtol=0)
    two = server.post("/fill_mask", json={"inputs": "the [MASK] sat on the [MASK].", "top_k": 2}).json()
    expected = pipeline("the [MASK] sat on the [MASK].", top_k=2)
    assert [[p["sequence"] for p in mask] for mask in two] == [[p["sequence"] for p in mask] for mask in expected]
    many = server.post("/fill_mask", json={"inputs": [text, "the [MASK] sat on the [MASK]."], "top_k": 1}).json()
    assert len(many) == 2 and isinstance(many[0][0], dict) and isinstance(many[1][0], list)
    assert native_error(server.post("/fill_mask", json={"inputs": "no mask"}), 422).startswith("inputs")
    assert native_error(server.post("/fill_mask", json={"inputs": text, "top_k": 2, "parameters": {"top_k": 3}}),
                        422).startswith("body")


# -- classification ---------------------------------------------------------------------------

def test_text_classification_client_equals_the_pipeline(server, request):
    path = tiny_classifier(request)
    pipeline = transformers.pipeline("text-classification", model=path, tokenizer=path, device="cpu", top_k=None)
    client = InferenceClient(base_url=server.url + "/classify", api_key=API_KEY)
    for text in ("I love this", "the worst film of the year, by far"):
        expected = pipeline([text])[0]               # every label's score
        got = client.text_classification(text, top_k=3)
        scores = {o.label: o.score for o in got}
        assert set(scores) == set(LABELS) and [o.score for o in got] == sorted(scores.values(), reverse=True)
        assert all(abs(scores[e["label"]] - e["score"]) < 1e-5 for e in expected)
    assert server.metric("attnserve_requests_total", route="/classify", model="sentiment", status="200") >= 2
    # One model serves the task: a name it does not know falls back to it (--strict-model-names: 404)
    fallback = server.post("/classify", json={"inputs": "I love this", "model": "gpt-4o-mini"})
    assert fallback.status_code == 200 and len(fallback.json()[0]) == len(LABELS)


# -- refusals of the embedding routes ---------------------------------------------------------

LONG_TEXT = "word " * 300                          # past MiniLM's 256 tokens (and the tiny models' 128)


@pytest.mark.parametrize("route, body, status, field", [
    ("/embed", {"inputs": []}, 422, "inputs"),
    ("/embed", {"inputs": ["a sentence"] * 10_000}, 422, "inputs"),
    ("/embed", {"inputs": LONG_TEXT}, 400, None),
    ("/embed", {"inputs": "x", "model": "nope"}, 404, None),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["a"] * 10_000}}, 422, "inputs.sentences"),
    ("/similarity", {"inputs": {"source_sentence": LONG_TEXT, "sentences": ["a"]}}, 400, None),
    ("/similarity", {"inputs": {"source_sentence": "x", "sentences": ["a"]}, "model": "nope"}, 404, None),
    ("/embed_sparse", {"inputs": []}, 422, "inputs"),
    ("/embed_sparse", {"inputs": ["a sentence"] * 10_000}, 422, "inputs"),
    ("/embed_sparse", {"inputs": LONG_TEXT}, 400, None),
    ("/embed_sparse", {"inputs": "x", "model": "nope"}, 404, None),
    ("/fill_mask", {"inputs": []}, 422, "inputs"),
    ("/fill_mask", {"inputs": ["a [MASK]."] * 10_000}, 422, "inputs"),
    ("/fill_mask", {"inputs": LONG_TEXT + "[MASK]"}, 400, None),
    ("/fill_mask", {"inputs": "a [MASK].", "model": "nope"}, 404, None),
    ("/classify", {"inputs": []}, 422, "inputs"),
    ("/classify", {"inputs": ["a sentence"] * 10_000}, 422, "inputs"),
    ("/classify", {"inputs": LONG_TEXT}, 400, None),
    ("/classify", {"inputs": "x", "model": "cross"}, 404, None),     # served, for another task
])
def test_embedding_route_refusals(server, route, body, status, field):
    message = native_error(server.post(route, json=body), status)
    assert field is None or message.startswith(field), message
    if status == 400:
        assert "truncate" in message, message
    if status == 404:
        assert body["model"] in message, message


@pytest.mark.parametrize("body, status, field", [
    ({"input": []}, 422, "input"),
    ({"input": ["a sentence"] * 10_000}, 422, "input"),
    ({"input": LONG_TEXT}, 400, "input"),
    ({"input": "x", "model": "nope"}, 404, "model"),
    ({"input": "x", "dimensions": 0}, 422, "dimensions"),
])
def test_openai_embeddings_refusals(server, body, status, field):
    error = openai_error(server.post("/v1/embeddings", json=body), status)
    assert error["param"] == field, error


# -- /docs ------------------------------------------------------------------------------------

ENCODER_ROUTES = ("/embed", "/classify", "/rerank", "/similarity", "/embed_sparse", "/fill_mask",
                  "/v1/embeddings", "/v1/rerank", "/v2/rerank")


def test_docs_describe_every_encoder_route_and_field(server):
    spec = server.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    assert server.get("/docs").status_code == 200
    for route in ENCODER_ROUTES:
        operation = spec["paths"][route]["post"]
        assert operation.get("summary") or operation.get("description"), route
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        for name, field in schemas[ref.rsplit("/", 1)[1]]["properties"].items():
            assert field.get("description"), f"{route}: {name} has no description"
