"""Prompt logprobs equal transformers' teacher-forced log-softmax (fp32, within 1e-4): computed
fresh, when the prompt is in the prefix cache (it is recomputed, never returned missing), across
a chunked prefill, through preemption, and over HTTP (echo + logprobs, TGI's
decoder_input_details, lm-evaluation-harness's loglikelihood)."""
import json
import random

import openai
import pytest
import torch
from conftest import tiny_hf_model
from service_helpers import API_KEY, main_server

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.errors import InvalidParameter
from engine.tokenizer import Tokenizer

TOLERANCE = 1e-4


def make_engine(path, **options) -> LLMEngine:
    defaults = dict(num_kv_blocks=512, block_size=4, max_num_batched_tokens=64, max_num_seqs=16, dtype="float32")
    return LLMEngine(str(path), EngineConfig(**{**defaults, **options}))


def run(engine: LLMEngine, requests: dict[str, tuple]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    finished = {}
    while engine.has_unfinished_requests():
        finished.update((out.request_id, out) for out in engine.step() if out.finished)
    return finished


_references: dict[str, torch.nn.Module] = {}


def reference(family: str, prompt: list[int]) -> torch.Tensor:
    """(len(prompt) - 1, vocab): the log-softmax predicting each prompt token after the first."""
    model = _references.setdefault(family, tiny_hf_model(family))
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def check(out, family: str, top_k: int = 0) -> None:
    prompt = out.prompt_token_ids
    entries = out.prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0] is None
    if len(prompt) == 1:
        return
    expected = reference(family, prompt)
    ours = torch.tensor([e.logprob for e in entries[1:]])
    want = expected.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0]
    assert (ours - want).abs().max() < TOLERANCE
    if top_k:
        values, ids = expected.topk(top_k, dim=-1)
        for entry, value_row, id_row in zip(entries[1:], values, ids):
            assert [i for i, _ in entry.top] == id_row.tolist()
            assert max(abs(v - w) for (_, v), w in zip(entry.top, value_row.tolist())) < TOLERANCE


def prompt_of(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(length)]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_prompt_logprobs_equal_a_teacher_forced_forward(family, tiny_checkpoints):
    engine = make_engine(tiny_checkpoints[family])
    outs = run(engine, {f"p{n}": (prompt_of(n, n), SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
                        for n in (1, 2, 9, 37)})
    for out in outs.values():
        check(out, family, top_k=3)
    assert outs["p1"].prompt_logprobs == [None]


def test_an_encoder_decoder_has_no_prompt_logprobs(tiny_t5_checkpoints):
    """T5 encodes its prompt and never predicts it: asking for its logprobs is refused, not
    answered with nulls."""
    engine = make_engine(tiny_t5_checkpoints["flan_t5"])
    with pytest.raises(InvalidParameter, match="encoder-decoder model encodes the prompt") as refused:
        engine.add_request("t5", [5, 6, 7, 1], SamplingParams(max_tokens=2, prompt_logprobs=0))
    assert refused.value.param == "prompt_logprobs" and not engine.has_unfinished_requests()


def test_a_prefix_cache_hit_is_recomputed_not_returned_missing(tiny_llama):
    engine = make_engine(tiny_llama)
    prompt = prompt_of(1, 30)
    run(engine, {"warm": (prompt, SamplingParams(max_tokens=1, temperature=0))})
    computed, hits = engine.counters.num_prompt_tokens_computed, engine.counters.num_prefix_hits
    out = run(engine, {"asked": (prompt, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0))})["asked"]
    check(out, "llama")
    assert engine.counters.num_prompt_tokens_computed - computed == len(prompt)     # all of it ran again
    assert engine.counters.num_prefix_hits == hits
    run(engine, {"plain": (prompt, SamplingParams(max_tokens=1, temperature=0))})    # the cache still serves others
    assert engine.counters.num_prefix_hits > hits


def test_chunked_prefill_beside_decodes_and_through_preemption(tiny_llama):
    # 5-token steps: every prompt is computed in chunks while the others decode; 20 blocks of 4
    # cannot hold all of them, so some are preempted (mid-prefill or mid-decode) and recomputed.
    engine = make_engine(tiny_llama, max_num_batched_tokens=5, num_kv_blocks=20)
    requests = {f"r{i}": (prompt_of(10 + i, 23 + i), SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                                      prompt_logprobs=2, n=1 + i % 2))
                for i in range(6)}
    outs = run(engine, requests)
    assert engine.scheduler.num_preemptions > 0
    for out in outs.values():
        check(out, "llama", top_k=2)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# -- over HTTP ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request):
    return main_server(request)


def test_completions_echo_logprobs_through_the_openai_sdk(server, tiny_llama):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    prompt = prompt_of(5, 12)
    out = client.completions.create(model=None, prompt=prompt, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = out.choices[0].logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(prompt) + 1
    expected = reference("llama", prompt)
    for i in range(1, len(prompt)):
        assert abs(lp.token_logprobs[i] - float(expected[i - 1, prompt[i]])) < TOLERANCE
        assert len(lp.top_logprobs[i]) <= 2
        assert max(lp.top_logprobs[i].values()) == pytest.approx(float(expected[i - 1].max()), abs=TOLERANCE)
    # Streamed: the echo chunk carries the same logprobs, before the generated token's.
    chunks = list(client.completions.create(model=None, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                            logprobs=2, stream=True))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert streamed[0].token_logprobs == lp.token_logprobs[:len(prompt)]
    assert streamed[1].token_logprobs == lp.token_logprobs[len(prompt):]


def test_tgi_decoder_input_details_fill_the_prefill(server):
    from text_generation import Client
    client = Client(server.url, headers={"Authorization": f"Bearer {API_KEY}"})
    text = "The cat sat on the mat."
    response = client.generate(text, max_new_tokens=2, decoder_input_details=True)
    prefill = response.details.prefill
    ids = [t.id for t in prefill]
    assert prefill[0].logprob is None and all(t.logprob is not None and t.logprob <= 0 for t in prefill[1:])
    expected = reference("llama", ids)
    assert max(abs(t.logprob - float(expected[i, t.id])) for i, t in enumerate(prefill[1:])) < TOLERANCE
    # Without decoder_input_details nothing is computed for the prompt.
    assert server.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": 1, "details": True}}
                       ).json()["details"]["prefill"] == []


def test_lm_eval_loglikelihood_task_runs_to_completion(server, tiny_llama, tmp_path):
    """lm-evaluation-harness's local-completions model, a multiple-choice task on three documents
    written here: 12-35 s on the 2-core test machine shared with other jobs (importing lm_eval and
    datasets alone ~6 s). A fast test, not a slow one: lm-eval is in the test extra."""
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager
    docs = [{"question": "The cat sat on the", "choices": [" mat", " log", " moon"], "answer": 0},
            {"question": "Paged attention keeps keys and values in", "choices": [" blocks", " jars"], "answer": 0},
            {"question": "def add(a, b): return a", "choices": [" + b", " - b"], "answer": 0}]
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (tmp_path / "tiny_task.yaml").write_text(f"""task: attnserve_tiny
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "docs.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    import os
    os.environ["OPENAI_API_KEY"] = API_KEY
    results = lm_eval.simple_evaluate(
        model="local-completions",
        model_args=f"base_url={server.url}/v1/completions,model=tiny,tokenizer_backend=huggingface,"
                   f"tokenizer={tiny_llama},num_concurrent=1,max_retries=1,tokenized_requests=True",
        tasks=["attnserve_tiny"], task_manager=TaskManager(include_path=str(tmp_path)), log_samples=True)
    samples = results["samples"]["attnserve_tiny"]
    assert len(samples) == 3
    tokenizer = Tokenizer.from_dir(tiny_llama)
    for sample in samples:                 # every choice scored: the reference model's loglikelihood
        assert len(sample["resps"]) == len(sample["doc"]["choices"])
        for (context, continuation), resp in zip(sample["arguments"], sample["resps"]):
            context_ids = tokenizer.encode(context, add_special_tokens=False)
            whole = tokenizer.encode(context + continuation, add_special_tokens=False)
            expected = reference("llama", whole)
            loglikelihood = sum(float(expected[i - 1, whole[i]]) for i in range(len(context_ids), len(whole)))
            assert resp[0][0] == pytest.approx(loglikelihood, abs=1e-3)
    assert 0.0 <= results["results"]["attnserve_tiny"]["acc,none"] <= 1.0
