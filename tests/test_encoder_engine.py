"""Encoder / EncoderEngine: batching invariance, concurrency, validation, classification,
failure isolation, and parity with transformers / sentence-transformers on all-MiniLM-L6-v2."""
from __future__ import annotations

import asyncio
import shutil
import threading
import time

import pytest
import torch

from engine.encoder_engine import Encoder, EncoderEngine
from engine.errors import EngineStoppedError, InvalidParameter, PromptTooLongError, QueueFullError
from engine.loader import resolve_model_path

MODEL = "all-minilm-l6-v2"
TEXTS = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog, again and again, all day long.",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)",
    "東京は日本の首都です。寿司が好き 🍣🍜",
    "Crème brûlée, naïve café, résumé — à la carte.",
    "ok",
    "Émojis 🎉🔥👍 and URLs https://example.com/a?b=c#d",
    "Attention is all you need. " * 30,
]


@pytest.fixture(scope="module")
def encoder():
    return Encoder(MODEL)


@pytest.fixture(scope="module")
def singles(encoder):
    return {text: encoder.embed(text)[0] for text in TEXTS}


@pytest.fixture
def make_engine():
    engines = []

    def make(**kw):
        engine = EncoderEngine(MODEL, **kw)
        engine.start()
        engines.append(engine)
        return engine
    yield make
    for engine in engines:
        engine.stop(drain=False)


def close(a, b, atol=1e-5):
    return torch.allclose(torch.as_tensor(a), torch.as_tensor(b), atol=atol, rtol=0)


# --- batching ---

@pytest.mark.parametrize("order", [slice(None), slice(None, None, -1), slice(1, None, 2)])
def test_batched_equals_one_at_a_time(encoder, singles, order):
    texts = TEXTS[order]
    for text, vector in zip(texts, encoder.embed(texts)):
        assert close(vector, singles[text])


def test_small_batches_equal_big_ones(encoder, monkeypatch):
    big = encoder.embed(TEXTS)
    monkeypatch.setattr(encoder, "max_batch_size", 3)
    monkeypatch.setattr(encoder, "max_batch_tokens", 200)
    assert close(encoder.embed(TEXTS), big)


def test_concurrent_threads_get_their_own_vectors(make_engine, singles):
    batches = []
    engine = make_engine(batch_wait_ms=5, on_batch=lambda n, tokens: batches.append((n, tokens)))
    texts = [TEXTS[i % len(TEXTS)] for i in range(200)]
    results, barrier = [None] * len(texts), threading.Barrier(len(texts))

    def client(i):
        barrier.wait()
        results[i] = engine.submit_embed(texts[i]).result(timeout=60)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for text, out in zip(texts, results):
        assert out.num_tokens == len(engine.runner.tokenizer.encode(text))
        assert close(out.data[0], singles[text])
    assert sum(n for n, _ in batches) == len(texts)
    assert max(n for n, _ in batches) > 1


def test_async_api(make_engine, singles):
    engine = make_engine()

    async def main():
        outs = await asyncio.gather(*(engine.embed(t) for t in TEXTS[:4]))
        scores = await engine.classify("a goal in the last minute", candidate_labels=["sports", "tax"])
        return outs, scores
    outs, scores = asyncio.run(main())
    assert all(close(o.data[0], singles[t]) for o, t in zip(outs, TEXTS))
    assert scores.data[0][0]["label"] == "sports"


# --- inputs and validation ---

def test_token_id_inputs(encoder, singles):
    ids = [encoder.tokenize(t) for t in TEXTS[:3]]
    assert close(encoder.embed(ids), [singles[t] for t in TEXTS[:3]])
    assert close(encoder.embed(ids[0]), [singles[TEXTS[0]]])          # one id list = one input


def test_encoder_properties(encoder):
    assert (encoder.model_id, encoder.max_length, encoder.dimension, encoder.labels) == \
        (MODEL, 256, 384, ())
    assert encoder.tokenize("Hello") == [101, 7592, 102]


def test_normalize_flag(encoder):
    raw, unit = encoder.embed("hello world", normalize=False)[0], encoder.embed("hello world")[0]
    norm = torch.tensor(raw).norm()
    assert abs(norm - 1) > 1e-2
    assert close(torch.tensor(raw) / norm, unit)


def test_truncation(encoder):
    text = "word " * 400
    num_tokens = len(encoder.tokenize(text))
    with pytest.raises(PromptTooLongError, match=f"{num_tokens} tokens.*maximum of 256"):
        encoder.embed(text)
    ids = encoder.tokenize(text)
    expected = encoder.embed([ids[:255] + ids[-1:]])
    assert close(encoder.embed(text, truncate=True), expected)
    assert close(encoder.embed([ids], truncate=True), expected)        # keeps the closing [SEP]


@pytest.mark.parametrize("inputs, message", [
    ([], "must not be empty"),
    ("", "empty string"),
    (["fine", 5], "input 1 must be"),
    ([["a"]], "not token ids"),
    ([[1, -1]], "not token ids"),
    ([[1, 30522]], r"\[0, 30522\)"),
    ([[1, 2.0]], "not token ids"),
    ([[]], "input 0 must be a non-empty"),
])
def test_bad_inputs(encoder, inputs, message):
    with pytest.raises(InvalidParameter, match=message):
        encoder.embed(inputs)


def test_engine_limits(make_engine):
    engine = make_engine(max_inputs_per_request=4, max_queue=8, num_workers=1)     # one worker: held below
    with pytest.raises(InvalidParameter, match="5 inputs in one request; the limit is 4"):
        engine.submit_embed(["x"] * 5)
    release = threading.Event()
    run = engine.runner.run
    engine.runner.run = lambda items: release.wait(30) and run(items)
    futures = [engine.submit_embed(["x"] * 4)]
    while engine.stats().num_queued_inputs:                                           # the worker holds these
        time.sleep(0.001)
    futures += [engine.submit_embed(["y"] * 4), engine.submit_embed(["z"] * 4)]
    with pytest.raises(QueueFullError):
        engine.submit_embed(["w"] * 4)
    release.set()
    assert all(len(f.result(30).data) == 4 for f in futures)
    engine.stop()
    assert not engine.is_alive
    with pytest.raises(EngineStoppedError):
        engine.submit_embed("late")


def test_cancelled_requests_are_not_run(make_engine):
    engine, release, seen = make_engine(num_workers=1), threading.Event(), []
    run = engine.runner.run

    def held(items):
        release.wait(30)
        seen.extend(item.token_ids for item in items)
        return run(items)
    engine.runner.run = held
    first = engine.submit_embed("first")
    while engine.stats().num_queued_inputs:
        time.sleep(0.001)
    cancelled = engine.submit_embed([[101, 2, 102]])
    assert cancelled.cancel()
    release.set()
    assert len(first.result(30).data) == 1
    assert engine.submit_embed("after").result(30).num_tokens == 3
    assert [101, 2, 102] not in seen


# --- failures ---

def test_a_failing_input_fails_only_its_request(make_engine, singles):
    batches = []
    engine = make_engine(batch_wait_ms=300, on_batch=lambda n, t: batches.append(n))
    poison, run = 1, engine.runner.run                                  # [unused0]

    def flaky(items):
        if any(poison in item.token_ids for item in items):
            raise RuntimeError("injected fault")
        return run(items)
    engine.runner.run = flaky
    good = [engine.submit_embed(t) for t in TEXTS[:5]]
    bad = engine.submit_embed([[101, poison, 102]])
    with pytest.raises(RuntimeError, match="injected fault"):
        bad.result(30)
    for text, future in zip(TEXTS, good):
        assert close(future.result(30).data[0], singles[text])
    assert engine.is_alive
    assert close(engine.submit_embed(TEXTS[0]).result(30).data[0], singles[TEXTS[0]])


# --- classification ---

def test_zero_shot_by_candidate_labels(encoder):
    labels = ["politics", "sports", "cooking"]
    cases = {"the football match ended 2-1": "sports",
             "the senate passed the budget bill": "politics",
             "add two cups of flour and bake for an hour": "cooking"}
    results = encoder.classify(list(cases), candidate_labels=labels)
    for expected, scores in zip(cases.values(), results):
        assert scores[0]["label"] == expected
        assert [s["score"] for s in scores] == sorted((s["score"] for s in scores), reverse=True)
        assert abs(sum(s["score"] for s in scores) - 1) < 1e-5
    with pytest.raises(InvalidParameter, match="candidate_labels"):
        encoder.classify("x", candidate_labels=["a", "a"])


def test_classification_needs_a_head_or_labels(encoder):
    with pytest.raises(InvalidParameter, match="no classification head.*candidate_labels"):
        encoder.classify(["hello"])


def tiny_classifier_dir(tmp_path, **config_fields):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    source = resolve_model_path(MODEL)
    config = transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=48, initializer_range=0.2,
        id2label={0: "negative", 1: "neutral", 2: "positive"}, **config_fields)
    path = tmp_path / "classifier"
    transformers.BertForSequenceClassification(config).eval().save_pretrained(path)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(source / name, path / name)
    return path


@pytest.mark.parametrize("problem_type", [None, "multi_label_classification"])
def test_head_matches_transformers_pipeline(tmp_path, problem_type):
    transformers = pytest.importorskip("transformers")
    path = tiny_classifier_dir(tmp_path, problem_type=problem_type)
    pipe = transformers.pipeline("text-classification", model=str(path), tokenizer=str(path),
                                 top_k=None, device="cpu")
    ours = Encoder(str(path)).classify(TEXTS[:6])
    for got, expected in zip(ours, pipe(TEXTS[:6])):
        assert [g["label"] for g in got] == [e["label"] for e in expected]
        assert max(abs(g["score"] - e["score"]) for g, e in zip(got, expected)) < 1e-5
        total = sum(g["score"] for g in got)
        assert (abs(total - 1) < 1e-5) == (problem_type is None)


# --- real weights against the reference implementations ---

CORPUS = TEXTS + ["Ich möchte ein Bier, bitte.", "SELECT * FROM users WHERE id = 42;",
                  "Привет, как дела?", "مرحبا بالعالم", "x" * 3000, "long " * 600]


def test_minilm_matches_transformers_mean_pooling(encoder):
    transformers = pytest.importorskip("transformers")
    path = resolve_model_path(MODEL)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(CORPUS, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    ours = torch.tensor(encoder.embed(CORPUS, truncate=True))
    assert (ours * expected).sum(-1).min() > 0.99999


def test_minilm_matches_sentence_transformers(encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    st = sentence_transformers.SentenceTransformer(str(resolve_model_path(MODEL)), device="cpu")
    expected = torch.tensor(st.encode(CORPUS, batch_size=4))
    ours = torch.tensor(encoder.embed(CORPUS, truncate=True))
    assert (ours * expected).sum(-1).min() > 0.99999



def test_workers_share_the_cores_on_a_cpu(make_engine, monkeypatch):
    from engine.config import EncoderConfig
    from engine.encoder_engine import worker_plan
    monkeypatch.setattr("engine.encoder_engine.default_num_threads", lambda: 2)
    assert worker_plan(EncoderConfig(), "cpu") == (2, 1)            # a 2-core machine: two single-thread workers
    monkeypatch.setattr("engine.encoder_engine.default_num_threads", lambda: 16)
    assert worker_plan(EncoderConfig(), "cpu") == (4, 4)
    assert worker_plan(EncoderConfig(num_workers=1), "cpu") == (1, 16)
    assert worker_plan(EncoderConfig(num_workers=2, num_threads=3), "cpu") == (2, 3)
    assert worker_plan(EncoderConfig(), "cuda") == (1, None)
    engine = make_engine(num_workers=3)
    assert engine.is_alive and len({t.name for t in engine._threads}) == 3
    engine.stop()
    assert not engine.is_alive


def test_cpu_attention_is_our_op_else_per_sequence_and_both_agree(encoder, singles, monkeypatch):
    """On a CPU the encoder runs our C++ op where it builds, attention per sequence in PyTorch
    where it does not: the same vectors either way."""
    from engine import kernels
    from engine.layers.cpu_attention import CpuPagedAttention
    from engine.layers.encoder_attention import PerSequenceAttention
    assert isinstance(encoder.runner.attention, CpuPagedAttention if kernels.load() else PerSequenceAttention)
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    fallback = Encoder(MODEL)
    assert isinstance(fallback.runner.attention, PerSequenceAttention)
    vectors = fallback.embed(TEXTS)
    for text, vector in zip(TEXTS, vectors):
        assert torch.allclose(torch.tensor(vector), torch.tensor(singles[text]), atol=1e-5)
