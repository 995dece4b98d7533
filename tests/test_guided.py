"""Grammar-constrained decoding and logit_bias in the engine, on a tiny random model: random
weights prove the mask, not the model. Every seeded sample follows its schema, regex or
choices; constraints survive preemption, n > 1, chunked prefill and prefix caching; and
unconstrained requests beside constrained ones keep exactly their solo tokens."""
import json
import re

import jsonschema
import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidGrammar, InvalidParameter
from engine.guided import GrammarMatcher, GuidedDecoding, apply_bitmask, disallow, fill_bitmask, unpack_bitmask
from engine.sampling import Sampler, SampleRequest, TokenMasks

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", None]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
        "score": {"type": "number", "minimum": -1, "maximum": 1},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
NESTED = {
    "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                          "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["x", "y"], "additionalProperties": False}},
    "anyOf": [{"type": "array", "items": {"$ref": "#/$defs/point"}, "minItems": 1, "maxItems": 2},
              {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"}},
               "required": ["code"], "additionalProperties": False}],
}
REGEX = r"[a-z]{2,6}@(cat|dog)\.(com|org)"
CHOICES = ["yes", "no", "maybe not", 'say "hi"', "ünïcödé"]
SMALL = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                         "b": {"enum": ["x", "y"]}},
         "required": ["a", "b"], "additionalProperties": False}
NUM_SAMPLES = 50


def make_engine(path, **options) -> LLMEngine:
    defaults = dict(num_kv_blocks=4096, block_size=4, max_num_batched_tokens=128, max_num_seqs=64)
    return LLMEngine(str(path), EngineConfig(**{**defaults, **options}))


def run(engine: LLMEngine, requests: dict[str, tuple]) -> dict:
    """Add every request, step to the end; request id -> its final RequestOutput."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    return finished


def sampled(guided: GuidedDecoding, seed: int, **options) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 250, "temperature": 1.0, "seed": seed, "guided_decoding": guided, **options})


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


# -- the constraints hold on every sample -----------------------------------------------------

@pytest.mark.parametrize("schema", [SCHEMA, NESTED], ids=["object", "anyOf-ref-pattern"])
def test_every_sample_validates_against_its_json_schema(engine, schema):
    spec = GuidedDecoding("json", schema)
    outs = run(engine, {f"s{i}": ([5, 17, 42 + i], sampled(spec, seed=i)) for i in range(NUM_SAMPLES)})
    texts = [outs[f"s{i}"].text for i in range(NUM_SAMPLES)]
    for i in range(NUM_SAMPLES):
        assert outs[f"s{i}"].finish_reason == "stop", texts[i]
        jsonschema.validate(json.loads(texts[i]), schema)
    assert len(set(texts)) > NUM_SAMPLES // 2                        # sampled, not one forced answer


def test_every_sample_matches_its_regex_and_choices(engine):
    regex, choice = GuidedDecoding("regex", REGEX), GuidedDecoding("choice", CHOICES)
    requests = {f"r{i}": ([7, 8, 9 + i], sampled(regex, seed=i)) for i in range(NUM_SAMPLES)}
    requests |= {f"c{i}": ([7, 8, 9 + i], sampled(choice, seed=i)) for i in range(NUM_SAMPLES)}
    outs = run(engine, requests)
    for i in range(NUM_SAMPLES):
        assert re.fullmatch(REGEX, outs[f"r{i}"].text), outs[f"r{i}"].text
        assert outs[f"c{i}"].text in CHOICES
        assert outs[f"r{i}"].finish_reason == outs[f"c{i}"].finish_reason == "stop"
    assert len({outs[f"c{i}"].text for i in range(NUM_SAMPLES)}) >= 3


def test_any_json_object(engine):
    outs = run(engine, {f"o{i}": ([3, 4, 5], sampled(GuidedDecoding("json", None), seed=i, max_tokens=400))
                        for i in range(12)})
    done = [o for o in outs.values() if o.finish_reason == "stop"]
    assert len(done) >= 6                                  # random weights: some run out of tokens
    for out in done:
        assert isinstance(json.loads(out.text), dict)
    for out in outs.values():                              # a cut one is still a JSON prefix
        assert out.text.lstrip().startswith("{")


def test_greedy_and_the_grammar_ending_the_completion(engine):
    out = run(engine, {"g": ([1, 2, 3], SamplingParams(max_tokens=50, temperature=0,
                                                          guided_decoding=GuidedDecoding("choice", ["only"])))})["g"]
    # The grammar is complete after "only": the completion stops there, not at max_tokens.
    assert out.text == "only" and out.finish_reason == "stop" and out.outputs[0].stop_reason is None
    assert len(out.token_ids) < 50


def test_n_completions_each_follow_their_own_matcher(engine):
    params = SamplingParams(n=6, max_tokens=60, temperature=1.0, seed=11, guided_decoding=GuidedDecoding("regex", REGEX))
    out = run(engine, {"n": ([9, 9, 9], params)})["n"]
    texts = [c.text for c in out.outputs]
    assert all(re.fullmatch(REGEX, t) for t in texts)
    assert len(set(texts)) > 1


def test_stop_strings_and_ignore_eos_beside_a_grammar(engine):
    spec = GuidedDecoding("regex", "(ab)+")
    outs = run(engine, {
        "stop": ([4, 5], SamplingParams(max_tokens=40, temperature=1.0, seed=2, guided_decoding=spec, stop=["bab"],
                                        ignore_eos=True)),
        "eos": ([4, 5], SamplingParams(max_tokens=12, temperature=1.0, seed=2, guided_decoding=spec, ignore_eos=True)),
    })
    stopped, long = outs["stop"], outs["eos"]
    assert stopped.outputs[0].stop_reason == "bab" and stopped.text == "a"          # "abab..." cut at "bab"
    # EOS is never allowed while ignoring it, and "(ab)+" never ends by itself: max_tokens ends it.
    assert long.finish_reason == "length" and re.fullmatch("(ab)+a?", long.text) and len(long.token_ids) == 12


def test_constraints_survive_preemption_chunked_prefill_and_prefix_caching(tiny_llama):
    spec = GuidedDecoding("json", SMALL)
    prefix = list(range(10, 42))                                     # 8 blocks of 4, shared
    requests = {f"p{i}": (prefix + [50 + i], sampled(spec, seed=i, max_tokens=150)) for i in range(12)}
    roomy = run(make_engine(tiny_llama, enable_prefix_caching=False, max_num_batched_tokens=512), requests)
    # 48 blocks cannot hold 12 such requests at once (preemption); prompts arrive in 5-token chunks.
    tight = make_engine(tiny_llama, num_kv_blocks=48, max_num_batched_tokens=5)
    outs = run(tight, requests)
    assert tight.scheduler.num_preemptions > 0 and tight.counters.num_prefix_hits > 0
    for request_id, out in outs.items():
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), SMALL)
        assert out.token_ids == roomy[request_id].token_ids, request_id
    assert tight.block_manager.num_free_blocks == tight.block_manager.num_blocks


def test_unconstrained_requests_keep_their_solo_greedy_tokens(tiny_llama):
    plain = {f"u{i}": ([20 + i, 21, 22, 23], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
             for i in range(6)}
    constrained = {f"c{i}": ([20 + i, 21], sampled(GuidedDecoding("json", SCHEMA), seed=i)) for i in range(6)}
    solo = {}
    for request_id, request in plain.items():
        solo |= run(make_engine(tiny_llama), {request_id: request})
    mixed = run(make_engine(tiny_llama), {**constrained, **plain})
    for request_id in plain:
        assert mixed[request_id].token_ids == solo[request_id].token_ids, request_id
    assert all(json.loads(mixed[c].text) for c in constrained)


# -- compiling ----------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, words", [
    (GuidedDecoding("json", {"type": "strang"}, param="response_format"), "Invalid type"),
    (GuidedDecoding("json", {"$ref": "#/$defs/missing"}), "does not exist"),
    (GuidedDecoding("json", {"type": "array", "uniqueItems": True}), "uniqueItems"),   # unenforceable: refused
    (GuidedDecoding("json", {"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
    (GuidedDecoding("regex", "[a-"), "unclosed"),
    (GuidedDecoding("grammar", "start: nothing"), "nothing"),
])
def test_what_does_not_compile_names_the_problem(engine, spec, words):
    with pytest.raises(InvalidGrammar) as raised:
        engine.add_request("bad", [1, 2], SamplingParams(guided_decoding=spec))
    assert raised.value.param == spec.param
    assert words in str(raised.value) and str(raised.value).startswith(spec.param)
    assert "bad" not in engine.requests and not engine.scheduler.waiting


@pytest.mark.parametrize("kind, value", [("xml", "a"), ("regex", 5), ("choice", []), ("choice", ["a", ""]),
                                         ("json", "not a schema")])
def test_malformed_constraints_are_invalid_parameters(kind, value):
    with pytest.raises(InvalidParameter):
        GuidedDecoding(kind, value)


def test_compiled_grammars_are_cached_and_matchers_resync(engine):
    spec = GuidedDecoding("regex", "[0-9]{3}")
    compiled = engine.grammars.compile(spec)
    assert engine.grammars.compile(GuidedDecoding("regex", "[0-9]{3}")) is compiled
    matcher = GrammarMatcher(compiled)
    ids = engine.tokenizer.encode("12", add_special_tokens=False)
    matcher.sync(ids)                                      # rebuilt from tokens it never saw
    assert matcher.num_tokens == len(ids) and not matcher.is_finished
    assert matcher.accept(engine.tokenizer.encode("3", add_special_tokens=False)[0]) and matcher.is_finished


# -- masks and bias in the sampler ----------------------------------------------------------------

def test_bitmask_helpers_agree_with_a_plain_reference():
    vocab = 70
    gen = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, 3), dtype=torch.int32, generator=gen)
    allowed = torch.from_numpy(unpack_bitmask(bitmask, vocab))
    for row in range(2):
        words = [int(w) & 0xFFFFFFFF for w in bitmask[row]]
        assert allowed[row].tolist() == [bool(words[t // 32] >> (t % 32) & 1) for t in range(vocab)]
    disallow(bitmask, 1, [3, 31, 64])
    assert not unpack_bitmask(bitmask, vocab)[1, [3, 31, 64]].any()
    logits = torch.randn(4, vocab, generator=gen)
    masked = apply_bitmask(logits, [2, 0], bitmask)
    after = torch.from_numpy(unpack_bitmask(bitmask, vocab))
    assert torch.equal(masked[1], logits[1]) and torch.equal(masked[3], logits[3])
    for k, row in enumerate([2, 0]):
        expected = torch.where(after[k], logits[row], float("-inf"))
        assert torch.equal(masked[row], expected)


def test_the_mask_comes_before_every_sampling_rule(engine):
    """With top_k 1 the only candidate is the most likely *allowed* token (top-k after the mask)."""
    compiled = engine.grammars.compile(GuidedDecoding("choice", ["b", "c"]))
    matcher = GrammarMatcher(compiled)
    bitmask = fill_bitmask([matcher], engine.grammars.vocab_size)
    vocab = engine.model_config.vocab_size
    allowed = unpack_bitmask(bitmask, vocab)[0].nonzero()[0].tolist()
    logits = torch.zeros(1, vocab)
    logits[0, allowed[0]] = 1.0
    logits[0, 300] = 50.0                                  # the raw favourite is not allowed
    request = SampleRequest(SamplingParams(temperature=1.0, top_k=1, repetition_penalty=1.5, logit_bias={300: 100.0}),
                            [300], [], torch.Generator().manual_seed(0))
    out = Sampler()(logits, [request], TokenMasks([0], bitmask))
    assert out.token_ids == [allowed[0]]
    assert out.logprobs[0] == pytest.approx(float(torch.log_softmax(logits[0], -1)[allowed[0]]))   # the raw model's


def test_logit_bias_bans_and_forces_a_token(engine):
    probe = run(engine, {"p": ([5, 6, 7], SamplingParams(max_tokens=1, temperature=0))})["p"].token_ids[0]
    banned = {f"b{i}": ([5, 6, 7], SamplingParams(max_tokens=1, temperature=1.0, seed=i, logit_bias={probe: -100}))
              for i in range(NUM_SAMPLES)}
    free = {f"f{i}": ([5, 6, 7], SamplingParams(max_tokens=1, temperature=1.0, seed=i)) for i in range(NUM_SAMPLES)}
    forced = {f"x{i}": ([5, 6, 7], SamplingParams(max_tokens=3, temperature=1.0, seed=i, logit_bias={77: 100},
                                                  ignore_eos=True)) for i in range(NUM_SAMPLES)}
    outs = run(engine, {**banned, **free, **forced})
    assert any(outs[f"f{i}"].token_ids == [probe] for i in range(NUM_SAMPLES))       # it is likely unbiased
    assert all(outs[f"b{i}"].token_ids != [probe] for i in range(NUM_SAMPLES))
    assert all(outs[f"x{i}"].token_ids == [77, 77, 77] for i in range(NUM_SAMPLES))


@pytest.mark.parametrize("bias, words", [({-1: 1.0}, "token ids"), ({5: 101.0}, "[-100, 100]"),
                                         ({5: float("nan")}, "[-100, 100]"), ({i: 1.0 for i in range(1025)}, "1024")])
def test_logit_bias_bounds(bias, words):
    with pytest.raises(InvalidParameter) as raised:
        SamplingParams(logit_bias=bias)
    assert raised.value.param == "logit_bias" and words in str(raised.value)


def test_logit_bias_ids_outside_the_vocabulary_name_the_id(engine):
    with pytest.raises(InvalidParameter) as raised:
        engine.add_request("oov", [1, 2], SamplingParams(logit_bias={5: 1.0, 384: -3.0}))
    assert raised.value.param == "logit_bias" and "384" in str(raised.value)


# -- an encoder-decoder (T5) ---------------------------------------------------------------------

def test_an_encoder_decoders_text_follows_its_constraint(tiny_t5_checkpoints):
    """The mask applies to T5's decoder, and its sentencepiece vocabulary ('▁' for a space) is read
    through Tokenizer.token_bytes like any other: the decoded text is what the grammar allowed. The
    text a grammar forces ("he river" after "t") is spelled without the dummy prefix's space.
    (The tiny vocabulary has no '{': it cannot write JSON.)"""
    engine = make_engine(tiny_t5_checkpoints["flan_t5"], num_kv_blocks=512)
    words = r"[a-z]{2,6}( [a-z]{2,6}){0,2}"
    choices = ["yes", "no", "the river", "garden watches"]
    prompt = "the river watches the garden"
    requests = {f"r{i}": (prompt, sampled(GuidedDecoding("regex", words), seed=i, max_tokens=60)) for i in range(20)}
    requests |= {f"c{i}": (prompt, sampled(GuidedDecoding("choice", choices), seed=i)) for i in range(20)}
    outs = run(engine, requests)
    for i in range(20):
        assert re.fullmatch(words, outs[f"r{i}"].text), outs[f"r{i}"].text
        assert outs[f"c{i}"].text in choices
    assert len({outs[f"c{i}"].text for i in range(20)}) >= 2
