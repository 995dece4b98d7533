"""Hostile inputs get a clear 4xx (or, when they are valid, a correct answer) and never hurt the
other users: while each test runs, a canary client keeps generating on the same server and must
get, every time, the exact text its prompt got before.

Covered: invalid UTF-8 and lone surrogates in every text field, NUL bytes, 1 MB prompts of one
token repeated, 10,000 stop strings, bad numbers (negative, NaN, infinite, huge, tiny,
fractional) in every numeric field the OpenAPI document lists, JSON nested 10,000+ levels deep,
wrong content types, token ids outside the vocabulary, and slowloris clients (headers or
bodies that never finish).
"""
from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from service_helpers import API_KEY, NO_ENCODER, TINY_ARGS, ServerProcess, main_server

CANARY = {"inputs": "The cat sat on the", "parameters": {"max_new_tokens": 4, "ignore_eos": True}}
MAX_CANARY_LATENCY = 5.0           # seconds: a hostile request may slow the others, never stall them


@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


class Canary:
    """Another user: greedy requests back to back on a thread; each must get what the first got."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.expected = server.post("/generate", json=CANARY).json()["generated_text"]
        self.answers: list[tuple[float, int, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with self.server.client(timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                r = client.post("/generate", json=CANARY)
                text = r.json().get("generated_text") if r.status_code == 200 else r.text
                self.answers.append((time.monotonic() - started, r.status_code, text))

    def __enter__(self) -> "Canary":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        time.sleep(0.1)                     # at least one answer after the hostile requests
        self._stop.set()
        self._thread.join(130)
        if exc[0] is None:
            wrong = [a for a in self.answers if a[1:] != (200, self.expected)]
            assert self.answers and not wrong, wrong[:3]
            slowest = max(latency for latency, _, _ in self.answers)
            assert slowest < MAX_CANARY_LATENCY, f"a canary request took {slowest:.1f} s"


def assert_error(r: httpx.Response, path: str, statuses: tuple[int, ...] = (422,)) -> dict:
    """A refusal in the route family's error shape, never a 5xx or a traceback."""
    assert r.status_code in statuses, (path, r.status_code, r.text[:300])
    body = r.json()
    if path.startswith("/v1/"):
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    else:
        assert set(body) == {"error", "error_type"}, body
    assert "Traceback" not in r.text
    return body


def post_raw(server: ServerProcess, path: str, content: bytes, content_type: str | None = "application/json",
             **kwargs) -> httpx.Response:
    headers = {"Content-Type": content_type} if content_type else {}
    return server.post(path, content=content, headers=headers, **kwargs)


# Every text field of every route: (route, body with "§" where the text goes).
TEXT_FIELDS = [
    ("/generate", {"inputs": "§"}), ("/generate", {"inputs": "hi", "parameters": {"stop": ["§"]}}),
    ("/generate_stream", {"inputs": "§"}), ("/", {"inputs": "§"}), ("/tokenize", {"inputs": "§"}),
    ("/v1/completions", {"prompt": "§"}), ("/v1/completions", {"prompt": ["ok", "§"]}),
    ("/v1/completions", {"prompt": "hi", "stop": "§"}), ("/v1/completions", {"prompt": "hi", "user": "§"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "§"}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "§"}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi", "name": "§"}]}),
    ("/embed", {"inputs": "§"}), ("/embed", {"inputs": ["ok", "§"]}), ("/classify", {"inputs": "§"}),
    ("/classify", {"inputs": "ok", "candidate_labels": ["§", "b"]}), ("/predict", {"inputs": "§"}),
    ("/v1/embeddings", {"input": "§"}),
]


def with_text(body: dict, raw: bytes) -> bytes:
    """The body as JSON, with `raw` (JSON string content, already escaped) in place of §."""
    return json.dumps(body, ensure_ascii=False).encode().replace("§".encode(), raw)


@pytest.mark.parametrize("raw", [b"\\ud800", b"x\\udfffy", b"\\udc00\\ud800", b"\xff\xfe", b"\xed\xa0\x80",
                                 b"\xc3\x28", b"\xf4\x90\x80\x80", b"\xc0\xaf"],
                         ids=["lone-high", "lone-low", "reversed-pair", "ff-fe", "utf8-surrogate",
                              "bad-continuation", "above-u10ffff", "overlong"])
def test_invalid_utf8_and_lone_surrogates_in_every_text_field(server, raw):
    with Canary(server):
        for path, body in TEXT_FIELDS:
            message = assert_error(post_raw(server, path, with_text(body, raw)), path)
            text = message["error"]["message"] if path.startswith("/v1/") else message["error"]
            assert any(reason in text for reason in ("Input should be a valid string", "not valid JSON",
                                                     "not valid Unicode")), (path, text)
        # The model name is text like the others: broken UTF-8 there is refused too.
        r = post_raw(server, "/v1/completions", with_text({"prompt": "hi", "model": "§"}, raw))
        assert_error(r, "/v1/completions", (422,))


def test_nul_bytes_are_text_like_any_other(server):
    with Canary(server):
        for path, body in TEXT_FIELDS:
            r = post_raw(server, path, with_text(body, b"a\\u0000b"))
            assert r.status_code == 200, (path, r.text[:300])
        tokens = server.post("/tokenize", json={"inputs": "a\x00b\x00"}).json()
        text = server.post("/detokenize", json={"inputs": [t["id"] for t in tokens],
                                                "skip_special_tokens": False}).json()["text"]
        assert text == "a\x00b\x00"
        # A model name no model has (NULs and all) is answered by the served one.
        r = server.post("/v1/completions", json={"prompt": "hi", "model": "\x00"})
        assert r.status_code == 200 and r.json()["model"] != "\x00"


@pytest.mark.parametrize("token", ["a", " the"])
def test_one_megabyte_prompts_of_one_token_repeated(server, token):
    text = token * (1_000_000 // len(token))
    with Canary(server):
        for path, body in [("/generate", {"inputs": text}), ("/generate_stream", {"inputs": text}),
                           ("/v1/completions", {"prompt": text}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]})]:
            r = server.post(path, json=body)
            message = json.dumps(assert_error(r, path, (400,)))
            assert "511" in message, message                       # names the model's limit
            assert r.headers["content-type"].startswith("application/json")
        r = server.post("/tokenize", json={"inputs": text})
        assert r.status_code == 200 and len(r.json()) >= 250_000
        ids = [tokens["id"] for tokens in r.json()[:1_000_000]]
        assert_error(server.post("/v1/completions", json={"prompt": ids}), "/v1/completions", (400,))
        embedded = server.post("/embed", json={"inputs": text})     # too long (400) unless it is one [UNK]
        assert embedded.status_code == 200 or "256" in assert_error(embedded, "/embed", (400,))["error"]
        assert server.post("/embed", json={"inputs": text, "truncate": True}).status_code == 200
        assert server.post("/detokenize", json={"inputs": ids}).json()["text"] == text


def test_ten_thousand_stop_strings(server):
    stops = [f"stop{i}" for i in range(10_000)]
    with Canary(server):
        for path, body, param in [
                ("/generate", {"inputs": "hi", "parameters": {"stop": stops}}, "parameters.stop"),
                ("/generate_stream", {"inputs": "hi", "parameters": {"stop": stops}}, "parameters.stop"),
                ("/v1/completions", {"prompt": "hi", "stop": stops}, "stop"),
                ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(10_000))}, "stop_token_ids"),
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": stops}, "stop"),
                ("/generate", {"inputs": "hi", "parameters": {"stop": ["x" * 100_000]}}, "parameters.stop")]:
            error = assert_error(server.post(path, json=body), path)
            assert (error["error"]["param"] == param) if path.startswith("/v1/") else error["error"].startswith(param)
        # The most the schema allows (16 strings of 512 characters) runs.
        most = {"inputs": "hi", "parameters": {"stop": ["x" * 511 + str(i % 10) for i in range(16)],
                                               "max_new_tokens": 8}}
        assert server.post("/generate", json=most).status_code == 200


# -- numbers -----------------------------------------------------------------------------------

BASE_BODIES = {
    "/generate": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/generate_stream": {"inputs": "hi", "parameters": {"max_new_tokens": 2}},
    "/": {"inputs": "hi", "parameters": {"max_new_tokens": 2}}, "/tokenize": {"inputs": "hi"},
    "/detokenize": {"inputs": [1, 2]}, "/embed": {"inputs": "hi"}, "/classify": {"inputs": "hi"},
    "/predict": {"inputs": "hi"}, "/v1/embeddings": {"input": "hi"},
    "/v1/completions": {"prompt": "hi", "max_tokens": 2},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/rerank": {"query": "hi", "documents": ["a"]}, "/v2/rerank": {"query": "hi", "documents": ["a"]},
    "/embed_sparse": {"inputs": "hi"}, "/fill_mask": {"inputs": "hi [MASK]"},
}
BAD_NUMBERS = ["-1", "-1e308", "NaN", "Infinity", "-Infinity", "1e309", "18446744073709551616",
               "1" + "0" * 400, "1.5", "-0.0", "4.9e-324"]


def numeric_fields(spec: dict) -> list[tuple[str, tuple[str, ...], bool]]:
    """(route, path to the field in the body, whether it is a list of numbers) for every
    integer or number the request bodies of the document declare, nested objects included."""
    components = spec["components"]["schemas"]

    def resolve(node: dict) -> dict:
        while "$ref" in node:
            node = components[node["$ref"].rsplit("/", 1)[1]]
        return node

    def walk(node: dict, at: tuple[str, ...]) -> list[tuple[tuple[str, ...], bool]]:
        node = resolve(node)
        found = []
        for prop, schema in node.get("properties", {}).items():
            branches = [resolve(b) for b in schema.get("anyOf", [schema])]
            if any(b.get("type") in ("integer", "number") for b in branches):
                found.append((at + (prop,), False))
            elif any(b.get("type") == "array" and resolve(b.get("items", {})).get("type") in ("integer", "number")
                     for b in branches):
                found.append((at + (prop,), True))
            for b in branches:
                if b.get("type") == "object" or "properties" in b:
                    found += walk(b, at + (prop,))
        return found

    fields = []
    for path, operations in spec["paths"].items():
        body = operations.get("post", {}).get("requestBody")
        if body:
            schema = body["content"]["application/json"]["schema"]
            fields += [(path, field, is_list) for field, is_list in walk(schema, ())]
    return fields


def with_number(path: str, field: tuple[str, ...], is_list: bool, raw: str) -> bytes:
    body = json.loads(json.dumps(BASE_BODIES[path]))
    node = body
    for key in field[:-1]:
        node = node.setdefault(key, {})
    node[field[-1]] = ["§"] if is_list else "§"
    return json.dumps(body).replace('"§"', raw).encode()


def test_bad_numbers_in_every_numeric_field(server):
    fields = numeric_fields(server.get("/openapi.json").json())
    assert len(fields) >= 30 and {p for p, _, _ in fields} == set(BASE_BODIES) - {"/tokenize"}, fields
    statuses = {}
    with Canary(server), server.client() as client:
        for path, field, is_list in fields:
            for raw in BAD_NUMBERS:
                r = client.post(path, content=with_number(path, field, is_list, raw),
                                headers={"Content-Type": "application/json"})
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code != 200:
                    error = assert_error(r, path, (400, 404, 422))
                    named = error["error"]["message"] if path.startswith("/v1/") else error["error"]
                    assert ".".join(field) in named or field[-1] in named, (path, field, raw, named)
    print(f"\n{len(fields)} numeric fields x {len(BAD_NUMBERS)} values: {statuses}")


def test_a_tiny_temperature_acts_greedy(server):
    params = {"max_new_tokens": 6, "ignore_eos": True, "details": True}
    greedy = server.post("/generate", json={"inputs": "The cat", "parameters": params}).json()["details"]["tokens"]
    tiny = server.post("/generate", json={"inputs": "The cat", "parameters": {**params, "temperature": 1e-40,
                                                                             "seed": 1}}).json()
    assert [t["id"] for t in tiny["details"]["tokens"]] == [t["id"] for t in greedy]


def test_a_tiny_repetition_penalty_keeps_every_logit_finite(server):
    params = {"max_new_tokens": 6, "ignore_eos": True, "details": True}
    small = server.post("/generate", json={"inputs": "The cat", "parameters": {**params, "repetition_penalty": 1e-30}})
    tiny = server.post("/generate", json={"inputs": "The cat", "parameters": {**params, "repetition_penalty": 1e-300}})
    assert [t["id"] for t in tiny.json()["details"]["tokens"]] == [t["id"] for t in small.json()["details"]["tokens"]]


# -- structure ---------------------------------------------------------------------------------

@pytest.mark.parametrize("depth", [10_000, 100_000, 1_000_000])
def test_deeply_nested_json(server, depth):
    with Canary(server):
        for path, raw in [("/generate", b"[" * depth + b"]" * depth),
                          ("/generate", b'{"a":' * depth + b"1" + b"}" * depth),
                          ("/v1/completions", b'{"prompt": "hi", "user": ' + b"[" * depth + b"]" * depth + b"}"),
                          ("/v1/chat/completions", b'{"messages": ' + b"[" * depth + b"]" * depth + b"}"),
                          ("/embed", b'{"inputs": ' + b"[" * depth)]:              # and never closed
            error = assert_error(post_raw(server, path, raw), path, (413, 422))    # (413: over 4 MiB)
            assert "body" in json.dumps(error), error


@pytest.mark.parametrize("content_type", ["multipart/form-data; boundary=x", "application/xml", "image/png",
                                          "application/octet-stream", "application/jsonx", "text/html"])
def test_a_body_that_is_not_json_is_415(server, content_type):
    for path in ("/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/embed", "/tokenize"):
        r = post_raw(server, path, json.dumps(BASE_BODIES.get(path, {"inputs": "hi"})).encode(), content_type)
        error = assert_error(r, path, (415,))
        assert "application/json" in json.dumps(error)


def test_what_curl_and_plain_clients_send_is_read_as_json(server):
    body = json.dumps({"inputs": "hi", "parameters": {"max_new_tokens": 2}}).encode()
    for content_type in (None, "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8",
                         "application/vnd.api+json"):
        assert post_raw(server, "/generate", body, content_type).status_code == 200, content_type
    assert_error(post_raw(server, "/generate", b"inputs=hi", "application/x-www-form-urlencoded"), "/generate")


def test_token_ids_outside_the_vocabulary(server):
    vocab = server.get("/openapi.json").json()["components"]["schemas"]["DetokenizeRequest"]["properties"][
        "inputs"]["items"]["maximum"] + 1
    with Canary(server):
        for ids in ([vocab], [1, vocab + 1], [2**31 - 1], [-1], [2**31], [2**63], [1.5]):
            assert_error(server.post("/v1/completions", json={"prompt": ids}), "/v1/completions")
            assert_error(server.post("/v1/completions", json={"prompt": [[1, 2], ids]}), "/v1/completions")
            assert_error(server.post("/detokenize", json={"inputs": ids}), "/detokenize")
            assert_error(server.post("/embed", json={"inputs": [ids + [10**6]]}), "/embed")
            assert_error(server.post("/v1/embeddings", json={"input": [10**6] + ids}), "/v1/embeddings")
        # The last id of the vocabulary is fine everywhere; a stop id outside it never matches.
        assert server.post("/v1/completions", json={"prompt": [vocab - 1], "max_tokens": 2}).status_code == 200
        assert server.post("/detokenize", json={"inputs": [vocab - 1]}).status_code == 200
        r = server.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "ignore_eos": True,
                                                 "stop_token_ids": [vocab, 2**31 - 1]})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


# -- slowloris ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def impatient_server(tiny_llama):
    server = ServerProcess(["--model", str(tiny_llama), *TINY_ARGS, *NO_ENCODER, "--read-timeout", "1"],
                           api_key=API_KEY).start()
    yield server
    assert server.stop() == 0


def test_slow_clients_are_timed_out_and_the_others_are_served(impatient_server):
    server = impatient_server
    auth = f"Authorization: Bearer {API_KEY}\r\n".encode()
    head = b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + auth
    starts = {
        "silent": b"",
        "half a request line": b"POST /gener",
        "headers never end": b"POST /generate HTTP/1.1\r\nHost: x\r\n" + auth,
        "chunked body never ends": head + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"inp\r\n",
        "body shorter than its length": head + b"Content-Length: 100\r\n\r\n{\"inputs\"",
    }
    slow = {name: [socket.create_connection(("127.0.0.1", server.port)) for _ in range(20)] for name in starts}
    started = time.monotonic()
    for name, sockets in slow.items():
        for s in sockets:
            s.sendall(starts[name])
            s.settimeout(10)
    with Canary(server):
        for _ in range(4):                  # keep dribbling: a byte now and then resets nothing
            time.sleep(0.3)
            for name, sockets in slow.items():
                if name in ("half a request line", "headers never end"):
                    for s in sockets:
                        try:
                            s.sendall(b"X" if name == "half a request line" else b"X-Slow: 1\r\n")
                        except OSError:
                            pass
    outcomes = {}
    for name, sockets in slow.items():
        for s in sockets:
            answer = b""
            try:
                while chunk := s.recv(65536):
                    answer += chunk
            except (ConnectionResetError, TimeoutError):
                answer += b"<reset>"
            s.close()
            outcomes.setdefault(name, set()).add(answer.split(b"\r\n", 1)[0].decode(errors="replace")
                                                 if answer else "closed")
    elapsed = time.monotonic() - started
    assert outcomes["silent"] == {"closed"} and outcomes["half a request line"] == {"closed"}, outcomes
    assert outcomes["headers never end"] == {"closed"}, outcomes
    for name in ("chunked body never ends", "body shorter than its length"):
        assert outcomes[name] == {"HTTP/1.1 408 Request Timeout"}, outcomes
    assert elapsed < 8, elapsed
    r = server.post("/generate", json=CANARY)
    assert r.status_code == 200
    late = httpx.post(server.url + "/v1/completions", headers=server.headers, timeout=10,
                      content=_dribble(b'{"prompt": "hi", "max_tokens": 2}', pause=1.5))
    error = assert_error(late, "/v1/completions", (408,))
    assert "1 s" in error["error"]["message"]
    info = server.wait_idle()
    assert info["num_requests_running"] == 0 and info["num_free_blocks"] == info["num_blocks"]


def _dribble(body: bytes, pause: float):
    yield body[:5]
    time.sleep(pause)
    yield body[5:]
