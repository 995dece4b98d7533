"""Encoder tasks against their references, on tiny random checkpoints made here and on
all-MiniLM-L6-v2: rerank = sentence-transformers' CrossEncoder.predict, sparse embeddings =
its SparseEncoder, fill-mask = transformers' fill-mask pipeline, Matryoshka dimensions and
prompts = SentenceTransformer.encode; pairs cut as transformers' tokenizers cut them; what
each kind of checkpoint serves; and mixed tasks batched together equal each run alone."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

from engine.encoder_engine import Encoder, EncoderEngine
from engine.errors import InvalidParameter, PromptTooLongError
from engine.loader import resolve_model_path
from engine.tokenizer import pair_lengths

sentence_transformers = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")

MODEL = "all-minilm-l6-v2"
QUERY = "what is the capital of france"
DOCUMENTS = ["paris is the capital of france", "berlin is a city in germany", "the cat sat on the mat",
             "Attention is all you need. " * 12, "ok"]
LONG_QUERY = "tell me everything about the history of the french capital " * 6
MASKED = ["paris is the [MASK] of france.", "the [MASK] sat on the [MASK].", "[MASK]"]


@pytest.fixture(scope="module")
def minilm():
    return Encoder(MODEL)


@pytest.fixture(scope="module")
def st_minilm():
    return sentence_transformers.SentenceTransformer(str(resolve_model_path(MODEL)), device="cpu")


@pytest.fixture(scope="module")
def cross(tiny_cross_encoder):
    return Encoder(str(tiny_cross_encoder))


# --- rerank ---

def test_rerank_equals_cross_encoder_predict(cross, tiny_cross_encoder):
    reference = sentence_transformers.CrossEncoder(str(tiny_cross_encoder), device="cpu")
    expected = reference.predict([(QUERY, d) for d in DOCUMENTS])
    scores = np.array(cross.rerank(QUERY, DOCUMENTS))
    assert np.abs(scores - expected).max() < 1e-5
    assert np.ptp(expected) > 0.05                   # the scores differ: an input mix-up would show
    raw = np.array(cross.rerank(QUERY, DOCUMENTS, raw_scores=True))
    logits = reference.predict([(QUERY, d) for d in DOCUMENTS], activation_fn=torch.nn.Identity())
    assert np.allclose(raw, logits, rtol=2e-5, atol=1e-5)      # logits reach ~3: fp32's relative error
    assert np.allclose(1 / (1 + np.exp(-raw)), scores, atol=1e-6)


def test_rerank_truncates_pairs_as_cross_encoder_does(cross, tiny_cross_encoder):
    reference = sentence_transformers.CrossEncoder(str(tiny_cross_encoder), device="cpu", max_length=48)
    pairs = [(LONG_QUERY, d) for d in DOCUMENTS] + [(QUERY, DOCUMENTS[3])]
    expected = reference.predict(pairs)
    scores = [cross.rerank(q, [d], truncate=48)[0] for q, d in pairs]
    assert np.abs(np.array(scores) - expected).max() < 1e-5
    with pytest.raises(PromptTooLongError, match="query and text 0 are .* tokens long together.*128"):
        cross.rerank(LONG_QUERY * 3, ["x"])
    assert len(cross.rerank(LONG_QUERY * 3, ["x"], truncate=True)) == 1


@pytest.mark.parametrize("strategy", ["longest_first", "only_second"])
def test_pair_truncation_equals_the_tokenizers_library(cross, strategy):
    hf = transformers.AutoTokenizer.from_pretrained(str(resolve_model_path(MODEL)))
    words = "alpha beta gamma delta epsilon zeta eta theta".split()
    for n1 in (1, 3, 7, 12, 20):
        for n2 in (1, 2, 9, 15, 30):
            first, second = " ".join(words[i % 8] for i in range(n1)), " ".join(words[-i % 8] for i in range(n2))
            for max_length in (8, 13, 24):
                try:
                    expected = hf(first, second, truncation=strategy, max_length=max_length)
                except Exception:
                    expected = None
                if expected is not None and len(expected["input_ids"]) > max_length:
                    expected = None                  # the library gave up (only_second, first too long)
                try:
                    got = cross.runner.tokenizer.encode_pair(first, second, max_length, strategy)
                except ValueError:
                    got = None
                if expected is None:
                    assert got is None or strategy == "longest_first", (n1, n2, max_length)
                    continue
                assert got == (expected["input_ids"], expected["token_type_ids"]), (n1, n2, max_length)


def test_pair_lengths_rules():
    assert pair_lengths(3, 4, 10, "longest_first") == (3, 4)
    assert pair_lengths(3, 40, 10, "longest_first") == (3, 7)
    assert pair_lengths(40, 3, 10, "longest_first") == (7, 3)
    assert pair_lengths(8, 9, 11, "longest_first") == (5, 6)
    assert pair_lengths(9, 8, 11, "longest_first") == (6, 5)
    assert pair_lengths(3, 40, 10, "only_second") == (3, 7)
    with pytest.raises(ValueError, match="no room"):
        pair_lengths(12, 3, 10, "only_second")


def test_a_bi_encoder_reranks_by_cosine(minilm, st_minilm):
    expected = st_minilm.similarity(st_minilm.encode([QUERY]), st_minilm.encode(DOCUMENTS))[0].numpy()
    scores = np.array(minilm.rerank(QUERY, DOCUMENTS))
    assert np.abs(scores - expected).max() < 1e-5
    assert int(np.argmax(scores)) == 0
    assert minilm.limits.rerank_scoring == "cosine"


def test_similarity_equals_sentence_transformers(minilm, st_minilm):
    sentences = ["a kitten plays", "the stock market fell", "a cat is playing"]
    expected = st_minilm.similarity(st_minilm.encode(["a cat plays"]), st_minilm.encode(sentences))[0].numpy()
    assert np.abs(np.array(minilm.similarity("a cat plays", sentences)) - expected).max() < 1e-5


@pytest.mark.parametrize("call", [
    lambda e: e.rerank("", ["a"]), lambda e: e.rerank("q", []), lambda e: e.rerank("q", ["a", ""]),
    lambda e: e.similarity("s", "not a list")])
def test_rerank_and_similarity_refuse_empty_inputs(minilm, call):
    with pytest.raises(InvalidParameter):
        call(minilm)


# --- sparse embeddings ---

@pytest.mark.parametrize("strategy, activation", [("max", "relu"), ("sum", "log1p_relu")])
def test_sparse_embeddings_equal_sparse_encoder(tiny_mlm, tmp_path, strategy, activation):
    from sentence_transformers import SparseEncoder
    from sentence_transformers.sparse_encoder.modules import MLMTransformer, SpladePooling
    reference = SparseEncoder(modules=[MLMTransformer(str(tiny_mlm)), SpladePooling(strategy, activation)],
                              device="cpu")
    reference.save(str(tmp_path / "splade"))
    texts = ["hello world", "a longer sentence about sparse retrieval models " * 3, "ok"]
    expected = reference.encode(texts, convert_to_tensor=True).to_dense().numpy()
    encoder = Encoder(str(tmp_path / "splade"))
    assert encoder.runner.tasks == {"embed_sparse", "fill_mask"}
    for vector, row in zip(encoder.embed_sparse(texts), expected):
        dense = np.zeros_like(row)
        dense[vector.indices] = vector.values
        # max: within 1e-5; sum: a sum of ~50 fp32 terms, each off by ~1e-6, in another order
        assert np.abs(dense - row).max() < (1e-5 if strategy == "max" else 1e-4)
        assert vector.indices == sorted(vector.indices) and min(vector.values) > 0
        assert set(vector.indices) == set(np.flatnonzero(row))
    with pytest.raises(InvalidParameter, match="cannot embed"):
        encoder.embed("dense, please")


# --- fill-mask ---

def test_fill_mask_equals_the_pipeline(tiny_mlm):
    pipeline = transformers.pipeline("fill-mask", model=str(tiny_mlm), tokenizer=str(tiny_mlm), device="cpu")
    encoder = Encoder(str(tiny_mlm))
    for text in MASKED:
        expected = pipeline(text, top_k=4)
        expected = expected if isinstance(expected[0], list) else [expected]
        got = encoder.fill_mask(text, top_k=4)[0]
        assert len(got) == len(expected)
        for ours, theirs in zip(got, expected):
            assert [p["token"] for p in ours] == [p["token"] for p in theirs]
            assert [p["token_str"] for p in ours] == [p["token_str"] for p in theirs]
            assert [p["sequence"] for p in ours] == [p["sequence"] for p in theirs]
            assert np.allclose([p["score"] for p in ours], [p["score"] for p in theirs], atol=1e-5, rtol=0)
    targets = ["capital", "city", "zzzqqx"]
    expected = pipeline(MASKED[0], targets=targets)
    got = encoder.fill_mask(MASKED[0], targets=targets)[0][0]
    assert [(p["token"], p["sequence"]) for p in got] == [(p["token"], p["sequence"]) for p in expected]


@pytest.mark.parametrize("inputs, top_k, message", [
    ("no mask here", 5, "no \\[MASK\\] token"), (MASKED[0], 0, "top_k"), (MASKED[0], 101, "top_k"),
    (["[MASK] " * 100] * 3, 1, "300 \\[MASK\\] tokens in one request; the limit is 256")])
def test_fill_mask_refusals(tiny_mlm, inputs, top_k, message):
    encoder = Encoder(str(tiny_mlm))
    with pytest.raises(InvalidParameter, match=message):
        encoder.fill_mask(inputs, top_k=top_k)


# --- Matryoshka dimensions, prompts, truncation direction ---

@pytest.mark.parametrize("dimensions", [1, 64, 383, 384])
def test_dimensions_equal_truncate_dim(minilm, st_minilm, dimensions):
    texts = ["a cat", "the quick brown fox jumps over the lazy dog"]
    expected = st_minilm.encode(texts, truncate_dim=dimensions, normalize_embeddings=True)
    got = np.array(minilm.embed(texts, dimensions=dimensions))
    assert got.shape == (2, dimensions) and np.abs(got - expected).max() < 1e-5
    raw = np.array(minilm.embed(texts, normalize=False, dimensions=dimensions))
    assert np.allclose(raw, np.array(minilm.embed(texts, normalize=False))[:, :dimensions], atol=1e-6)
    with pytest.raises(InvalidParameter, match="dimensions must be between 1 and the model's 384"):
        minilm.embed("x", dimensions=385)


@pytest.fixture(scope="module")
def prompted(tmp_path_factory):
    """all-MiniLM-L6-v2 with prompts in its sentence-transformers config, "query" the default."""
    directory = tmp_path_factory.mktemp("prompted") / "model"
    shutil.copytree(resolve_model_path(MODEL), directory)
    config = json.loads((directory / "config_sentence_transformers.json").read_text())
    config.update(prompts={"query": "query: ", "document": "passage: "}, default_prompt_name="query")
    (directory / "config_sentence_transformers.json").write_text(json.dumps(config))
    return directory


def test_prompts_from_the_sentence_transformers_config(prompted):
    reference = sentence_transformers.SentenceTransformer(str(prompted), device="cpu")
    encoder = Encoder(str(prompted))
    texts = ["a cat", "the weather is nice"]
    for name in (None, "document", "query"):
        expected = reference.encode(texts, prompt_name=name)
        assert np.abs(np.array(encoder.embed(texts, prompt_name=name)) - expected).max() < 1e-5
    assert np.allclose(encoder.embed(texts), encoder.embed(texts, prompt_name="query"), atol=1e-6)   # the default
    with pytest.raises(InvalidParameter, match="'nope' is not one of the model's prompts \\('query', 'document'\\)"):
        encoder.embed("x", prompt_name="nope")
    with pytest.raises(InvalidParameter, match="needs text inputs"):
        encoder.embed([[101, 2000, 102]], prompt_name="query")
    # a bi-encoder's rerank: the query with its "query" prompt, the texts with "document"
    scores = encoder.rerank("a cat", texts)
    query = reference.encode(["a cat"], prompt_name="query")
    documents = reference.encode(texts, prompt_name="document")
    assert np.abs(np.array(scores) - reference.similarity(query, documents)[0].numpy()).max() < 1e-5


def test_left_truncation_keeps_the_end(minilm):
    from engine.encoder_tasks import embed_job
    ids = minilm.tokenize("word " * 300 + "the very end")
    job, items = embed_job(minilm.runner, "word " * 300 + "the very end", True, 20, direction="left")
    assert items[0].token_ids == ids[:1] + ids[-19:]
    job, items = embed_job(minilm.runner, "word " * 300 + "the very end", True, 20)
    assert items[0].token_ids == ids[:19] + ids[-1:]


# --- what each checkpoint serves ---

def test_tasks_follow_the_checkpoint(minilm, cross, tiny_mlm, tiny_splade, tmp_path):
    from conftest import save_tiny_bert
    classifier = Encoder(str(save_tiny_bert(tmp_path / "classifier", "BertForSequenceClassification", num_labels=3)))
    assert minilm.runner.tasks == {"embed", "similarity", "classify", "rerank"}
    assert cross.runner.tasks == {"classify", "rerank"} and cross.limits.rerank_scoring == "cross-encoder"
    assert classifier.runner.tasks == {"classify"}
    assert Encoder(str(tiny_splade)).runner.tasks == {"embed_sparse", "fill_mask"}
    assert Encoder(str(tiny_mlm)).runner.tasks == {"embed", "similarity", "classify", "rerank", "embed_sparse",
                                                   "fill_mask"}
    with pytest.raises(InvalidParameter, match="cannot rerank"):
        classifier.rerank("q", ["a"])
    with pytest.raises(InvalidParameter, match="cannot fill mask"):
        minilm.fill_mask("[MASK]")


# --- batching mixed tasks ---

def test_mixed_tasks_batched_together_equal_each_alone(tiny_mlm, cross):
    """An MLM model's embeddings, sparse vectors and fill-masks, and a cross-encoder's pairs
    with their token types: each request equals what it gives alone, whatever shares its batch."""
    mlm = Encoder(str(tiny_mlm))
    alone = {"embed": mlm.embed(DOCUMENTS), "sparse": mlm.embed_sparse(DOCUMENTS[:3]),
             "fill": mlm.fill_mask(MASKED, top_k=3)}
    batches: list[int] = []
    engine = EncoderEngine(str(tiny_mlm), batch_wait_ms=300, on_batch=lambda n, tokens: batches.append(n))
    engine.start()
    try:
        barrier, results = threading.Barrier(3), {}

        def submit(name, task, *args):
            barrier.wait()
            results[name] = engine.submit(task, *args).result(60).data
        calls = [("embed", "embed", DOCUMENTS), ("sparse", "embed_sparse", DOCUMENTS[:3]),
                 ("fill", "fill_mask", MASKED, 3)]
        threads = [threading.Thread(target=submit, args=call) for call in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        engine.stop()
    assert max(batches) > len(DOCUMENTS)             # requests of different tasks shared a batch
    assert np.allclose(results["embed"], alone["embed"], atol=1e-5)
    for ours, theirs in zip(results["sparse"], alone["sparse"]):
        assert ours.indices == theirs.indices and np.allclose(ours.values, theirs.values, atol=1e-5)
    assert [[[p["token"] for p in m] for m in x] for x in results["fill"]] == \
        [[[p["token"] for p in m] for m in x] for x in alone["fill"]]
    pairs = cross.rerank(QUERY, DOCUMENTS)
    assert np.allclose(cross.rerank(QUERY, DOCUMENTS[::-1]), pairs[::-1], atol=1e-6)
