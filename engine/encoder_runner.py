"""The encoder's model side: inputs validated and tokenized into Items, packed batches run
through the model and its heads, rows handed back to each request's Job.

What each task asks and how its rows become an answer is engine/encoder_tasks.py's. Refusals
are engine/errors.py's: `PromptTooLongError` for an input past the model's length,
`InvalidParameter` (naming the field) for the rest; anything else a Future raises is our bug.
"""
from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch

from engine.config import EncoderConfig, UnsupportedModelError
from engine.device import resolve_device, resolve_dtype
from engine.errors import InvalidParameter, PromptTooLongError
from engine.layers.attention import Attention, TorchAttention, build_attn_metadata
from engine.layers.cpu_attention import CpuPagedAttention
from engine.layers.encoder_attention import PerSequenceAttention, SequenceSpans
from engine.limits import EncoderLimits
from engine.loader import build_model, load_tokenizer, open_checkpoint
from engine.model_runner import select_backend
from engine.models.bert import SparsePooling, read_pooling_config

logger = logging.getLogger(__name__)
Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]
Truncate = bool | int          # False: refuse what is too long; True: cut at the model's length; N: at N
DIRECTIONS = ("right", "left")  # which end of an input truncation cuts


@dataclass(frozen=True, slots=True)
class EncoderOutput:
    data: Any                  # per task (engine/encoder_tasks.py): embeddings are a (n, dim) float32 array
    num_tokens: int            # tokens of the inputs as run (after truncation), for usage
    num_inputs: int = 0        # inputs the model ran (zero-shot labels and a rerank's query included)


class Job:
    """One request: its inputs' rows gather here; `future` resolves when the last is in.

    Only threads that run batches call `set_row` / `fail`; a request's inputs may be in batches
    that two workers run at once, so the count is kept under a lock."""

    def __init__(self, num_rows: int, finish: Callable[[list], Any], num_tokens: int):
        self.future: Future = Future()
        self._rows: list = [None] * num_rows
        self._remaining = num_rows
        self._finish, self._num_tokens = finish, num_tokens
        self._lock = threading.Lock()

    def set_row(self, index: int, row: Any) -> None:
        if self.future.done():            # failed or cancelled already
            return
        with self._lock:
            self._rows[index] = row
            self._remaining -= 1
            last = self._remaining == 0
        if last:
            self._resolve()

    def _resolve(self) -> None:
        try:
            result = EncoderOutput(self._finish(self._rows), self._num_tokens, len(self._rows))
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
    want: str                  # a head of EncoderRunner.HEADS: "embedding" | "logits" | "sparse" | "masks"
    normalize: bool            # "embedding": L2-normalized
    job: Job
    index: int                 # its row in the Job
    token_type_ids: list[int] | None = None   # a pair's segments (cross-encoders); None: all 0


class EncoderRunner:
    """A BERT checkpoint with its tokenizer and sentence-transformers config: inputs -> token
    ids, batches -> rows."""

    def __init__(self, model: str, config: EncoderConfig, max_inputs_per_request: int | None = None,
                 name: str | None = None):
        checkpoint = open_checkpoint(model)
        if checkpoint.config.family != "bert":
            raise UnsupportedModelError(f"{model}: an encoder needs a BERT-family checkpoint, "
                                        f"got {checkpoint.config.model_type!r}")
        self.model_id, self.config = name or str(model), checkpoint.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device, checkpoint.config.dtype)
        self.pooling = read_pooling_config(checkpoint.path)
        self.model = build_model(checkpoint, self.dtype, self.device)
        self.attention = encoder_attention(self.config, self.device)
        for module in self.model.modules():
            if isinstance(module, Attention):
                module.backend = self.attention
        if self.pooling.sparse is not None and self.model.cls is None:
            raise UnsupportedModelError(f"{model}: SPLADE pooling needs a masked-LM head (BertForMaskedLM), "
                                        f"got {self.config.architecture}")
        self.tokenizer = load_tokenizer(checkpoint)
        lengths = [self.config.max_position_embeddings, self.pooling.max_seq_length]
        self.max_length: int = min(n for n in lengths if n)
        self.max_inputs_per_request = max_inputs_per_request
        self.mask_token_id = self.tokenizer.token_to_id(self.tokenizer.special_tokens.get("mask_token") or "")
        self._prefix, self._suffix = _special_ends(self.tokenizer)
        self.limits = EncoderLimits(
            model_id=self.model_id, max_length=self.max_length, hidden_size=self.config.hidden_size,
            vocab_size=self.config.vocab_size, has_classifier=self.has_classifier,
            labels=self.config.id2label, max_inputs_per_request=max_inputs_per_request,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."), tasks=self.tasks,
            rerank_scoring="cross-encoder" if self.is_cross_encoder else "cosine",
            prompts=tuple(self.pooling.prompts), default_prompt_name=self.pooling.default_prompt_name,
            mask_token=self.tokenizer.special_tokens.get("mask_token") if self.has_mlm_head else None)

    @property
    def has_classifier(self) -> bool:
        return self.model.classifier is not None

    @property
    def has_mlm_head(self) -> bool:
        return self.model.cls is not None and self.mask_token_id is not None

    @property
    def is_sparse(self) -> bool:
        """A SPLADE checkpoint (its sentence-transformers config says so): no dense vectors."""
        return self.pooling.sparse is not None

    @property
    def is_cross_encoder(self) -> bool:
        """One logit per (query, text) pair: sentence-transformers' CrossEncoder."""
        return self.has_classifier and len(self.config.id2label) == 1

    @property
    def tasks(self) -> frozenset[str]:
        """What this checkpoint can answer (the service's task names). A classifier's pooled
        states are no embedding: it classifies (and reranks, with one label) with its head."""
        dense = not self.is_sparse
        embedder = dense and not self.has_classifier
        tasks = {"embed": embedder, "similarity": embedder, "classify": self.has_classifier or embedder,
                 "rerank": self.is_cross_encoder or embedder,
                 "embed_sparse": self.has_mlm_head, "fill_mask": self.has_mlm_head}
        return frozenset(task for task, ok in tasks.items() if ok)

    # --- inputs: validated before anything is queued ---

    def prepare(self, inputs: Inputs, truncate: Truncate, check_count: bool = True, direction: str = "right",
                prompt: str = "", param: str = "inputs") -> list[list[int]]:
        """Strings or token-id lists -> token ids, each checked; raises InvalidParameter.
        truncate: False refuses an input past the model's length, True cuts it there, an int
        N cuts every input to at most N tokens (the special tokens at either end kept); direction
        "left" cuts an input's start. `prompt` goes before each string (not before token ids).
        `param` is the request field the inputs came in, for errors."""
        if isinstance(inputs, str) or (inputs and isinstance(inputs[0], int)):
            inputs = [inputs]                                   # one string, or one id list
        if not inputs:
            raise InvalidParameter(param, f"{param} must not be empty")
        limit = self.max_inputs_per_request
        if check_count and limit is not None and len(inputs) > limit:
            raise InvalidParameter(param, f"{len(inputs)} inputs in one request; the limit is {limit}")
        return [self.fit(self._token_ids(x, i, prompt, param), i, truncate, direction, param)
                for i, x in enumerate(inputs)]

    def _token_ids(self, value: Any, index: int, prompt: str = "", param: str = "inputs") -> list[int]:
        if isinstance(value, str):
            if not value:
                raise InvalidParameter(param, f"input {index} is an empty string")
            return self.tokenizer.encode(self.text(prompt + value))
        if not isinstance(value, (list, tuple)) or not value:
            raise InvalidParameter(param, f"input {index} must be a non-empty string or list of token ids, "
                                   f"got {type(value).__name__}{' (empty)' if value == [] else ''}")
        vocab = self.config.vocab_size
        if not all(type(t) is int and 0 <= t < vocab for t in value):
            raise InvalidParameter(param, f"input {index} has items that are not token ids in [0, {vocab})")
        return list(value)

    def text(self, value: str) -> str:
        """A text as the model was trained to read it (lower-cased where its config says so)."""
        return value.lower() if self.pooling.lowercase else value

    def fit(self, ids: list[int], index: int, truncate: Truncate, direction: str = "right",
            param: str = "inputs") -> list[int]:
        limit = self.max_length if isinstance(truncate, bool) else min(truncate, self.max_length)
        if len(ids) <= limit:
            return ids
        if truncate is False:
            raise PromptTooLongError(param, f"input {index} is {len(ids)} tokens long, more than "
                                     f"the model's maximum of {self.max_length} tokens; shorten it "
                                     "or pass truncate=true", len(ids), self.max_length)
        # Keep the special tokens at each end ([CLS] ... [SEP]); cut the text between them.
        head = self._prefix if ids[: len(self._prefix)] == self._prefix else []
        tail = self._suffix if ids[len(ids) - len(self._suffix):] == self._suffix else []
        room = max(limit - len(head) - len(tail), 1)
        body = ids[len(head): len(ids) - len(tail)]
        return head + (body[:room] if direction == "right" else body[-room:]) + tail

    def pair(self, first: str, second: str, index: int, truncate: Truncate, direction: str = "right",
             strategy: str = "longest_first", max_second: int | None = None) -> tuple[list[int], list[int]]:
        """(ids, token type ids) of [CLS] first [SEP] second [SEP]; truncate as in `prepare`,
        each text cut as transformers cuts pairs (`strategy`: longest_first or only_second).
        max_second: the second text is first cut to this many tokens."""
        first, second = self.text(first), self.text(second)
        if truncate is False:
            ids, types = self.tokenizer.encode_pair(first, second, None, strategy, direction, max_second)
            if len(ids) > self.max_length:
                raise PromptTooLongError("texts", f"the query and text {index} are {len(ids)} tokens long "
                                         f"together, more than the model's maximum of {self.max_length} "
                                         "tokens; shorten them or pass truncate=true", len(ids), self.max_length)
            return ids, types
        limit = self.max_length if isinstance(truncate, bool) else min(truncate, self.max_length)
        try:
            return self.tokenizer.encode_pair(first, second, limit, strategy, direction, max_second)
        except ValueError as exc:          # the query alone leaves no room
            num_tokens = len(self.tokenizer.encode(first)) + 1
            raise PromptTooLongError("query", f"the query is too long to pair with any text within "
                                     f"{limit} tokens ({exc})", num_tokens, limit) from None

    # --- batches ---

    @torch.inference_mode()
    def run(self, items: Sequence[Item]) -> list:
        """One packed forward; a row per item, from the head it wants (HEADS)."""
        lens = [len(item.token_ids) for item in items]
        seq_lens = torch.tensor(lens, device=self.device)
        input_ids = torch.tensor(list(itertools.chain.from_iterable(i.token_ids for i in items)),
                                 device=self.device)
        starts = torch.repeat_interleave(seq_lens.cumsum(0) - seq_lens, seq_lens)
        positions = torch.arange(len(input_ids), device=self.device) - starts
        token_types = None
        if any(item.token_type_ids is not None for item in items):
            token_types = torch.tensor(list(itertools.chain.from_iterable(
                item.token_type_ids or [0] * len(item.token_ids) for item in items)), device=self.device)
        meta = SequenceSpans.of(lens) if isinstance(self.attention, PerSequenceAttention) \
            else build_attn_metadata(lens, lens, None, 1, device=self.device, causal=False)
        hidden = self.model(input_ids, positions, meta, token_types)    # (num_tokens, hidden)
        rows: list = [None] * len(items)
        wants = sorted({item.want for item in items})
        for want in wants:
            picked = [i for i, item in enumerate(items) if item.want == want]
            sub_hidden, sub_lens = _rows_of(hidden, lens, picked)
            sub_items = [items[i] for i in picked]
            for i, row in zip(picked, self.HEADS[want](self, sub_hidden, sub_lens, sub_items)):
                rows[i] = row
        return rows

    def _embedding(self, hidden, seq_lens, items) -> np.ndarray:
        pooled = self.model.pool(hidden, seq_lens, self.pooling.mode).float()
        flags = torch.tensor([item.normalize for item in items], device=pooled.device)
        pooled = torch.where(flags[:, None], torch.nn.functional.normalize(pooled, dim=-1), pooled)
        return pooled.cpu().numpy()                                   # (num_seqs, hidden) float32

    def _logits(self, hidden, seq_lens, items) -> np.ndarray:
        return self.model.classify(self.model.pool(hidden, seq_lens, "cls")).float().cpu().numpy()

    def _sparse(self, hidden, seq_lens, items) -> list[tuple[np.ndarray, np.ndarray]]:
        """(vocabulary indices, weights) of each input's non-zero SPLADE weights."""
        # (a masked LM with no SPLADE config of its own: SPLADE v2's max of log(1 + relu))
        weights = self.model.sparse(hidden, seq_lens, self.pooling.sparse or SparsePooling())   # (num_seqs, vocab)
        return [(indices, row[indices]) for row in weights.cpu().numpy() for indices in [row.nonzero()[0]]]

    def _masks(self, hidden, seq_lens, items) -> list[np.ndarray]:
        """Each input's masked-LM probabilities at its [MASK] tokens: (num_masks, vocab)."""
        ids = torch.tensor(list(itertools.chain.from_iterable(item.token_ids for item in items)),
                           device=hidden.device)
        at_mask = (ids == self.mask_token_id).nonzero().squeeze(1)
        probs = self.model.mlm_logits(hidden[at_mask]).float().softmax(-1).cpu().numpy()
        counts = [sum(1 for t in item.token_ids if t == self.mask_token_id) for item in items]
        return np.split(probs, np.cumsum(counts)[:-1])

    HEADS = {"embedding": _embedding, "logits": _logits, "sparse": _sparse, "masks": _masks}


def encoder_attention(config, device: torch.device):
    """Chosen once per model. On a CPU: our C++ op when it builds (packed rows, no padding, one
    call per layer), else attention per sequence in PyTorch (no padding either). Elsewhere the
    padded reference: one kernel per layer beats one per sequence on a GPU."""
    if device.type != "cpu":
        return TorchAttention()
    backend = select_backend(config, device)
    return backend if isinstance(backend, CpuPagedAttention) else PerSequenceAttention()


def _rows_of(hidden: torch.Tensor, lens: list[int], picked: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The hidden rows of the picked sequences (no copy when they are all), and their lengths."""
    if len(picked) == len(lens):
        return hidden, torch.tensor(lens, device=hidden.device)
    starts = list(itertools.accumulate([0, *lens]))
    rows = torch.cat([torch.arange(starts[i], starts[i] + lens[i]) for i in picked]).to(hidden.device)
    return hidden[rows], torch.tensor([lens[i] for i in picked], device=hidden.device)


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


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens encode() puts before and after a text ([CLS] and [SEP] for BERT)."""
    full, bare = tokenizer.encode("a"), tokenizer.encode("a", add_special_tokens=False)
    for start in range(len(full) - len(bare) + 1):
        if full[start: start + len(bare)] == bare:
            return full[:start], full[start + len(bare):]
    return [], []
