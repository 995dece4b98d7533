"""Embeddings and classification with dynamic batching, and the offline `Encoder`.

    callers (any thread, or asyncio)          worker threads (share the model, read-only)
    validate + tokenize, raise EncoderError   each takes queued inputs up to the token budget,
    one Job (a Future) per request     --->   one packed forward, rows handed back to Jobs;
    await / .result()                  <---   a Job resolves when its last input is in

On a CPU several workers each run whole batches on a few torch threads (a 2-core machine: two
workers of one thread) rather than one worker spreading each batch over every core: an
encoder forward is a few hundred small ops, and with the cores shared by the HTTP event loop
and the clients, every op's thread team waited at its barrier for a thread the OS had taken
away (2 threads: 57 sentences/s where 1 thread did 120, on a busy 2-core machine).

A request's inputs are queued one by one, so a large request fills several batches and small
requests from many clients share one. Batches are packed: no padding outside attention.
The model side (validation, batches, heads) lives in engine/encoder_runner.py, what each task
asks and answers in engine/encoder_tasks.py; refusals are engine/errors.py's, as for generation.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from typing import Callable, Sequence

from engine.config import EncoderConfig
from engine.device import default_num_threads, use_cpu_threads
from engine.encoder_runner import EncoderOutput, EncoderRunner, Inputs, Item, Job, Truncate, run_batch
from engine.encoder_tasks import (ClassifyOptions, SparseVector, classify_job, embed_job, fill_mask_job, rerank_job,
                                  similarity_job, sparse_job)
from engine.errors import EngineStoppedError, QueueFullError
from engine.limits import EncoderStats

__all__ = ["ClassifyOptions", "Encoder", "EncoderConfig", "EncoderEngine", "EncoderOutput", "SparseVector",
           "take_batch"]
# task -> its job builder (engine/encoder_tasks.py): (runner, *args, **options) -> (Job, Items)
JOBS = {"embed": embed_job, "classify": classify_job, "rerank": rerank_job, "similarity": similarity_job,
        "embed_sparse": sparse_job, "fill_mask": fill_mask_job}
logger = logging.getLogger(__name__)


def take_batch(queue: deque[Item], max_tokens: int, max_size: int) -> list[Item]:
    """Pop inputs from the left while num_inputs * longest stays within max_tokens (attention
    pads to the longest); at least one. Inputs of cancelled requests are dropped."""
    batch: list[Item] = []
    longest = 0
    while queue and len(batch) < max_size:
        item = queue[0]
        if item.job.future.cancelled():
            queue.popleft()
            continue
        new_longest = max(longest, len(item.token_ids))
        if batch and new_longest * (len(batch) + 1) > max_tokens:
            break
        batch.append(queue.popleft())
        longest = new_longest
    return batch


class EncoderEngine:
    """Dynamic batching on a worker thread that owns the model; thread-safe submits.

    `EncoderEngine(model, config)` or `EncoderEngine(model, max_batch_size=..., ...)` (the
    fields of EncoderConfig). `on_batch(num_inputs, num_tokens)` is called after each batch
    (on the worker thread), e.g. to record the `embed_batch_size` histogram. `max_queue`
    bounds queued *inputs*. A request waits at most `batch_wait_ms` for others to join its batch.
    """

    def __init__(self, model: str, config: EncoderConfig | None = None, *, name: str | None = None,
                 on_batch: Callable[[int, int], None] | None = None, **options):
        self.config = config = _config(config, options)
        self.runner = EncoderRunner(model, config, config.max_inputs_per_request, name=name)
        self.limits = self.runner.limits
        self.max_batch_tokens, self.max_batch_size = config.max_batch_tokens, config.max_batch_size
        self.batch_wait_s, self.max_queue, self.on_batch = config.batch_wait_ms / 1000, config.max_queue, on_batch
        self.num_workers, self.threads_per_worker = worker_plan(config, self.runner.device.type)
        self._queue: deque[Item] = deque()
        self._cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._stopping, self._drain = False, True
        self.last_progress = time.monotonic()     # for liveness: the workers touch it each loop

    # --- lifecycle ---

    def start(self) -> None:
        if self.is_alive:
            return
        self._stopping = False
        self._threads = [threading.Thread(target=self._loop, name=f"encoder-engine-{i}", daemon=True)
                         for i in range(self.num_workers)]
        for thread in self._threads:
            thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with drain, finish the queued ones first. Whatever is left
        fails with EngineStoppedError."""
        with self._cond:
            self._stopping, self._drain = True, drain
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self._threads:
            thread.join(None if deadline is None else max(deadline - time.monotonic(), 0))
        with self._cond:
            left, self._queue = list(self._queue), deque()
        for item in left:
            item.job.fail(EngineStoppedError("the encoder engine stopped"))

    def warm_up(self) -> None:
        """One real forward through the model's own head, so the first client does not pay
        for lazy initialization."""
        tasks = self.limits.tasks
        if "embed" in tasks or not tasks:
            future = self.submit("embed", ["warm up"])
        elif "rerank" in tasks:
            future = self.submit("rerank", "warm", ["up"])
        elif "embed_sparse" in tasks:
            future = self.submit("embed_sparse", ["warm up"])
        else:
            future = self.submit("classify", ["warm up"])
        future.result()

    @property
    def is_alive(self) -> bool:
        """Every worker runs."""
        return bool(self._threads) and all(thread.is_alive() for thread in self._threads)

    def stats(self) -> EncoderStats:
        """A consistent snapshot, safe from any thread."""
        with self._cond:
            return EncoderStats(num_queued_inputs=len(self._queue), is_alive=self.is_alive)

    # --- submitting ---

    def submit(self, task: str, *args, **options) -> Future[EncoderOutput]:
        """Validates now (raises InvalidParameter / PromptTooLongError); the Future gives the
        task's EncoderOutput. Tasks and their arguments: JOBS (engine/encoder_tasks.py)."""
        return self._submit(*JOBS[task](self.runner, *args, **options))

    async def run(self, task: str, *args, **options) -> EncoderOutput:
        return await asyncio.wrap_future(self.submit(task, *args, **options))

    def submit_embed(self, inputs: Inputs, normalize: bool = True, truncate: Truncate = False,
                     **options) -> Future[EncoderOutput]:
        """The Future gives EncoderOutput(embeddings: a (n, dim) float32 array)."""
        return self.submit("embed", inputs, normalize, truncate, **options)

    def submit_classify(self, inputs: Inputs, candidate_labels: Sequence[str] | None = None,
                        truncate: Truncate = False,
                        options: ClassifyOptions = ClassifyOptions()) -> Future[EncoderOutput]:
        """The model's own head, or zero-shot over candidate_labels when given."""
        return self.submit("classify", inputs, candidate_labels, truncate, options)

    async def embed(self, inputs: Inputs, normalize: bool = True,
                    truncate: Truncate = False) -> EncoderOutput:
        return await self.run("embed", inputs, normalize, truncate)

    async def classify(self, inputs: Inputs, candidate_labels: Sequence[str] | None = None,
                       truncate: Truncate = False, options: ClassifyOptions = ClassifyOptions()) -> EncoderOutput:
        return await self.run("classify", inputs, candidate_labels, truncate, options)

    def _submit(self, job: Job, items: list[Item]) -> Future[EncoderOutput]:
        # Longest first inside a request, so its batches hold inputs of similar length.
        items.sort(key=lambda item: -len(item.token_ids))
        with self._cond:
            if self._stopping or not self.is_alive:
                raise EngineStoppedError("the encoder engine is not running")
            if len(self._queue) + len(items) > self.max_queue:
                raise QueueFullError(f"{len(self._queue)} inputs are queued (limit "
                                     f"{self.max_queue}); retry later")
            self._queue.extend(items)
            self._cond.notify()
        return job.future

    # --- the worker ---

    def _loop(self) -> None:
        if self.runner.device.type == "cpu":
            use_cpu_threads(self.threads_per_worker)
        while (batch := self._next_batch()) is not None:
            try:
                run_batch(self.runner, batch, self.on_batch)
            except Exception as exc:      # our bug: answer this batch, keep serving the rest
                logger.exception("encoder worker failed on a batch")
                for item in batch:
                    item.job.fail(exc)
            self.last_progress = time.monotonic()

    def _next_batch(self) -> list[Item] | None:
        """Blocks for work; then waits up to the window for the batch to fill."""
        with self._cond:
            while True:
                while not self._queue and not self._stopping:
                    self.last_progress = time.monotonic()
                    self._cond.wait(1.0)
                if self._stopping and not (self._drain and self._queue):
                    return None
                deadline = time.monotonic() + self.batch_wait_s
                while not self._stopping and not self._batch_is_full():
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                batch = take_batch(self._queue, self.max_batch_tokens, self.max_batch_size)
                if batch:                          # empty when every queued input was cancelled
                    return batch

    def _batch_is_full(self) -> bool:
        # Queued inputs are not yet sorted, so count real tokens, not padded ones.
        if len(self._queue) >= self.max_batch_size:
            return True
        return sum(len(item.token_ids) for item in self._queue) >= self.max_batch_tokens


class Encoder:
    """Offline encoder tasks (no thread): `Encoder("all-minilm-l6-v2")`, with EncoderConfig's
    fields as options, like `LLM`.

    Runs the same packed batches as EncoderEngine, sorted by length over the whole call."""

    def __init__(self, model: str = "all-minilm-l6-v2", **encoder_options):
        config = EncoderConfig(**encoder_options)
        self.runner = EncoderRunner(model, config)
        self.limits = self.runner.limits
        self.max_batch_tokens, self.max_batch_size = config.max_batch_tokens, config.max_batch_size

    model_id = property(lambda self: self.runner.model_id)
    max_length = property(lambda self: self.runner.max_length, doc="tokens, special ones included")
    dimension = property(lambda self: self.runner.config.hidden_size)
    labels = property(lambda self: self.runner.config.id2label, doc="the head's labels, if any")

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.runner.tokenizer.encode(text, add_special_tokens)

    def embed(self, inputs: Inputs, normalize: bool = True, truncate: Truncate = False, *,
              dimensions: int | None = None, prompt_name: str | None = None) -> list[list[float]]:
        """Strings or token-id lists -> one vector each, L2-normalized unless normalize=False;
        `dimensions` keeps the first ones (Matryoshka), `prompt_name` one of the model's prompts."""
        return self._execute("embed", inputs, normalize, truncate, dimensions=dimensions,
                             prompt_name=prompt_name).tolist()

    def classify(self, inputs: Inputs, candidate_labels: Sequence[str] | None = None,
                 truncate: Truncate = False, options: ClassifyOptions = ClassifyOptions()) -> list[list[dict]]:
        """[[{label, score}, ...] sorted by score] per input: the model's own head, or
        zero-shot by cosine similarity to each of candidate_labels."""
        return self._execute("classify", inputs, candidate_labels, truncate, options)

    def rerank(self, query: str, texts: Sequence[str], truncate: Truncate = False,
               raw_scores: bool = False) -> list[float]:
        """A relevance score per text, in order: a cross-encoder's sigmoid(logit) (raw_scores:
        the logit), or a bi-encoder's cosine."""
        return self._execute("rerank", query, texts, truncate, raw_scores)

    def similarity(self, source: str, sentences: Sequence[str], truncate: Truncate = False) -> list[float]:
        """The cosine of each sentence with the source sentence."""
        return self._execute("similarity", source, sentences, truncate)

    def embed_sparse(self, inputs: Inputs, truncate: Truncate = False) -> list[SparseVector]:
        """SPLADE: the non-zero vocabulary weights of each input (a masked-LM checkpoint)."""
        return self._execute("embed_sparse", inputs, truncate)

    def fill_mask(self, inputs: str | Sequence[str], top_k: int = 5,
                  targets: Sequence[str] | None = None) -> list[list[list[dict]]]:
        """Per input, per [MASK]: [{token, token_str, score, sequence}] best first."""
        return self._execute("fill_mask", inputs, top_k, targets)

    def _execute(self, task: str, *args, **options):
        job, items = JOBS[task](self.runner, *args, **options)
        queue = deque(sorted(items, key=lambda item: -len(item.token_ids)))
        while queue:
            run_batch(self.runner, take_batch(queue, self.max_batch_tokens, self.max_batch_size))
        return job.future.result().data


def worker_plan(config: EncoderConfig, device_type: str) -> tuple[int, int | None]:
    """(worker threads, torch threads each). On a CPU: one worker per core up to 4, the cores
    shared out between them; elsewhere one worker (its device runs one batch at a time)."""
    if device_type != "cpu":
        return config.num_workers or 1, config.num_threads
    cores = default_num_threads()
    workers = config.num_workers or min(cores, 4)
    return workers, config.num_threads or max(1, cores // workers)


def _config(config: EncoderConfig | None, options: dict) -> EncoderConfig:
    if config is not None and options:
        raise TypeError("pass an EncoderConfig or its fields as options, not both")
    return config or EncoderConfig(**options)
