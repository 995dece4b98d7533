"""The real default generation model, SmolLM2-135M-Instruct from its GGUF file, against
transformers loading the very same file (both dequantized to float32: quantization="none";
tests/test_quantized_linear.py holds the default, quantized engine to this one)."""
import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.attention import build_attn_metadata
from engine.loader import resolve_model_path

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def llm():
    return LLM("smollm2-135m-instruct", num_kv_blocks=256, quantization="none")


def test_greedy_continuations_equal_transformers_for_32_tokens(llm, reference):
    tokenizer, model = reference
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        assert llm.tokenizer.encode(prompt) == ids
        expected = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                  eos_token_id=None)[0, len(ids):].tolist()
        ours = llm.generate([prompt], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
        assert ours.token_ids == expected, prompt
        assert ours.text == tokenizer.decode(expected, skip_special_tokens=True)


def test_logits_equal_transformers_within_1e3(llm, reference):
    tokenizer, model = reference
    runner_model = llm.engine.runner.model
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        n = len(ids)
        with torch.inference_mode():
            ours = runner_model.compute_logits(runner_model(
                torch.tensor(ids), torch.arange(n), build_attn_metadata([n], [n], None, 1)))
            expected = model(torch.tensor([ids])).logits[0]
        assert (ours - expected).abs().max() < 1e-3


def test_chat_answers_sensibly(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=32, temperature=0))[0]
    assert "Paris" in out.text and out.finish_reason == "stop"
