"""The encoder's model side: requests validated and tokenized into Items, packed batches
run through the model, rows handed back to each request's Job.

Refusals are engine/errors.py's: `PromptTooLongError` for an input past the model's length,
`InvalidParameter` (naming "inputs" or "candidate_labels") for the rest; anything else a
Future raises is our bug.
"""
from __future__ import annotations

import itertools
import logging
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from engine.config import EncoderConfig, UnsupportedModelError
from engine.device import resolve_device, resolve_dtype
from engine.errors import InvalidParameter, PromptTooLongError
from engine.layers.attention import Attention, build_attn_metadata
from engine.limits import EncoderLimits
from engine.loader import build_model, load_tokenizer, open_checkpoint
from engine.model_runner import select_backend
from engine.models.bert import read_pooling_config

logger = logging.getLogger(__name__)
# Zero-shot scores are softmax(cosine * 20): the scale all-MiniLM-L6-v2 was trained with
# (sentence-transformers' MultipleNegativesRankingLoss), i.e. temperature 0.05.
ZERO_SHOT_SCALE = 20.0
Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
Truncate = bool | int          # False: refuse what is too long; True: cut at the model's length; N: at N


@dataclass(frozen=True, slots=True)
class ClassifyOptions:
    """How /classify scores, as transformers' pipelines name it."""
    multi_label: bool = False                  # zero-shot: labels scored independently
    hypothesis_template: str | None = None     # zero-shot: each label embedded as template.format(label)
    function_to_apply: str | None = None       # head: "softmax" | "sigmoid" | "none"; None: by the config


@dataclass(frozen=True, slots=True)
class EncoderOutput:
    data: list                 # embeddings list[list[float]] or scores list[list[{label, score}]]
    num_tokens: int            # tokens of the inputs as run (after truncation), for usage


class Job:
    """One request: its inputs' rows gather here; `future` resolves when the last is in.

    Only the thread that runs batches calls `set_row` / `fail`."""

    def __init__(self, num_rows: int, finish: Callable[[list], Any], num_tokens: int):
        self.future: Future = Future()
        self._rows: list = [None] * num_rows
        self._remaining = num_rows
        self._finish, self._num_tokens = finish, num_tokens

    def set_row(self, index: int, row: list[float]) -> None:
        if self.future.done():            # failed or cancelled already
            return
        self._rows[index] = row
        self._remaining -= 1
        if self._remaining == 0:
            self._resolve()

    def _resolve(self) -> None:
        try:
            result = EncoderOutput(self._finish(self._rows), self._num_tokens)
        except Exception as exc:          # a bug in finishing must still answer the caller
            return self.fail(exc)
        try:
            self.future.set_result(result)
        except InvalidStateError:         # cancelled by the caller meanwhile
            pass

    def fail(self, exc: BaseException) -> None:
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            pass


@dataclass(slots=True)
class Item:
    """One input of a Job, as the batcher sees it."""
    token_ids: list[int]
    want: str                  # "embedding" | "logits"
    normalize: bool
    job: Job
    index: int                 # its row in the Job


class EncoderRunner:
    """A BERT checkpoint with its tokenizer and pooling: requests -> Jobs, batches -> rows."""

    def __init__(self, model: str, config: EncoderConfig, max_inputs_per_request: int | None = None):
        checkpoint = open_checkpoint(model)
        if checkpoint.config.family != "bert":
            raise UnsupportedModelError(f"{model}: an encoder needs a BERT-family checkpoint, "
                                        f"got {checkpoint.config.model_type!r}")
        self.model_id, self.config = str(model), checkpoint.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint.config.dtype)
        self.pooling = read_pooling_config(checkpoint.path)
        self.model = build_model(checkpoint, self.dtype, self.device)
        # Our CPU op covers encoders (no cache, both ways); on CUDA the layers keep the reference.
        if self.device.type == "cpu":
            backend = select_backend(self.config, self.device)
            for layer in self.model.modules():
                if isinstance(layer, Attention):
                    layer.backend = backend
        self.tokenizer = load_tokenizer(checkpoint)
        lengths = [self.config.max_position_embeddings, self.pooling.max_seq_length]
        self.max_length: int = min(n for n in lengths if n)
        self.max_inputs_per_request = max_inputs_per_request
        self.limits = EncoderLimits(
            model_id=self.model_id, max_length=self.max_length, hidden_size=self.config.hidden_size,
            vocab_size=self.config.vocab_size, has_classifier=self.has_classifier,
            labels=self.config.id2label, max_inputs_per_request=max_inputs_per_request,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."))
        self._suffix = _special_suffix(self.tokenizer)

    @property
    def has_classifier(self) -> bool:
        return self.model.classifier is not None

    # --- requests: validation before anything is queued ---

    def embed_job(self, inputs: Inputs, normalize: bool, truncate: Truncate) -> tuple[Job, list[Item]]:
        ids = self.prepare(inputs, truncate)
        job = Job(len(ids), list, sum(map(len, ids)))
        return job, [Item(x, "embedding", normalize, job, i) for i, x in enumerate(ids)]

    def classify_job(self, inputs: Inputs, candidate_labels: Sequence[str] | None, truncate: Truncate,
                     options: ClassifyOptions = ClassifyOptions()) -> tuple[Job, list[Item]]:
        ids = self.prepare(inputs, truncate)
        if candidate_labels is not None:
            return self._zero_shot_job(ids, _check_labels(candidate_labels), options)
        if not self.has_classifier:
            raise InvalidParameter(
                "candidate_labels", f"model {self.model_id!r} has no classification head: pass "
                "candidate_labels (a list of label strings) for zero-shot classification, or "
                "serve a model with a sequence-classification head")
        labels = self.config.id2label
        function = options.function_to_apply or ("sigmoid" if _is_multi_label(self.config) else "softmax")
        job = Job(len(ids), lambda rows: [_label_scores(r, labels, function) for r in rows],
                  sum(map(len, ids)))
        return job, [Item(x, "logits", False, job, i) for i, x in enumerate(ids)]

    def _zero_shot_job(self, ids: list[list[int]], labels: list[str],
                       options: ClassifyOptions) -> tuple[Job, list[Item]]:
        """Inputs and labels embedded in the same batches; scored by cosine when all are in."""
        template = options.hypothesis_template or "{}"
        if template.count("{}") != 1:
            raise InvalidParameter("hypothesis_template", "hypothesis_template must hold one {} "
                                   f"where the label goes, got {template!r}")
        label_ids = self.prepare([template.replace("{}", label) for label in labels], truncate=True,
                                 check_count=False)
        job = Job(len(ids) + len(labels),
                  lambda rows: _zero_shot(rows, len(ids), labels, options.multi_label), sum(map(len, ids)))
        return job, [Item(x, "embedding", True, job, i) for i, x in enumerate(ids + label_ids)]

    def prepare(self, inputs: Inputs, truncate: Truncate, check_count: bool = True) -> list[list[int]]:
        """Strings or token-id lists -> token ids, each checked; raises InvalidParameter.
        truncate: False refuses an input past the model's length, True cuts it there, an int
        N cuts every input to at most N tokens (the closing special token kept)."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]                                   # one string, or one id list
        if not inputs:
            raise InvalidParameter("inputs", "inputs must not be empty")
        limit = self.max_inputs_per_request
        if check_count and limit is not None and len(inputs) > limit:
            raise InvalidParameter("inputs", f"{len(inputs)} inputs in one request; the limit is {limit}")
        return [self._fit(self._token_ids(x, i), i, truncate) for i, x in enumerate(inputs)]

    def _token_ids(self, value: Any, index: int) -> list[int]:
        if isinstance(value, str):
            if not value:
                raise InvalidParameter("inputs", f"input {index} is an empty string")
            return self.tokenizer.encode(value.lower() if self.pooling.lowercase else value)
        if not isinstance(value, (list, tuple)) or not value:
            raise InvalidParameter("inputs", f"input {index} must be a non-empty string or list of token ids, "
                               f"got {type(value).__name__}{' (empty)' if value == [] else ''}")
        vocab = self.config.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in value):
            raise InvalidParameter("inputs", f"input {index} has items that are not token ids in [0, {vocab})")
        return list(value)

    def _fit(self, ids: list[int], index: int, truncate: Truncate) -> list[int]:
        limit = self.max_length if isinstance(truncate, bool) else min(truncate, self.max_length)
        if len(ids) <= limit:
            return ids
        if truncate is False:
            raise PromptTooLongError("inputs", f"input {index} is {len(ids)} tokens long, more than "
                                     f"the model's maximum of {self.max_length} tokens; shorten it "
                                     "or pass truncate=true", len(ids), self.max_length)
        suffix = self._suffix if ids[len(ids) - len(self._suffix):] == self._suffix else []
        return ids[: max(limit - len(suffix), 1)] + suffix     # keep the closing [SEP]

    # --- batches ---

    @torch.inference_mode()
    def run(self, items: Sequence[Item]) -> list[list[float]]:
        """One packed forward; a row per item: its embedding or its logits."""
        lens = [len(item.token_ids) for item in items]
        seq_lens = torch.tensor(lens, device=self.device)
        input_ids = torch.tensor(list(itertools.chain.from_iterable(i.token_ids for i in items)),
                                 device=self.device)
        starts = torch.repeat_interleave(seq_lens.cumsum(0) - seq_lens, seq_lens)
        positions = torch.arange(len(input_ids), device=self.device) - starts
        meta = build_attn_metadata(lens, lens, None, 1, device=self.device, causal=False)
        hidden = self.model(input_ids, positions, meta)                 # (num_tokens, hidden)
        rows: list = [None] * len(items)
        for want in ("embedding", "logits"):
            picked = [i for i, item in enumerate(items) if item.want == want]
            if picked:
                out = self._head(hidden, seq_lens, want, items)[picked]
                for i, row in zip(picked, out.tolist()):
                    rows[i] = row
        return rows

    def _head(self, hidden, seq_lens, want: str, items: Sequence[Item]) -> torch.Tensor:
        if want == "logits":
            return self.model.classify(self.model.pool(hidden, seq_lens, "cls")).float()
        pooled = self.model.pool(hidden, seq_lens, self.pooling.mode).float()
        flags = torch.tensor([item.normalize for item in items], device=pooled.device)
        return torch.where(flags[:, None], torch.nn.functional.normalize(pooled, dim=-1), pooled)


def run_batch(runner: EncoderRunner, batch: list[Item],
              on_batch: Callable[[int, int], None] | None = None) -> None:
    """Run a batch and hand rows to their Jobs. If it fails, its inputs are retried one by
    one, so one bad input fails only its own request."""
    try:
        rows = runner.run(batch)
    except Exception as exc:
        if len(batch) == 1:
            logger.exception("encoder batch failed")
            return batch[0].job.fail(exc)
        for item in batch:
            run_batch(runner, [item], on_batch)
        return
    for item, row in zip(batch, rows, strict=True):
        item.job.set_row(item.index, row)
    if on_batch is not None:
        try:
            on_batch(len(batch), sum(len(item.token_ids) for item in batch))
        except Exception:             # a metrics hook must not take the engine down
            logger.exception("on_batch callback failed")


def _special_suffix(tokenizer) -> list[int]:
    """The special tokens encode() appends after the text ([SEP] for BERT)."""
    full, bare = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    for start in range(len(full) - len(bare) + 1):
        if full[start: start + len(bare)] == bare:
            return full[start + len(bare):]
    return []


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
    vectors = torch.tensor(rows)
    similarity = vectors[:num_inputs] @ vectors[num_inputs:].T         # (inputs, labels) cosine
    scores = (1 + similarity).clamp(0, 2) / 2 if multi_label else (similarity * ZERO_SHOT_SCALE).softmax(-1)
    return [_ranked(labels, row) for row in scores.tolist()]


def _is_multi_label(config) -> bool:
    # As transformers' text-classification pipeline: one label or multi-label -> sigmoid.
    return config.problem_type == "multi_label_classification" or len(config.id2label) == 1


def _label_scores(logits: list[float], labels: Sequence[str], function: str) -> list[dict]:
    values = torch.tensor(logits)
    scores = {"sigmoid": values.sigmoid, "softmax": lambda: values.softmax(-1), "none": lambda: values}[function]()
    return _ranked(labels, scores.tolist())


def _ranked(labels: Sequence[str], scores: list[float]) -> list[dict]:
    return sorted(({"label": label, "score": score} for label, score in zip(labels, scores)),
                  key=lambda entry: -entry["score"])
