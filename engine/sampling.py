"""SamplingParams and the batched sampler.

Logits are processed in Hugging Face's order, so each control means what users of
`generate()` expect: repetition / frequency / presence penalties, temperature, top-k, top-p,
min-p, then a draw. Draws use the exponential-race form of Gumbel-max
(argmax(probs / E), E ~ Exp(1)); a request with a seed draws its noise from its own
generator, so its tokens depend on its seed and prompt only, never on its batch neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence as Seq

import torch

from engine.errors import InvalidParameter
from engine.guided import GuidedDecoding, apply_bitmask

# The bounds of each field, enforced here and imported by the HTTP schemas.
MAX_SEED = 2**64 - 1
MAX_TOP_LOGPROBS = 20
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0
MAX_ABS_PENALTY = 2.0                # frequency and presence penalties lie in [-2, 2]
MAX_N = 64
MAX_LOGIT_BIAS = 100.0               # each bias lies in [-100, 100] (OpenAI's range)
MAX_LOGIT_BIAS_ENTRIES = 1024
# Below this a temperature acts greedy: dividing logits by it would overflow float32.
_MIN_TEMPERATURE = 1e-5
# A smaller repetition penalty is clamped to it: its reward for seen tokens already
# dominates, and 1 / a float32 zero would make it infinite.
_MIN_REPETITION_PENALTY = 1e-30


@dataclass(slots=True)
class SamplingParams:
    """What a request asks of generation. Validated on construction (InvalidParameter names the field)."""

    max_tokens: int = 16
    temperature: float = 1.0             # 0: greedy
    top_k: int = -1                      # -1 or 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0      # CTRL-style, over prompt and output tokens
    frequency_penalty: float = 0.0       # OpenAI-style, over output tokens
    presence_penalty: float = 0.0
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # None: no alternatives; k: top-k alternatives per token
    prompt_logprobs: int | None = None   # None: none; k: each prompt token's logprob and top-k alternatives
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None       # token id -> added to its logit before sampling
    guided_decoding: GuidedDecoding | None = None    # a grammar the text must follow

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        _check(self.max_tokens >= 1, "max_tokens", "must be >= 1", self.max_tokens)
        _check(0.0 <= self.temperature <= MAX_TEMPERATURE, "temperature",
               f"must be in [0, {MAX_TEMPERATURE:g}]", self.temperature)
        _check(self.top_k == -1 or self.top_k >= 0, "top_k", "must be -1 (off) or >= 0", self.top_k)
        _check(0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(0.0 < self.repetition_penalty <= MAX_REPETITION_PENALTY, "repetition_penalty",
               f"must be in (0, {MAX_REPETITION_PENALTY:g}]", self.repetition_penalty)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY, name,
                   f"must be in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]", value)
        _check(self.seed is None or 0 <= self.seed <= MAX_SEED, "seed",
               "must be in [0, 2**64 - 1]", self.seed)
        _check(1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]", self.n)
        _check(all(isinstance(s, str) and s for s in self.stop), "stop",
               "must be non-empty strings", self.stop)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= MAX_TOP_LOGPROBS, name,
                   f"must be in [0, {MAX_TOP_LOGPROBS}]", value)
        if self.logit_bias:
            self._check_logit_bias()
        _check(self.guided_decoding is None or isinstance(self.guided_decoding, GuidedDecoding),
               "guided_decoding", "must be a GuidedDecoding", self.guided_decoding)

    def _check_logit_bias(self) -> None:
        _check(len(self.logit_bias) <= MAX_LOGIT_BIAS_ENTRIES, "logit_bias",
               f"must have at most {MAX_LOGIT_BIAS_ENTRIES} entries", len(self.logit_bias))
        for token_id, bias in self.logit_bias.items():
            _check(isinstance(token_id, int) and token_id >= 0, "logit_bias",
                   "keys must be token ids (integers >= 0)", token_id)
            _check(isinstance(bias, (int, float)) and -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS, "logit_bias",
                   f"values must be in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]", bias)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _MIN_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0
                or self.presence_penalty != 0.0)

    @property
    def uses_filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0


def _check(ok: bool, name: str, rule: str, value) -> None:
    # NaN fails every comparison, so it lands here too.
    if not ok:
        raise InvalidParameter(name, f"{name} {rule}, got {value!r}")


@dataclass(slots=True)
class SampleRequest:
    """One row of logits to sample from, with what the sampler needs of its sequence."""

    params: SamplingParams
    prompt_token_ids: Seq[int]
    output_token_ids: Seq[int]
    generator: torch.Generator | None    # per-request RNG when seeded


@dataclass(slots=True)
class TokenMasks:
    """The allowed tokens of constrained rows: rows[i]'s mask is bitmask[i] (bit j of word w:
    token 32w + j). Rows with no grammar are not in it."""

    rows: list[int]
    bitmask: torch.Tensor                          # (len(rows), ceil(vocab / 32)) int32


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]                          # of each chosen token under the raw model distribution
    top_logprobs: list[list[tuple[int, float]] | None]
    failed_rows: list[int]                         # rows whose logits were not finite


def row_stats(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first argmax, logsumexp) of each row: the reference of the CPU kernels' one-call version."""
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


class Sampler:
    """`kernels`: our CPU kernels (engine.kernels.load()) when the runner uses them: the two
    reductions over the vocabulary then take one call (engine/csrc/fused_ops.cpp)."""

    def __init__(self, seed: int = 0, kernels=None):
        self.generator: torch.Generator | None = None
        self.seed = seed
        self.row_stats = kernels.argmax_logsumexp if kernels is not None else row_stats

    def __call__(self, logits: torch.Tensor, requests: Seq[SampleRequest],
                 masks: TokenMasks | None = None) -> SamplerOutput:
        """logits (num_rows, vocab) float -> one token per row. Logprobs are the raw model's;
        masks, logit biases and every other rule shape only the choice."""
        logits = logits.float().contiguous()
        # The normalizer of the raw distribution is finite exactly when the row has no NaN or
        # +inf: logprob = logit - logsumexp, no log_softmax copy.
        raw_argmax, log_normalizer = self.row_stats(logits)            # (num_rows,) each
        finite = torch.isfinite(log_normalizer)
        processed = logits
        if masks is not None and masks.rows:
            processed = apply_bitmask(processed, masks.rows, masks.bitmask)
        if any(r.params.logit_bias for r in requests):
            processed = apply_logit_bias(processed, requests)
        processed = self._process(processed, requests)
        # The raw argmax is the greedy choice only while no rule has changed the logits.
        token_ids = self._draw(processed, requests, raw_argmax if processed is logits else None)
        chosen = logits.gather(1, token_ids[:, None])[:, 0] - log_normalizer
        top = self._top_logprobs(logits, log_normalizer, requests)
        finite_list, ids_list, chosen_list = finite.tolist(), token_ids.tolist(), chosen.tolist()
        return SamplerOutput(
            token_ids=ids_list, logprobs=chosen_list, top_logprobs=top,
            failed_rows=[i for i, ok in enumerate(finite_list) if not ok])

    def _process(self, logits: torch.Tensor, requests: Seq[SampleRequest]) -> torch.Tensor:
        if any(r.params.uses_penalties for r in requests):
            logits = apply_penalties(logits, requests)
        if all(r.params.is_greedy or not r.params.uses_filters for r in requests) and \
                all(r.params.is_greedy or r.params.temperature == 1.0 for r in requests):
            return logits                                               # nothing left to do
        temperatures = torch.tensor([1.0 if r.params.is_greedy else r.params.temperature
                                     for r in requests], device=logits.device)
        logits = logits / temperatures[:, None]
        if any(r.params.top_k > 0 for r in requests):
            logits = apply_top_k(logits, [r.params.top_k for r in requests])
        if any(r.params.top_p < 1.0 for r in requests):
            logits = apply_top_p(logits, [r.params.top_p for r in requests])
        if any(r.params.min_p > 0.0 for r in requests):
            logits = apply_min_p(logits, [r.params.min_p for r in requests])
        return logits

    def _draw(self, logits: torch.Tensor, requests: Seq[SampleRequest],
              argmax: torch.Tensor | None = None) -> torch.Tensor:
        """argmax: the rows' argmax when already known (logits unprocessed)."""
        greedy = logits.argmax(dim=-1) if argmax is None else argmax.clone()
        sampled_rows = [i for i, r in enumerate(requests) if not r.params.is_greedy]
        if not sampled_rows:
            return greedy
        probs = torch.softmax(logits[sampled_rows], dim=-1)
        noise = torch.empty_like(probs)
        unseeded = [j for j, i in enumerate(sampled_rows) if requests[i].generator is None]
        if unseeded:
            noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=probs.device) \
                .exponential_(generator=self._global_generator(probs.device))
        for j, i in enumerate(sampled_rows):
            if requests[i].generator is not None:
                noise[j].exponential_(generator=requests[i].generator)
        greedy[sampled_rows] = (probs / noise).argmax(dim=-1)
        return greedy

    def _global_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None or self.generator.device != device:
            self.generator = torch.Generator(device=device).manual_seed(self.seed)
        return self.generator

    def _top_logprobs(self, logits, log_normalizer, requests) -> list[list[tuple[int, float]] | None]:
        wanted = [r.params.logprobs or 0 for r in requests]
        if not any(wanted):
            return [None] * len(requests)
        values, ids = logits.topk(max(wanted), dim=-1)
        values, ids = (values - log_normalizer[:, None]).tolist(), ids.tolist()
        return [list(zip(ids[i][:k], values[i][:k])) if k else None for i, k in enumerate(wanted)]


def apply_logit_bias(logits: torch.Tensor, requests: Seq[SampleRequest]) -> torch.Tensor:
    """Each row's logit_bias added to its logits (one scatter per biased row)."""
    bias = torch.zeros_like(logits)
    for i, r in enumerate(requests):
        if r.params.logit_bias:
            ids = torch.tensor(list(r.params.logit_bias), dtype=torch.long, device=logits.device)
            values = torch.tensor(list(r.params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
            bias[i, ids] = values
    return logits + bias


def apply_penalties(logits: torch.Tensor, requests: Seq[SampleRequest]) -> torch.Tensor:
    """Repetition (prompt + output), frequency and presence (output only) penalties."""
    num_rows, vocab = logits.shape
    device = logits.device
    output_counts = torch.zeros(num_rows, vocab, device=device)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool, device=device)
    for i, r in enumerate(requests):
        if not r.params.uses_penalties:
            continue
        out_ids = torch.tensor(list(r.output_token_ids), dtype=torch.long, device=device)
        output_counts[i].index_add_(0, out_ids, torch.ones(len(out_ids), device=device))
        seen[i, torch.tensor(list(r.prompt_token_ids), dtype=torch.long, device=device)] = True
    seen |= output_counts > 0
    rep = torch.tensor([max(r.params.repetition_penalty, _MIN_REPETITION_PENALTY) for r in requests],
                       device=device)[:, None]
    freq = torch.tensor([r.params.frequency_penalty for r in requests], device=device)[:, None]
    pres = torch.tensor([r.params.presence_penalty for r in requests], device=device)[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalized, logits)
    return logits - freq * output_counts - pres * (output_counts > 0).float()


def apply_top_k(logits: torch.Tensor, top_ks: list[int]) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=logits.device)
    sorted_desc = logits.sort(dim=-1, descending=True).values
    kth = sorted_desc.gather(1, (ks - 1)[:, None])                      # (num_rows, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
    # Keep the smallest set of most likely tokens whose mass reaches top_p (the top one always).
    p = torch.tensor(top_ps, device=logits.device)[:, None]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_ps: list[float]) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    threshold = torch.tensor(min_ps, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))
