"""What each encoder task asks of the model, and how its rows become the answer.

Each `*_job(runner, ...)` validates a request (raising InvalidParameter / PromptTooLongError
before anything is queued) and returns (Job, Items): the Items go through the batcher like
any others, and the Job's finish turns their rows into the task's answer:

    embed          (n, dim) float32 array; `dimensions` cuts Matryoshka-style, then normalizes
    classify       [[{label, score}] best first] per input: the model's head, or zero-shot
    rerank         a score per text: a cross-encoder's sigmoid(logit) (raw: the logit), or a
                   bi-encoder's cosine between the query and the text
    similarity     a cosine per sentence, against the source sentence
    embed_sparse   SparseVector per input (SPLADE)
    fill_mask      per input, per [MASK]: [{token, token_str, score, sequence}] best first
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from engine.encoder_runner import EncoderRunner, Inputs, Item, Job, Truncate
from engine.errors import InvalidParameter

# Zero-shot scores are softmax(cosine * 20): the scale all-MiniLM-L6-v2 was trained with
# (sentence-transformers' MultipleNegativesRankingLoss), i.e. temperature 0.05.
ZERO_SHOT_SCALE = 20.0
MAX_FILL_MASK_TOP_K = 100
MAX_MASKS_PER_REQUEST = 256      # [MASK] tokens in one fill-mask request (each gets top_k answers)


@dataclass(frozen=True, slots=True)
class ClassifyOptions:
    """How /classify scores, as transformers' pipelines name it."""
    multi_label: bool = False                  # zero-shot: labels scored independently
    hypothesis_template: str | None = None     # zero-shot: each label embedded as template.format(label)
    function_to_apply: str | None = None       # head: "softmax" | "sigmoid" | "none"; None: by the config


@dataclass(frozen=True, slots=True)
class SparseVector:
    indices: list[int]         # vocabulary ids with a non-zero weight, ascending
    values: list[float]


def require(runner: EncoderRunner, task: str) -> None:
    if task not in runner.tasks:
        raise InvalidParameter("model", f"model {runner.model_id!r} cannot {task.replace('_', ' ')}: it "
                               f"serves {', '.join(sorted(runner.tasks)) or 'nothing'}")


# --- embed ---

def embed_job(runner: EncoderRunner, inputs: Inputs, normalize: bool = True, truncate: Truncate = False, *,
              dimensions: int | None = None, prompt_name: str | None = None,
              direction: str = "right", param: str = "inputs") -> tuple[Job, list[Item]]:
    """`param`: the request field the inputs came in (OpenAI's is "input"), for refusals."""
    require(runner, "embed")
    size = runner.config.hidden_size
    if dimensions is not None and not 1 <= dimensions <= size:
        raise InvalidParameter("dimensions", f"dimensions must be between 1 and the model's {size}, got {dimensions}")
    cut = dimensions is not None and dimensions < size
    ids = runner.prepare(inputs, truncate, direction=direction, prompt=prompt(runner, prompt_name, inputs),
                         param=param)
    job = Job(len(ids), lambda rows: _embeddings(rows, dimensions if cut else None, normalize), _count(ids))
    return job, [Item(x, "embedding", normalize and not cut, job, i) for i, x in enumerate(ids)]


def _embeddings(rows: list[np.ndarray], dimensions: int | None, normalize: bool) -> np.ndarray:
    vectors = np.stack(rows)                                          # (n, hidden) float32
    if dimensions is None:
        return vectors
    vectors = np.ascontiguousarray(vectors[:, :dimensions])          # Matryoshka: the first ones
    if normalize:
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    return vectors


def prompt(runner: EncoderRunner, name: str | None, inputs: Inputs | None = None) -> str:
    """The text of the named prompt (sentence-transformers' prompt_name), else of the model's
    default prompt, else ''. A prompt goes before text, so token-id inputs take none."""
    prompts = runner.pooling.prompts
    if name is not None and name not in prompts:
        listed = ", ".join(map(repr, prompts)) or "none"
        raise InvalidParameter("prompt_name", f"prompt_name {name!r} is not one of the model's prompts ({listed})")
    if name is not None and inputs is not None and not _is_text(inputs):
        raise InvalidParameter("prompt_name", "prompt_name needs text inputs, not token ids")
    name = name if name is not None else runner.pooling.default_prompt_name
    return prompts[name] if name is not None and (inputs is None or _is_text(inputs)) else ""


def _is_text(inputs: Inputs) -> bool:
    return isinstance(inputs, str) or (bool(inputs) and isinstance(inputs[0], str))


# --- classify ---

def classify_job(runner: EncoderRunner, inputs: Inputs, candidate_labels: Sequence[str] | None = None,
                 truncate: Truncate = False, options: ClassifyOptions = ClassifyOptions(),
                 direction: str = "right") -> tuple[Job, list[Item]]:
    require(runner, "classify")
    ids = runner.prepare(inputs, truncate, direction=direction)
    if candidate_labels is not None:
        return _zero_shot_job(runner, ids, _check_labels(candidate_labels), options)
    if not runner.has_classifier:
        raise InvalidParameter(
            "candidate_labels", f"model {runner.model_id!r} has no classification head: pass "
            "candidate_labels (a list of label strings) for zero-shot classification, or "
            "serve a model with a sequence-classification head")
    labels = runner.config.id2label
    function = options.function_to_apply or ("sigmoid" if _is_multi_label(runner.config) else "softmax")
    job = Job(len(ids), lambda rows: [_label_scores(r, labels, function) for r in rows], _count(ids))
    return job, [Item(x, "logits", False, job, i) for i, x in enumerate(ids)]


def _zero_shot_job(runner: EncoderRunner, ids: list[list[int]], labels: list[str],
                   options: ClassifyOptions) -> tuple[Job, list[Item]]:
    """Inputs and labels embedded in the same batches; scored by cosine when all are in."""
    if runner.is_sparse:                      # dense vectors to compare (a classifier's pooled states will do)
        require(runner, "embed")
    template = options.hypothesis_template or "{}"
    if template.count("{}") != 1:
        raise InvalidParameter("hypothesis_template", "hypothesis_template must hold one {} "
                               f"where the label goes, got {template!r}")
    label_ids = runner.prepare([template.replace("{}", label) for label in labels], truncate=True,
                               check_count=False)
    job = Job(len(ids) + len(labels),
              lambda rows: _zero_shot(rows, len(ids), labels, options.multi_label), _count(ids))
    return job, [Item(x, "embedding", True, job, i) for i, x in enumerate(ids + label_ids)]


def _check_labels(labels: Sequence[str]) -> list[str]:
    if isinstance(labels, str) or not labels:
        raise InvalidParameter("candidate_labels", "candidate_labels must be a non-empty list of strings")
    if not all(isinstance(label, str) and label for label in labels):
        raise InvalidParameter("candidate_labels", "candidate_labels must be non-empty strings")
    if len(set(labels)) != len(labels):
        raise InvalidParameter("candidate_labels", "candidate_labels must not repeat")
    return list(labels)


def _zero_shot(rows: list, num_inputs: int, labels: list[str], multi_label: bool) -> list[list[dict]]:
    """Rows are normalized embeddings: the inputs', then the labels'. One label: softmax over
    the labels' scaled cosines; multi-label: each label alone, its cosine mapped to [0, 1]."""
    vectors = torch.from_numpy(np.stack(rows))
    similarity = vectors[:num_inputs] @ vectors[num_inputs:].T         # (inputs, labels) cosine
    scores = (1 + similarity).clamp(0, 2) / 2 if multi_label else (similarity * ZERO_SHOT_SCALE).softmax(-1)
    return [_ranked(labels, row) for row in scores.tolist()]


def _is_multi_label(config) -> bool:
    # As transformers' text-classification pipeline: one label or multi-label -> sigmoid.
    return config.problem_type == "multi_label_classification" or len(config.id2label) == 1


def _label_scores(logits: np.ndarray, labels: Sequence[str], function: str) -> list[dict]:
    values = torch.from_numpy(logits)
    scores = {"sigmoid": values.sigmoid, "softmax": lambda: values.softmax(-1), "none": lambda: values}[function]()
    return _ranked(labels, scores.tolist())


def _ranked(labels: Sequence[str], scores: list[float]) -> list[dict]:
    return sorted(({"label": label, "score": score} for label, score in zip(labels, scores)),
                  key=lambda entry: -entry["score"])


# --- rerank, similarity ---

def rerank_job(runner: EncoderRunner, query: str, texts: Sequence[str], truncate: Truncate = False,
               raw_scores: bool = False, direction: str = "right", strategy: str = "longest_first",
               max_text_tokens: int | None = None) -> tuple[Job, list[Item]]:
    """A score per text, in the order given. A cross-encoder reads each (query, text) pair; one
    too long is refused unless `truncate`, then cut as `strategy` says: "longest_first" (as
    sentence-transformers' CrossEncoder) or "only_second" (the texts only: the query is never
    cut, as Cohere's API). A bi-encoder embeds the query with its "query" prompt and the texts
    with its "document" prompt (where it has them) and scores by cosine. max_text_tokens cuts
    each text to that many tokens first."""
    require(runner, "rerank")
    _check_texts(runner, query, texts, "texts")
    if not runner.is_cross_encoder:
        query_truncate = False if strategy == "only_second" else truncate
        text_truncate = True if strategy == "only_second" else truncate
        if max_text_tokens is not None:
            text_truncate = max_text_tokens + runner.tokenizer.num_special_tokens()
        return _cosine_job(runner, ("query", query, query_truncate, _named_prompt(runner, "query")),
                           ("texts", texts, text_truncate, _named_prompt(runner, "document")), direction)
    pairs = [runner.pair(query, text, i, truncate, direction, strategy, max_text_tokens)
             for i, text in enumerate(texts)]
    job = Job(len(pairs), lambda rows: _pair_scores(rows, raw_scores), sum(len(ids) for ids, _ in pairs))
    return job, [Item(ids, "logits", False, job, i, types) for i, (ids, types) in enumerate(pairs)]


def similarity_job(runner: EncoderRunner, source: str, sentences: Sequence[str], truncate: Truncate = False,
                   direction: str = "right", prompt_name: str | None = None) -> tuple[Job, list[Item]]:
    """The cosine of each sentence's embedding with the source sentence's (all given the
    named prompt, else the model's default one)."""
    require(runner, "similarity")
    _check_texts(runner, source, sentences, "sentences")
    text_prompt = prompt(runner, prompt_name)
    return _cosine_job(runner, ("source_sentence", source, truncate, text_prompt),
                       ("sentences", sentences, truncate, text_prompt), direction)


# (request field, text or texts, truncate, prompt)
_Side = tuple[str, "str | Sequence[str]", Truncate, str]


def _cosine_job(runner: EncoderRunner, first: _Side, others: _Side, direction: str) -> tuple[Job, list[Item]]:
    """The first text's embedding against each of the others', all normalized."""
    ids = []
    for param, texts, truncate, text_prompt in (first, others):
        ids += runner.prepare([texts] if isinstance(texts, str) else list(texts), truncate, check_count=False,
                              direction=direction, prompt=text_prompt, param=param)
    job = Job(len(ids), _cosines, _count(ids))
    return job, [Item(x, "embedding", True, job, i) for i, x in enumerate(ids)]


def _cosines(rows: list[np.ndarray]) -> list[float]:
    vectors = np.stack(rows)                                          # normalized: the first, then the others
    return (vectors[1:] @ vectors[0]).astype(np.float64).tolist()


def _pair_scores(rows: list[np.ndarray], raw: bool) -> list[float]:
    logits = torch.from_numpy(np.stack(rows)[:, 0])
    return (logits if raw else logits.sigmoid()).tolist()


def _named_prompt(runner: EncoderRunner, name: str) -> str:
    prompts = runner.pooling.prompts
    return prompts[name] if name in prompts else prompt(runner, None)


def _check_texts(runner: EncoderRunner, first: str, others: Sequence[str], param: str) -> None:
    if not isinstance(first, str) or not first:
        raise InvalidParameter("query" if param == "texts" else "source_sentence", "must be a non-empty string")
    if isinstance(others, str) or not others:
        raise InvalidParameter(param, f"{param} must be a non-empty list of strings")
    if not all(isinstance(text, str) and text for text in others):
        raise InvalidParameter(param, f"{param} must be non-empty strings")
    limit = runner.max_inputs_per_request
    if limit is not None and len(others) > limit:
        raise InvalidParameter(param, f"{len(others)} {param} in one request; the limit is {limit}")


# --- sparse embeddings, fill-mask (masked-LM head) ---

def sparse_job(runner: EncoderRunner, inputs: Inputs, truncate: Truncate = False,
               direction: str = "right") -> tuple[Job, list[Item]]:
    require(runner, "embed_sparse")
    ids = runner.prepare(inputs, truncate, direction=direction)
    job = Job(len(ids), lambda rows: [SparseVector(i.tolist(), v.tolist()) for i, v in rows], _count(ids))
    return job, [Item(x, "sparse", False, job, i) for i, x in enumerate(ids)]


def fill_mask_job(runner: EncoderRunner, inputs: str | Sequence[str], top_k: int = 5,
                  targets: Sequence[str] | None = None, truncate: Truncate = False) -> tuple[Job, list[Item]]:
    """As transformers' fill-mask pipeline: per [MASK], the top_k tokens (among `targets`
    when given) with their probability and the input with the mask replaced by each."""
    require(runner, "fill_mask")
    if not 1 <= top_k <= MAX_FILL_MASK_TOP_K:
        raise InvalidParameter("top_k", f"top_k must be between 1 and {MAX_FILL_MASK_TOP_K}, got {top_k}")
    target_ids = _target_ids(runner, targets) if targets is not None else None
    ids = runner.prepare(inputs, truncate, check_count=False)
    masks = [sum(1 for t in x if t == runner.mask_token_id) for x in ids]
    mask = runner.limits.mask_token
    for i, count in enumerate(masks):
        if count == 0:
            raise InvalidParameter("inputs", f"input {i} has no {mask} token to fill")
    if sum(masks) > MAX_MASKS_PER_REQUEST:
        raise InvalidParameter("inputs", f"{sum(masks)} {mask} tokens in one request; the limit is "
                               f"{MAX_MASKS_PER_REQUEST}")
    k = min(top_k, len(target_ids)) if target_ids is not None else top_k
    job = Job(len(ids), lambda rows: [_fill(runner, x, probs, k, target_ids) for x, probs in zip(ids, rows)],
              _count(ids))
    return job, [Item(x, "masks", False, job, i) for i, x in enumerate(ids)]


def _target_ids(runner: EncoderRunner, targets: Sequence[str]) -> list[int]:
    """Each target's id: the token itself, else its first token (as the pipeline does)."""
    if isinstance(targets, str) or not targets:
        raise InvalidParameter("targets", "targets must be a non-empty list of strings")
    ids = []
    for target in targets:
        token_id = runner.tokenizer.token_to_id(target)
        if token_id is None:
            pieces = runner.tokenizer.encode(target, add_special_tokens=False) if isinstance(target, str) else []
            if not pieces:
                raise InvalidParameter("targets", f"target {target!r} is no token of the model's vocabulary")
            token_id = pieces[0]
        ids.append(token_id)
    return list(dict.fromkeys(ids))


def _fill(runner: EncoderRunner, ids: list[int], probs: np.ndarray, k: int,
          target_ids: list[int] | None) -> list[list[dict]]:
    """probs: (num_masks, vocab). One list per [MASK]; each proposal's sequence is the input
    with that mask filled (the other masks kept, as the pipeline shows them)."""
    positions = [i for i, t in enumerate(ids) if t == runner.mask_token_id]
    decode = runner.tokenizer.decode
    single = len(positions) == 1
    answer = []
    for position, row in zip(positions, probs):
        candidates = np.asarray(target_ids) if target_ids is not None else None
        scores = row[candidates] if candidates is not None else row
        top = torch.from_numpy(scores).topk(k)
        proposals = []
        for score, choice in zip(top.values.tolist(), top.indices.tolist()):
            token = int(candidates[choice]) if candidates is not None else choice
            filled = ids[:position] + [token] + ids[position + 1:]
            proposals.append({"token": token, "token_str": decode([token]), "score": score,
                              "sequence": decode(filled, skip_special_tokens=single)})
        answer.append(proposals)
    return answer


def _count(ids: list[list[int]]) -> int:
    return sum(map(len, ids))
