"""LLMEngine (add_request / step / abort) and the offline LLM API on top of it."""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass
from typing import Callable
from typing import Sequence as Seq

import torch

from engine.config import EngineConfig
from engine.device import resolve_device, resolve_dtype, use_cpu_threads
from engine.distributed import TensorParallelGroup
from engine.errors import EngineStoppedError
from engine.guided import GrammarCompiler, GrammarMatcher, disallow, fill_bitmask
from engine.kv_cache import BlockManager, ceil_div
from engine.tp_worker import cpu_threads_per_rank
from engine.limits import GenerationLimits
from engine.loader import build_model, load_tokenizer, open_checkpoint
from engine.model_runner import ModelRunner
from engine.outputs import CompletionState, RequestMetrics, RequestOutput
from engine.prompt_logprobs import PromptLogprob, collect_prompt_logprobs
from engine.quantization import plan_quantization, quantize_model, summarize
from engine.sampling import SampleRequest, Sampler, SamplerOutput, SamplingParams, TokenMasks
from engine.scheduler import PrefillCap, ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)

# Prompt tokens a CPU step takes while decodes run: two per decode, at least 32 (see _prefill_cap).
CPU_PREFILL_PER_DECODE = 2
CPU_MIN_PREFILL_TOKENS = 32


@dataclass(slots=True)
class StepStats:
    """What one step did; the service turns these into metrics."""

    duration_s: float
    num_seqs: int                   # sequences run this step
    num_prefill_tokens: int         # prompt tokens computed
    num_generated_tokens: int
    num_preempted: int
    num_running: int
    num_waiting: int
    num_free_blocks: int
    kv_cache_usage: float
    num_prefix_queries: int = 0     # prompt tokens looked up in the prefix cache this step
    num_prefix_hits: int = 0        # of those, tokens found cached


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    completions: list[CompletionState]
    metrics: RequestMetrics
    error: str | None = None
    prompt_logprobs: list[PromptLogprob | None] | None = None   # filled during prefill when asked

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions)


@dataclass
class EngineCounters:
    num_prompt_tokens_computed: int = 0         # prefill work actually done (prefix hits excluded)
    num_generated_tokens: int = 0
    num_steps: int = 0
    num_prefix_queries: int = 0                 # prompt tokens looked up in the prefix cache
    num_prefix_hits: int = 0                    # of those, tokens found cached


class LLMEngine:
    def __init__(self, model: str, config: EngineConfig | None = None):
        self.config = config or EngineConfig()
        self.num_threads = use_cpu_threads(self.config.num_threads or
                                           cpu_threads_per_rank(self.config.tensor_parallel_size))
        self.checkpoint = open_checkpoint(model)
        self.model_config = self.checkpoint.config
        if not self.model_config.is_causal:
            raise ValueError(f"{model} is an encoder ({self.model_config.architecture}); "
                             "serve it with Encoder, not LLM")
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device, self.model_config.dtype)
        self.tokenizer = load_tokenizer(self.checkpoint)
        # Tensor parallelism: the other ranks load their shards while this one loads its own.
        self.tensor_parallel = TensorParallelGroup.start(model, self.config, self.model_config) \
            if self.config.tensor_parallel_size > 1 else None
        shard = self.tensor_parallel.shard if self.tensor_parallel else None
        plan = plan_quantization(self.config.quantization, self.checkpoint, self.device)
        model_module = quantize_model(
            build_model(self.checkpoint, self.dtype, self.device, plan.gguf_kernels, shard), plan)
        self.quantization_summary = summarize(model_module, plan)
        logger.info("quantization: %s", self.quantization_summary)
        if self.tensor_parallel:
            self.runner = self.tensor_parallel.runner(model_module, self.config, self.device, self.dtype)
        else:
            self.runner = ModelRunner(model_module, self.model_config, self.config, self.device, self.dtype)
        self.block_manager = BlockManager(self.runner.num_blocks, self.config.block_size,
                                          self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.config.max_num_seqs,
                                   self.config.max_num_batched_tokens, self._prefill_cap())
        self.sampler = Sampler(self.config.seed, self.runner.cpu_kernels)
        self.max_model_len = self._decide_max_model_len()
        self.max_encoder_len = self._decide_encoder_len() if self.model_config.is_encoder_decoder else 0
        self.limits = GenerationLimits(
            model_id=str(model), vocab_size=self.model_config.vocab_size,
            max_model_len=self.max_model_len, max_num_seqs=self.config.max_num_seqs,
            block_size=self.config.block_size, num_blocks=self.runner.num_blocks,
            device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            quantization=str(self.quantization_summary), max_encoder_len=self.max_encoder_len,
            tensor_parallel_size=self.config.tensor_parallel_size)
        if self.device.type == "cuda" and not self.config.enforce_eager and self.runner.backend.supports_cuda_graphs \
                and not self.tensor_parallel:          # graphs would have to be captured on every rank
            self.runner.capture_cuda_graphs(self.config.max_num_seqs, self.max_model_len)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(
            self.tokenizer.eos_token_ids)
        self.grammars = GrammarCompiler(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self.counters = EngineCounters()
        self.step_listeners: list[Callable[[StepStats], None]] = []
        self._seq_ids = itertools.count()
        self._finished_outside_step: list[Request] = []

    def _prefill_cap(self) -> PrefillCap:
        """Prompt tokens per step while decodes run: what a decode may wait for. On a GPU a
        full chunk costs a few ms. On a CPU a step's time grows with its rows: a 512-token
        chunk held every stream ~1 s, and a fixed 128 still made 16 streams' ITL p99 4.2x their
        p50 while a fixed 32 made 64 streams' TTFT p50 7x longer (BENCHMARKS.md, the prefill
        sweep); two prompt tokens per decode, at least 32, keeps a step within ~3x a decode-only
        step's rows at any concurrency. --max-prefill-tokens fixes the cap instead."""
        budget = self.config.max_num_batched_tokens
        configured = self.config.max_prefill_tokens
        if configured is not None:
            return PrefillCap(min(configured, budget), budget)
        if self.device.type == "cpu":
            return PrefillCap(min(CPU_MIN_PREFILL_TOKENS, budget), budget, CPU_PREFILL_PER_DECODE)
        return PrefillCap(budget, budget)

    def _decide_max_model_len(self) -> int:
        model_max = self.model_config.max_position_embeddings
        pool_tokens = self.runner.num_blocks * self.config.block_size
        if self.model_config.is_encoder_decoder:    # the other half holds the encoder's output
            pool_tokens //= 2
        asked = self.config.max_model_len
        if asked is not None and asked > model_max and self.model_config.family == "gpt2":
            raise ValueError(f"max_model_len {asked} exceeds GPT-2's {model_max} learned positions")
        if asked is not None and asked > pool_tokens:
            raise ValueError(f"max_model_len {asked} does not fit the KV cache "
                             f"({pool_tokens} tokens); raise kv_cache_memory")
        if asked is None and model_max > pool_tokens:
            logger.warning("max_model_len lowered from %d to %d: the KV cache holds no more",
                           model_max, pool_tokens)
        return asked or min(model_max, pool_tokens)

    def _decide_encoder_len(self) -> int:
        """An encoder-decoder's cap on its input: the model's positions, and what the KV pool
        holds beside a sequence of max_model_len decoder tokens."""
        size = self.config.block_size
        blocks_left = self.runner.num_blocks - ceil_div(self.max_model_len, size)
        if blocks_left < 1:
            raise ValueError(f"the KV cache ({self.runner.num_blocks} blocks) has no room for an encoder "
                             f"output beside {self.max_model_len} decoder tokens; raise kv_cache_memory")
        return min(self.model_config.max_position_embeddings, blocks_left * size)

    # -- requests -----------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: str | Seq[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None, prompt_text: str | None = None,
                    group_id: str | None = None) -> None:
        """Queue a prompt (text, or token ids; prompt_text names the text of given ids).
        group_id names the client request it belongs to (the scheduler is fair between
        groups; default: the request is its own). Raises InvalidParameter (PromptTooLongError)
        for what cannot run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else prompt_text
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.limits.validate_prompt(prompt_ids)
        self.limits.validate_n(params.n)
        self.limits.validate_logit_bias(params.logit_bias)
        self.limits.validate_prompt_logprobs(params.prompt_logprobs)
        # Compiled before anything is queued (InvalidGrammar); the async engine has done it
        # already, off this thread, and this finds it in the cache.
        grammar = self.grammars.compile(params.guided_decoding) if params.guided_decoding else None
        now = arrival_time if arrival_time is not None else time.monotonic()
        seqs = [self._new_sequence(request_id, prompt_ids, params, i, now) for i in range(params.n)]
        for seq in seqs:
            seq.group_id = group_id or request_id
            seq.grammar = GrammarMatcher(grammar) if grammar is not None else None
        seqs[0].siblings = seqs[1:]
        # Text continues the decoder's own prompt (an encoder-decoder's start token).
        completions = [CompletionState(i, self.tokenizer, seqs[0].prompt_token_ids, params, self.eos_token_ids)
                       for i in range(params.n)]
        request = Request(request_id, text, prompt_ids, params, seqs, completions, RequestMetrics(arrival_time=now))
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
            seqs[0].prompt_logits_from = 0 if len(prompt_ids) > 1 else None
        self.requests[request_id] = request
        self.scheduler.add(seqs[0])

    def _new_sequence(self, request_id, prompt_ids, params, index, now) -> Sequence:
        """A decoder-only model continues the prompt; an encoder-decoder encodes it and decodes
        from its start token."""
        encoder_ids: list[int] = []
        if self.model_config.is_encoder_decoder:
            prompt_ids, encoder_ids = [self.model_config.decoder_start_token_id], list(prompt_ids)
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_ids), len(prompt_ids),
                       max_tokens=min(params.max_tokens, self.max_model_len - len(prompt_ids)),
                       index=index, arrival_time=now, encoder_token_ids=encoder_ids)
        if params.seed is not None:
            seq.sampling_state = torch.Generator(self.device).manual_seed((params.seed + index) % 2**64)
        return seq

    def abort_request(self, request_id: str) -> None:
        """Stop a request and free its blocks now. Unknown or finished ids are a no-op."""
        request = self.requests.get(request_id)
        if request is None:
            return
        for seq, completion in zip(request.seqs, request.completions):
            completion.finish("abort")
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        self._finished_outside_step.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (idempotent; also done at exit). The engine
        cannot step afterwards."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.shutdown()

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # -- the step -----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample; returns outputs of requests that moved."""
        started = time.monotonic()
        batch = self.scheduler.schedule()
        self._mark_scheduled(batch, started)
        try:
            sampled = self._run(batch) if not batch.is_empty else None
        except EngineStoppedError:              # a tensor-parallel rank died: nothing can run now
            raise
        except Exception as exc:                # the forward failed: only this batch's requests fail
            logger.exception("model step failed")
            return self._fail_requests({seq.request_id for seq in batch.seqs}, exc)
        self.scheduler.after_step(batch)
        touched = self._process(batch, sampled) if sampled is not None else []
        self._report(batch, time.monotonic() - started)
        return self._collect_outputs(touched)

    def fail_all(self, message: str) -> list[RequestOutput]:
        """Fail every unfinished request (the caller hit an error it cannot place)."""
        return self._fail_requests(set(self.requests), RuntimeError(message))

    def _fail_requests(self, request_ids: set[str], exc: BaseException) -> list[RequestOutput]:
        failed = [self.requests[rid] for rid in request_ids if rid in self.requests]
        for request in failed:
            self._fail(request, f"{type(exc).__name__}: {exc}")
        return self._collect_outputs(failed)

    def _run(self, batch: ScheduledBatch) -> SamplerOutput:
        wanting = [j for j, seq in enumerate(batch.seqs) if seq.prompt_logits_from is not None]
        if wanting:
            logits, hidden = self.runner.execute_with_hidden(batch, wanting)
            self._collect_prompt_logprobs(batch, wanting, hidden)
        else:
            logits = self.runner.execute(batch)
        requests = [self._sample_request(seq) for seq, _ in batch.samples]
        masks = self._token_masks(batch)
        try:
            return self.sampler(logits, requests, masks)
        except Exception:                       # isolate: sample rows one by one
            logger.exception("batched sampling failed; sampling rows one at a time")
            return self._sample_rows_separately(logits, requests, masks)

    def _token_masks(self, batch: ScheduledBatch) -> TokenMasks | None:
        """What each constrained sequence's grammar allows next (EOS too, once the text may end,
        unless the request ignores EOS)."""
        rows = [i for i, (seq, _) in enumerate(batch.samples) if seq.grammar is not None]
        if not rows:
            return None
        matchers = []
        for i in rows:
            seq = batch.samples[i][0]
            if seq.grammar.num_tokens != seq.num_output_tokens:      # never, unless something went wrong
                seq.grammar.sync(seq.output_token_ids)
            matchers.append(seq.grammar)
        bitmask = fill_bitmask(matchers, self.grammars.vocab_size)
        for k, i in enumerate(rows):
            if self.requests[batch.samples[i][0].request_id].params.ignore_eos:
                disallow(bitmask, k, self.grammars.eos_token_ids)
        return TokenMasks(rows, bitmask)

    def _collect_prompt_logprobs(self, batch: ScheduledBatch, wanting: list[int], hidden) -> None:
        for j, rows in zip(wanting, hidden):
            seq = batch.seqs[j]
            request = self.requests[seq.request_id]
            collected = request.prompt_logprobs
            collect_prompt_logprobs(collected, request.prompt_token_ids, seq.num_computed_tokens, rows,
                                    self.runner.compute_logits, request.params.prompt_logprobs)
            done = len(collected) == len(request.prompt_token_ids)
            seq.prompt_logits_from = None if done else len(collected) - 1

    def _sample_request(self, seq: Sequence) -> SampleRequest:
        params = self.requests[seq.request_id].params
        return SampleRequest(params, seq.prompt_token_ids, seq.output_token_ids, seq.sampling_state)

    def _sample_rows_separately(self, logits, requests, masks: TokenMasks | None) -> SamplerOutput:
        out = SamplerOutput([], [], [], [])
        mask_of = {row: k for k, row in enumerate(masks.rows)} if masks is not None else {}
        for i, request in enumerate(requests):
            try:
                k = mask_of.get(i)
                row_mask = TokenMasks([0], masks.bitmask[k: k + 1]) if k is not None else None
                row = self.sampler(logits[i: i + 1], [request], row_mask)
            except Exception:
                logger.exception("sampling failed for one sequence")
                row = SamplerOutput([0], [0.0], [None], [0])
            out.token_ids += row.token_ids
            out.logprobs += row.logprobs
            out.top_logprobs += row.top_logprobs
            out.failed_rows += [i] if row.failed_rows else []
        return out

    def _process(self, batch: ScheduledBatch, sampled: SamplerOutput) -> list[Request]:
        now = time.monotonic()
        touched: dict[str, Request] = {}
        failed = set(sampled.failed_rows)
        for row, (seq, _) in enumerate(batch.samples):
            request = self.requests.get(seq.request_id)
            if request is None or seq.is_finished:
                continue
            touched[request.request_id] = request
            try:
                if row in failed:
                    raise FloatingPointError("the model produced non-finite logits")
                self._append_token(request, seq, sampled, row, now)
            except Exception as exc:
                logger.exception("request %s failed", request.request_id)
                self._fail(request, f"{type(exc).__name__}: {exc}")
        return list(touched.values())

    def _mark_scheduled(self, batch: ScheduledBatch, now: float) -> None:
        # Queue time ends when a request is first scheduled, before its first forward.
        for seq in batch.seqs:
            metrics = self.requests[seq.request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now

    def _append_token(self, request: Request, seq: Sequence, sampled: SamplerOutput, row: int,
                      now: float) -> None:
        token_id = sampled.token_ids[row]
        seq.append_token(token_id)
        self.counters.num_generated_tokens += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
        request.metrics.num_cached_tokens = request.seqs[0].num_cached_tokens
        completion = request.completions[seq.index]
        completion.add_token(token_id, sampled.logprobs[row], sampled.top_logprobs[row])
        if completion.finish_reason is None and seq.grammar is not None:
            self._advance_grammar(seq, completion, token_id)
        if completion.finish_reason is None and seq.num_output_tokens >= seq.max_tokens:
            completion.finish("length")
        if completion.finish_reason is not None:
            status = SequenceStatus.FINISHED_LENGTH if completion.finish_reason == "length" \
                else SequenceStatus.FINISHED_STOPPED
            self.scheduler.finish(seq, status)

    @staticmethod
    def _advance_grammar(seq: Sequence, completion: CompletionState, token_id: int) -> None:
        """The grammar takes the token; a complete text ends the completion ("stop")."""
        if seq.grammar.error is not None:          # e.g. a step past llguidance's work limits
            raise RuntimeError(f"the grammar could not go on: {seq.grammar.error}")
        if not seq.grammar.accept(token_id):
            # Only when the mask allowed no token (what the grammar needs next, no token of this
            # vocabulary spells), or on a bug.
            raise RuntimeError(f"the grammar refused token {token_id}: {seq.grammar.error}")
        if seq.grammar.is_finished:
            completion.finish("stop")

    def _fail(self, request: Request, message: str) -> None:
        request.error = message
        for seq, completion in zip(request.seqs, request.completions):
            completion.finish("error")
            if not seq.is_finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ERROR)

    def _collect_outputs(self, touched: list[Request]) -> list[RequestOutput]:
        touched += [r for r in self._finished_outside_step if r not in touched]
        self._finished_outside_step = []
        outputs = []
        for request in touched:
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self.requests.pop(request.request_id, None)
            outputs.append(RequestOutput(
                request.request_id, request.prompt, request.prompt_token_ids,
                [c.take_output() for c in request.completions], request.finished,
                request.metrics, request.error, self._finished_prompt_logprobs(request)))
        return outputs

    @staticmethod
    def _finished_prompt_logprobs(request: Request) -> list[PromptLogprob | None] | None:
        collected = request.prompt_logprobs
        return collected if collected is not None and len(collected) == len(request.prompt_token_ids) else None

    def _report(self, batch: ScheduledBatch, duration: float) -> None:
        prefill = sum(min(n, max(0, seq.num_prompt_tokens - (seq.num_computed_tokens - n)))
                      for seq, n in zip(batch.seqs, batch.num_new_tokens))
        prefill += sum(seq.num_encoder_tokens for seq in batch.encoder_seqs)
        counters = self.counters
        counters.num_prompt_tokens_computed += prefill
        counters.num_steps += 1
        counters.num_prefix_queries += batch.num_prefix_queries
        counters.num_prefix_hits += batch.num_prefix_hits
        blocks = self.block_manager
        stats = StepStats(duration, len(batch.seqs), prefill, len(batch.samples), len(batch.preempted),
                          self.num_running, self.num_waiting, blocks.num_free_blocks, blocks.usage,
                          batch.num_prefix_queries, batch.num_prefix_hits)
        for listener in self.step_listeners:
            listener(stats)


class LLM:
    """Offline generation: LLM("smollm2-135m-instruct").generate(prompts, SamplingParams(...))."""

    def __init__(self, model: str = "smollm2-135m-instruct", **engine_options):
        self.engine = LLMEngine(model, EngineConfig(**engine_options))
        self._request_ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the tensor-parallel ranks, if any (also done at exit)."""
        self.engine.shutdown()

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """One finished RequestOutput per prompt, in order. Prompts are text or token ids."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        ids = []
        for prompt, request_params in zip(prompts, params_list, strict=True):
            ids.append(f"offline-{next(self._request_ids)}")
            self.engine.add_request(ids[-1], prompt, request_params)
        finished = {}
        while self.engine.has_unfinished_requests():
            finished.update((out.request_id, out) for out in self.engine.step() if out.finished)
        return [finished[i] for i in ids]

    def chat(self, messages: Seq[dict] | Seq[Seq[dict]], params: SamplingParams | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Messages through the model's chat template; one conversation or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(
            self.tokenizer.apply_chat_template(list(c), add_generation_prompt=add_generation_prompt),
            add_special_tokens=False) for c in conversations]
        return self.generate(prompts, params)
