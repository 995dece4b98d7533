"""The batched sampler against straightforward per-request references, and SamplingParams
validation."""
import math

import pytest
import torch

from engine.sampling import (Sampler, SampleRequest, SamplingParams, apply_min_p, apply_penalties,
                             apply_top_k, apply_top_p)

VOCAB = 50


def request(prompt=(1, 2, 3), output=(3, 3, 4), generator=None, **params):
    return SampleRequest(SamplingParams(**params), list(prompt), list(output), generator)


# -- per-request references, written the plain way ---------------------------------------

def reference_penalties(logits, prompt, output, rep, freq, pres):
    logits = list(logits)
    for token in set(prompt) | set(output):
        logits[token] = logits[token] / rep if logits[token] > 0 else logits[token] * rep
    for token in set(output):
        logits[token] -= freq * output.count(token) + pres
    return logits


def reference_top_k(logits, k):
    threshold = sorted(logits, reverse=True)[k - 1]
    return [x if x >= threshold else -math.inf for x in logits]


def reference_top_p(logits, p):
    probs = torch.tensor(logits).softmax(-1).tolist()
    order = sorted(range(len(logits)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:                                # most likely first until the mass reaches p
        kept.add(i)
        mass += probs[i]
        if mass >= p:
            break
    return [x if i in kept else -math.inf for i, x in enumerate(logits)]


def reference_min_p(logits, min_p):
    probs = torch.tensor(logits).softmax(-1).tolist()
    return [x if probs[i] >= min_p * max(probs) else -math.inf for i, x in enumerate(logits)]


@pytest.fixture
def logits():
    return torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0)) * 3


def test_penalties_match_the_reference_per_row(logits):
    rows = [request(repetition_penalty=1.3), request(frequency_penalty=0.5, output=(5, 5, 5, 6)),
            request(presence_penalty=-0.7, prompt=(9,)), request()]
    ours = apply_penalties(logits, rows)
    for i, r in enumerate(rows):
        p = r.params
        expected = reference_penalties(logits[i].tolist(), r.prompt_token_ids, r.output_token_ids,
                                       p.repetition_penalty, p.frequency_penalty, p.presence_penalty)
        assert torch.allclose(ours[i], torch.tensor(expected), atol=1e-5)


def test_top_k_top_p_min_p_match_the_reference(logits):
    ks, ps, min_ps = [1, 5, 49, 50], [0.1, 0.5, 0.9, 1.0], [0.0, 0.05, 0.3, 1.0]
    for ours, ref, args in ((apply_top_k(logits, ks), reference_top_k, ks),
                            (apply_top_p(logits, ps), reference_top_p, ps),
                            (apply_min_p(logits, min_ps), reference_min_p, min_ps)):
        for i, arg in enumerate(args):
            assert ours[i].tolist() == pytest.approx(ref(logits[i].tolist(), arg)), (ref.__name__, arg)


def test_filters_agree_with_transformers_logits_processors(logits):
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper
    ids = torch.tensor([[1, 2, 3, 3, 3, 4]])
    row = logits[:1]
    assert torch.equal(apply_top_k(row, [7]), TopKLogitsWarper(7)(ids, row.clone()))
    assert torch.equal(apply_top_p(row, [0.8]), TopPLogitsWarper(0.8)(ids, row.clone()))
    assert torch.equal(apply_min_p(row, [0.1]), MinPLogitsWarper(0.1)(ids, row.clone()))
    ours = apply_penalties(row, [request(prompt=(1, 2, 3), output=(3, 3, 4), repetition_penalty=1.5)])
    assert torch.allclose(ours, RepetitionPenaltyLogitsProcessor(1.5)(ids, row.clone()))


def test_greedy_takes_the_argmax_after_penalties(logits):
    out = Sampler()(logits, [request(temperature=0)] * 4)
    assert out.token_ids == logits.argmax(-1).tolist()
    top = int(logits[0].argmax())
    penalized = Sampler()(logits[:1], [request(temperature=0, output=(top,), repetition_penalty=100.0)])
    assert penalized.token_ids[0] != top


def test_seeded_draw_depends_on_the_seed_only_not_on_the_batch(logits):
    def draw(batch_rows, seed):
        reqs = [request(temperature=1.0, generator=torch.Generator().manual_seed(seed))]
        reqs += [request(temperature=0.7) for _ in range(batch_rows - 1)]
        return Sampler(seed=batch_rows)(logits[:batch_rows], reqs).token_ids[0]
    alone = [draw(1, seed) for seed in range(20)]
    assert alone == [draw(4, seed) for seed in range(20)]
    assert len(set(alone)) > 3                                       # it really samples


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1, 0.0]]))
    sampler = Sampler(seed=1)
    counts = [0, 0, 0, 0]
    for _ in range(3000):
        counts[sampler(logits, [request(temperature=1.0, prompt=(0,), output=())]).token_ids[0]] += 1
    assert counts[3] == 0
    assert [c / 3000 for c in counts[:3]] == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


def test_logprobs_of_the_chosen_token_and_top_alternatives(logits):
    out = Sampler()(logits[:2], [request(temperature=0, logprobs=3), request(temperature=0)])
    raw = torch.log_softmax(logits[:2], -1)
    assert out.logprobs[0] == pytest.approx(raw[0].max().item(), abs=1e-5)
    assert [t for t, _ in out.top_logprobs[0]] == raw[0].topk(3).indices.tolist()
    assert out.top_logprobs[1] is None


def test_non_finite_rows_are_reported_not_sampled(logits):
    bad = logits.clone()
    bad[1, 3] = float("nan")
    out = Sampler()(bad, [request(temperature=0), request(temperature=0.5), request(), request()])
    assert out.failed_rows == [1]


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("top_p", 0.0), ("top_p", 1.5),
    ("top_k", -2), ("max_tokens", 0), ("seed", -1), ("seed", 2**64), ("min_p", 2.0),
    ("repetition_penalty", 0.0), ("n", 0), ("logprobs", 21), ("frequency_penalty", 3.0)])
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_extreme_but_valid_values_stay_finite(logits):
    out = Sampler()(logits[:2], [request(temperature=1e-40), request(repetition_penalty=1e-300, temperature=0)])
    assert out.token_ids[0] == int(logits[0].argmax())               # a tiny temperature is greedy
    seen = [1, 2, 3, 4]                                                # prompt + output of request()
    positive_seen = [t for t in seen if logits[1, t] > 0]
    if positive_seen:                                                  # the reward dominates, finitely
        assert out.token_ids[1] == max(positive_seen, key=lambda t: logits[1, t])
    assert out.failed_rows == []
