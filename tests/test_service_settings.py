"""Settings: flags over ATTNSERVE_* environment variables over defaults (no server needed)."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, load_settings


def test_defaults_match_the_design():
    s = load_settings([])
    assert (s.model, s.embedding_model, s.classifier_model) == ("smollm2-135m-instruct", ["all-minilm-l6-v2"], [])
    assert s.reranker_model == [] and s.encoders() == [("embed", "all-minilm-l6-v2", "all-minilm-l6-v2")]
    assert (s.host, s.port, s.api_keys, s.device) == ("127.0.0.1", 8000, [], "auto")
    assert s.enable_prefix_caching and not s.log_prompts and s.cors_origins == []


def test_flags_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("ATTNSERVE_MAX_QUEUE", "5")
    monkeypatch.setenv("ATTNSERVE_DRAIN_TIMEOUT", "7.5")
    monkeypatch.setenv("ATTNSERVE_ENABLE_PREFIX_CACHING", "false")
    s = load_settings(["--max-queue", "9", "--kv-cache-memory", "2GiB", "--embedding-model", "none"])
    assert s.max_queue == 9 and s.drain_timeout == 7.5 and not s.enable_prefix_caching
    assert s.kv_cache_memory == 2 * 2**30 and s.embedding_model == []
    assert load_settings(["--enable-prefix-caching"]).enable_prefix_caching


def test_api_keys_from_flags_or_a_comma_list(monkeypatch):
    assert load_settings(["--api-key", "a", "--api-key", "b"]).api_keys == ["a", "b"]
    monkeypatch.setenv("ATTNSERVE_API_KEYS", "k1, k2,")
    assert load_settings([]).api_keys == ["k1", "k2"]
    monkeypatch.delenv("ATTNSERVE_API_KEYS")
    monkeypatch.setenv("ATTNSERVE_API_KEY", "single")
    settings = load_settings([])
    assert settings.api_keys == ["single"]
    assert "single" not in repr(settings) and "single" not in str(settings)


@pytest.mark.parametrize("argv", [["--max-queue", "0"], ["--device", "tpu"], ["--kv-cache-memory", "lots"],
                                  ["--dtype", "int4"], ["--port", "70000"], ["--log-level", "loud"]])
def test_bad_values_are_refused(argv):
    with pytest.raises(ValidationError):
        load_settings(argv)


def test_model_none_serves_encoders_only_and_something_must_be_served():
    s = load_settings(["--model", "none", "--max-batch-tokens", "4096", "--max-batch-size", "8",
                       "--batch-wait-ms", "0.5"])
    assert s.model is None and s.embedding_model == ["all-minilm-l6-v2"]
    assert (s.max_batch_tokens, s.max_batch_size, s.batch_wait_ms) == (4096, 8, 0.5)
    with pytest.raises(ValidationError, match="no model to serve"):
        load_settings(["--model", "none", "--embedding-model", "none"])
    with pytest.raises(ValidationError):
        load_settings(["--max-batch-tokens", "0"])


def test_unknown_flag_exits():
    with pytest.raises(SystemExit):
        load_settings(["--no-such-flag"])
    with pytest.raises(ValidationError):
        Settings(no_such_field=1)


def test_encoder_flags_repeat_and_name_their_models(monkeypatch):
    s = load_settings(["--embedding-model", "all-minilm-l6-v2", "--embedding-model", "small=/models/a=b/c",
                       "--embedding-model", "/models/x=y", "--reranker-model", "rr=/models/cross",
                       "--classifier-model", "/models/cls"])
    assert s.encoders() == [("embed", "all-minilm-l6-v2", "all-minilm-l6-v2"), ("embed", "small", "/models/a=b/c"),
                            ("embed", "/models/x=y", "/models/x=y"), ("classify", "/models/cls", "/models/cls"),
                            ("rerank", "rr", "/models/cross")]
    monkeypatch.setenv("ATTNSERVE_EMBEDDING_MODEL", "a=/m/1, b=/m/2")
    monkeypatch.setenv("ATTNSERVE_RERANKER_MODEL", "/m/3")
    assert load_settings([]).encoders() == [("embed", "a", "/m/1"), ("embed", "b", "/m/2"), ("rerank", "/m/3", "/m/3")]
    assert load_settings(["--model", "none", "--embedding-model", "none", "--reranker-model", "/m/3"]).encoders() \
        == [("rerank", "/m/3", "/m/3")]
    with pytest.raises(ValidationError, match="the model name 'a' is given to two models"):
        load_settings(["--embedding-model", "a=/m/1", "--reranker-model", "a=/m/2"])
    with pytest.raises(ValidationError, match="NAME=PATH"):
        load_settings(["--embedding-model", "=/m/1"])
