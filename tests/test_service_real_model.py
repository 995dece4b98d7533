"""The server on the real default models (SmolLM2-135M-Instruct GGUF, all-MiniLM-L6-v2),
through the official clients. Slow: CI runs it with `-m 'slow or not slow'`."""
from __future__ import annotations

import pytest
from huggingface_hub import InferenceClient
from openai import OpenAI
from service_helpers import ServerProcess

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--kv-cache-memory", "128MiB", "--max-model-len", "2048"]).start(timeout=180)
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def oai(server):
    return OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_defaults_are_served(server, oai):
    assert [m.id for m in oai.models.list().data] == ["smollm2-135m-instruct", "all-minilm-l6-v2"]
    info = server.get("/info").json()
    assert info["max_model_len"] == 2048 and info["embedding_model_id"] == "all-minilm-l6-v2"


def test_chat_answers_and_streams_the_same_text(oai):
    out = oai.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION, max_tokens=16,
                                      temperature=0)
    answer = out.choices[0].message.content
    assert "4" in answer and out.choices[0].finish_reason == "stop"
    assert out.usage.completion_tokens <= 16
    chunks = list(oai.chat.completions.create(model="smollm2-135m-instruct", messages=QUESTION,
                                              max_tokens=16, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer


def test_tgi_client_on_the_real_model(server):
    client = InferenceClient(base_url=server.url)
    out = client.text_generation("The capital of France is", max_new_tokens=6, details=True)
    assert out.details.generated_tokens == len(out.details.tokens) <= 6
    streamed = "".join(client.text_generation("The capital of France is", max_new_tokens=6, stream=True))
    assert streamed == out.generated_text and out.generated_text.strip()


def test_embeddings_on_the_real_model(oai):
    out = oai.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a kitten", "tax law"])
    a, b, c = (d.embedding for d in out.data)
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))          # normalized: dot is cosine
    assert len(a) == 384 and dot(a, b) > dot(a, c)
