"""Nobody gets in without a key: every route the app serves (walked from the routers and the
OpenAPI document, so a new route cannot be forgotten), streams and /docs included; keys are
compared in constant time; keys and prompts never reach the log (at debug level); a request's
`model` only ever names a loaded model (no path is opened from a request: a Python audit hook
watches every file the server opens); CORS is off unless configured; X-Request-Id is echoed.
"""
from __future__ import annotations

import hmac
import json
import re
import shutil
import time
from types import SimpleNamespace

import httpx
import pytest
from fault_server import FaultServer
from service_helpers import EMBEDDING_MODEL, TINY_ARGS

KEYS = ["sk-attnserve-first-7c1e5d", "sk-attnserve-second-90ab3f"]
OPEN_PATHS = {"/health", "/ready", "/metrics"}
DOC_PATHS = ["/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"]
BODIES = {       # a valid body per route: a missing key check would answer 200, not 422
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 2}, "stream": True},
    "/tokenize": {"inputs": "hi"}, "/detokenize": {"inputs": [1, 2]}, "/embed": {"inputs": "hi"},
    "/classify": {"inputs": "hi", "candidate_labels": ["a", "b"]},
    "/predict": {"inputs": "hi", "candidate_labels": ["a", "b"]}, "/v1/embeddings": {"input": "hi"},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2, "stream": True},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    "/rerank": {"query": "hi", "texts": ["a", "b"]}, "/similarity": {"inputs": {"source_sentence": "hi", "sentences": ["a"]}},
    "/v1/rerank": {"query": "hi", "documents": ["a"]}, "/v2/rerank": {"query": "hi", "documents": ["a"]},
    "/embed_sparse": {"inputs": "hi"}, "/fill_mask": {"inputs": "hi [MASK]"},
}
AUDIT = "attnserve-probe"


@pytest.fixture(scope="module")
def server(tiny_llama, tiny_splade, tmp_path_factory):
    """Keys from the environment, the model served from a directory the audit hook watches, and
    a copy of it next door that no request may open."""
    root = tmp_path_factory.mktemp("security")
    served = shutil.copytree(tiny_llama, root / f"{AUDIT}-served")
    shutil.copytree(tiny_llama, root / f"{AUDIT}-other")
    server = FaultServer(["--model", str(served), *TINY_ARGS, "--log-level", "debug", "--embedding-model",
                          EMBEDDING_MODEL, "--embedding-model", f"splade={tiny_splade}"],   # (/embed_sparse, /fill_mask)
                         env={"ATTNSERVE_API_KEYS": ",".join(KEYS), "ATTNSERVE_TEST_AUDIT": AUDIT})
    server.api_key = KEYS[1]
    server.start()
    server.probe_root = root
    server.ready_at = len(server.logs())         # what it opened to load is logged before this
    yield server
    assert server.stop() == 0


def served_routes() -> set[tuple[str, str]]:
    """(method, path as the OpenAPI document writes it) of every route."""
    from service.routes import admin, cohere, openai, tei, tgi
    return {(method, re.sub(r"\{(\w+):\w+\}", r"{\1}", route.path))
            for router in (tgi.router, tei.router, openai.router, cohere.router, admin.router)
            for route in router.routes for method in route.methods}


_clients: dict[str, httpx.Client] = {}


def call(server, method: str, path: str, headers: dict | list) -> httpx.Response:
    """One request with a route's valid body, on a kept-alive connection."""
    client = _clients.get(server.url) or _clients.setdefault(server.url, httpx.Client(base_url=server.url, timeout=60))
    return client.request(method, concrete(path), json=BODIES.get(path) if method == "POST" else None,
                          headers=headers)


def concrete(path: str) -> str:
    return path.replace("{model_id}", EMBEDDING_MODEL)             # a served model's card


def test_every_route_needs_a_key_but_the_open_three(server):
    spec = server.get("/openapi.json").json()
    documented = {(method.upper(), path) for path, operations in spec["paths"].items() for method in operations}
    assert served_routes() == documented             # nothing is served that the document omits
    routes = sorted(documented | {("GET", path) for path in DOC_PATHS})
    key = KEYS[0]
    refused = [[], [("Authorization", "")], [("Authorization", "Bearer")], [("Authorization", "Bearer  x")],
               [("Authorization", f"Bearer {key}x")], [("Authorization", f"Bearer {key[:-1]}")],
               [("Authorization", f"Bearer {key.upper()}")], [("Authorization", f"Basic {key}")],
               [("Authorization", key)], [("Authorization", f"Bearer {KEYS[0]},{KEYS[1]}")],
               [("Authorization", f"Bearer {key} {key}")], [("X-API-Key", key)], [("Cookie", f"token={key}")],
               [("Authorization", b"Bearer \xff\xfe" + key.encode())], [("Authorization", f"Bearer\t{key}")]]
    num_refused = 0
    for method, path in routes:
        for headers in refused:
            r = call(server, method, path, headers)
            if path in OPEN_PATHS:
                assert r.status_code == 200, (path, headers, r.status_code)
                continue
            assert r.status_code == 401, (method, path, headers, r.status_code, r.text[:200])
            assert r.headers["content-type"] == "application/json"       # never a stream
            assert r.headers["www-authenticate"] == "Bearer"
            body = r.json()
            assert (body["error"]["type"] == "authentication_error") if path.startswith("/v1/") \
                else (body["error_type"] == "unauthorized"), body
            num_refused += 1
        for good in KEYS:                      # every configured key opens every route
            r = call(server, method, path, [("Authorization", f"Bearer {good}")])
            assert r.status_code == 200, (method, path, r.status_code, r.text[:200])
            r = call(server, method, path, [("Authorization", f"bearer   {good}")])
            assert r.status_code == 200, (method, path, r.status_code)
    print(f"\n{len(routes)} routes x {len(refused)} bad credentials: {num_refused} refusals, "
          f"{3 * len(refused)} answers from the open routes")


def test_no_path_spelling_reaches_a_route_without_the_key(server):
    for path in ("/generate/", "//generate", "/GENERATE", "/%67enerate", "/generate%00", "/v1//completions",
                 "/v1/completions/", "/./generate", "/health/../generate", "/metrics/", "/health/x", "/docs/",
                 "/openapi.json/", "/v1/models/smollm2"):
        for method in ("GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"):
            r = httpx.request(method, server.url + path, json=BODIES["/generate"], timeout=30)
            assert r.status_code in (401, 404, 405), (method, path, r.status_code)


def test_keys_are_compared_in_constant_time(monkeypatch):
    """Every configured key is compared with hmac.compare_digest, whatever the header holds and
    whichever key matches: how long the check takes says nothing about the keys."""
    from service import middleware
    from service.settings import Settings
    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    check = middleware.ServiceMiddleware(None, SimpleNamespace(settings=Settings(api_keys=KEYS)), frozenset())
    for header, expected in [(f"Bearer {KEYS[0]}", True), (f"Bearer {KEYS[1]}", True), ("Bearer nope", False),
                             (f"Bearer {KEYS[0][:8]}", False), (f"Basic {KEYS[0]}", False), ("", False),
                             ("Bearer " + "x" * 10_000, False)]:
        compared.clear()
        assert check._authorized(header) is expected, header
        assert len(compared) == len(KEYS), (header, compared)
        assert {b for _, b in compared} == {key.encode() for key in KEYS}
        assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in compared)


def test_keys_and_prompts_never_reach_the_logs(server):
    secret = "PROMPT-SECRET-41f7"
    start = len(server.logs())
    oai = lambda body: {**body, "user": secret, "stop": [secret]}     # noqa: E731
    requests = [
        ("/generate", {"inputs": secret, "parameters": {"max_new_tokens": 3, "stop": [secret]}}),
        ("/generate_stream", {"inputs": secret, "parameters": {"max_new_tokens": 3}}),
        ("/", {"inputs": secret, "parameters": {"max_new_tokens": 3}}),
        ("/v1/completions", oai({"prompt": secret, "max_tokens": 3})),
        ("/v1/completions", oai({"prompt": [secret, secret], "max_tokens": 3, "stream": True})),
        ("/v1/chat/completions", oai({"messages": [{"role": "user", "content": secret, "name": secret}],
                                      "max_tokens": 3})),
        ("/v1/chat/completions", oai({"messages": [{"role": "user", "content": secret}], "max_tokens": 3,
                                      "stream": True})),
        ("/tokenize", {"inputs": secret}), ("/embed", {"inputs": [secret, secret]}),
        ("/classify", {"inputs": secret, "candidate_labels": [secret, "other"]}),
        ("/v1/embeddings", {"input": secret, "user": secret}),
        # and refused: 422, 400 (too long), 404 (unknown model), 413, 415
        ("/generate", {"inputs": secret, "parameters": {"frobnicate": secret}}),
        ("/v1/completions", {"prompt": f"{secret} " * 400}),
        ("/v1/completions", {"prompt": secret, "model": secret}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": secret * 300_000}]}),
    ]
    for path, body in requests:
        r = server.post(path, json=body)
        assert r.status_code in (200, 400, 404, 413, 422), (path, r.status_code)
    server.post("/generate", content=json.dumps({"inputs": secret}).encode(), headers={"Content-Type": "text/xml"})
    server.post("/generate", json={"inputs": secret, "parameters": {"max_new_tokens": 3}},
                headers={"X-Request-Id": "fault-raise-logs"})                  # fails in the engine
    with pytest.raises(httpx.ReadTimeout):                                        # leaves mid-request
        server.post("/generate", json={"inputs": secret, "parameters": {"max_new_tokens": 400, "ignore_eos": True}},
                    timeout=httpx.Timeout(30, read=0.2))
    for key in (f"Bearer {KEYS[0]}x", f"Bearer {KEYS[1][:-2]}", "Bearer sk-attnserve-SECRET-guess"):
        httpx.post(server.url + "/generate", json={"inputs": secret}, headers={"Authorization": key})
    server.wait_idle()
    logs = server.logs()
    assert "POST /generate 200" in logs and "POST /v1/chat/completions 200" in logs   # it does log requests
    assert "fault-raise-logs" in logs[start:] and "DEBUG" in logs
    for leaked in (secret, "SECRET", KEYS[0], KEYS[1], KEYS[0][:12], KEYS[1][-12:]):
        assert leaked not in logs, (leaked, [line for line in logs.splitlines() if leaked in line][:3])


def test_the_model_argument_only_names_loaded_models(server):
    other = server.probe_root / f"{AUDIT}-other"
    served_id = server.get("/v1/models").json()["data"][0]["id"]
    probes = [str(other), f"{other}/", str(other / "config.json"), f"file://{other}", f"{other}/../{other.name}",
              f"../{other.name}", other.name, f"~/{other.name}", f"{served_id}/../{other.name}", f"{served_id}/",
              f"{served_id}/config.json", f"hf://{AUDIT}/x", f"{AUDIT}-other", "smollm2-135m-instruct",
              "all-minilm-l6-v2/../" + other.name, "/etc/passwd", "\\\\server\\share", "C:\\model"]
    for model in probes:
        # A name no model has is answered by the one model of its task: compared, never opened.
        for path, body, answered_by in [
                ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "model": model}, served_id),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                          "model": model}, served_id),
                ("/v1/embeddings", {"input": "hi", "model": model}, EMBEDDING_MODEL)]:
            r = server.post(path, json=body)
            assert r.status_code == 200 and r.json()["model"] == answered_by, (model, r.text[:200])
        r = server.get("/v1/models/" + model.lstrip("/"))          # ("../" ones reach no route at all)
        assert r.status_code == 404, (model, r.text[:200])
        r = server.post("/generate", json={"inputs": "hi", "model": model})      # TGI routes take no model
        assert r.status_code == 422 and r.json()["error"].startswith("model:")
    # The served id itself is only compared, never opened again.
    assert server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "model": served_id}).status_code == 200
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [served_id, EMBEDDING_MODEL, "splade"]
    opened = re.findall(r"AUDIT open (.*)", server.logs()[server.ready_at:])
    assert opened == [], opened
    assert re.findall(r"AUDIT open (.*)", server.logs()[:server.ready_at]), "the audit hook saw nothing"


def test_cors_is_off_unless_configured(server):
    origin = {"Origin": "http://evil.example"}
    preflight = {**origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
    for method, path in sorted(served_routes()):
        for headers in (preflight, {**preflight, **server.headers}):
            r = httpx.options(server.url + path, headers=headers)
            assert not any(h.startswith("access-control-") for h in r.headers), (path, dict(r.headers))
        r = call(server, method, path, {**origin, **server.headers})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers, (path, r.status_code)


def test_request_ids_are_echoed_on_every_answer_and_logged(server):
    seen = {}
    for n, (method, path) in enumerate(sorted(served_routes() | {("GET", p) for p in DOC_PATHS})):
        for kind, headers in (("ok", server.headers), ("refused", {})):
            request_id = f"trace-{n}-{kind}.A:b_c"
            r = call(server, method, path, {**headers, "X-Request-Id": request_id})
            assert r.headers["x-request-id"] == request_id, (path, kind, r.status_code)
            seen[request_id] = (method, concrete(path), r.status_code)
    for path, content, content_type in [("/generate", b'{"inputs": 1}', "application/json"),   # 422
                                        ("/generate", b"{}", "image/png"),                          # 415
                                        ("/v1/nowhere", b"{}", "application/json"),                 # 404
                                        ("/generate", b"x" * (5 * 2**20), "application/json")]:    # 413
        request_id = f"trace-error-{len(seen)}"
        r = server.post(path, content=content, headers={"Content-Type": content_type, "X-Request-Id": request_id})
        assert r.status_code >= 400 and r.headers["x-request-id"] == request_id
        seen[request_id] = ("POST", path, r.status_code)
    # An id that is not 1-128 of [A-Za-z0-9._:-] is replaced (never echoed, never logged).
    for bad in ("a" * 129, "a b", "a/b", "<script>", "a\tb", "", "é".encode(), b"\xff", "id;x=1"):
        r = httpx.get(server.url + "/info", headers=[*server.headers.items(), ("X-Request-Id", bad)])
        assigned = r.headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", assigned), (bad, assigned)
    time.sleep(0.2)                       # (the log line is written as the answer ends)
    logs = server.logs()
    for request_id, (method, path, status) in seen.items():
        assert re.search(rf"{re.escape(method)} {re.escape(path)} {status} .* id={re.escape(request_id)}\b", logs), \
            (request_id, method, path, status)
    # The engine's request carries the id too: an engine-side log line names it.
    server.post("/generate", json={"inputs": "hi"}, headers={"X-Request-Id": "fault-nan-traced"})
    assert re.search(r"request fault-nan-traced-\d+ failed", server.logs())
