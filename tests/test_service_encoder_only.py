"""--model none: an embeddings server like TEI, with no generation engine behind it."""
from __future__ import annotations

import pytest
from service_helpers import EMBEDDING_MODEL, ServerProcess


@pytest.fixture(scope="module")
def server():
    server = ServerProcess(["--model", "none", "--embedding-model", EMBEDDING_MODEL,
                            "--max-batch-tokens", "2048", "--max-batch-size", "16", "--batch-wait-ms", "1"]).start()
    yield server
    assert server.stop() == 0


def test_it_is_ready_and_healthy_with_only_an_encoder(server):
    assert server.get("/ready").json() == {"status": "ready"}
    assert server.get("/health").json() == {"status": "ok"}
    assert server.metric("attnserve_engine_alive") == 1


def test_info_describes_the_encoder_and_its_batch_limits(server):
    info = server.get("/info").json()
    assert info["model_id"] == info["embedding_model_id"] == EMBEDDING_MODEL
    assert info["model_pipeline_tag"] == "feature-extraction" and info["max_input_tokens"] == 256
    assert (info["max_batch_tokens"], info["max_batch_size"]) == (2048, 16)
    assert info["max_model_len"] is None and info["num_blocks"] is None
    assert server.metric("attnserve_build_info", model=EMBEDDING_MODEL) == 1


def test_embeddings_are_served(server):
    vectors = server.post("/embed", json={"inputs": ["hello world", "a second sentence"]}).json()
    assert len(vectors) == 2 and len(vectors[0]) == 384
    openai_style = server.post("/v1/embeddings", json={"input": "hello world"}).json()
    assert openai_style["model"] == EMBEDDING_MODEL
    assert openai_style["data"][0]["embedding"] == pytest.approx(vectors[0], abs=1e-6)
    assert [m["id"] for m in server.get("/v1/models").json()["data"]] == [EMBEDDING_MODEL]


@pytest.mark.parametrize("path, body", [
    ("/generate", {"inputs": "Hi"}),
    ("/generate_stream", {"inputs": "Hi"}),
    ("/v1/completions", {"prompt": "Hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/tokenize", {"inputs": "Hi"}),
    ("/detokenize", {"inputs": [1, 2]}),
])
def test_generation_routes_say_no_generation_model_is_served(server, path, body):
    response = server.post(path, json=body)
    assert response.status_code == 404
    assert "no generation model" in response.text and "--model" in response.text
