"""Perplexity of a generation model on the bundled text under every quantization mode.

    python -m benchmarks.perplexity [--model smollm2-135m-instruct] [--window 256]
                                    [--modes none,auto,int8,int4]

The bundled text is loadtests/prompts.txt, read as one document; it is scored in windows of
--window tokens (each window's first token is context only). Each mode is built the way the
engine builds it (engine/quantization.py) with float32 activations; "none" is the reference the
others are compared with. The default mode must stay within 1% of it (either way) and int8 /
int4 within 2% (tests/test_quantized_linear.py, tests/test_quantization.py run this). For a
GGUF, llama.cpp's own score on the same file, ids and windows is printed beside them when
llama-cpp-python is installed (`pip install -e '.[bench]'`).
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F

from benchmarks.common import machine, prompt_texts
from engine.layers.attention import build_attn_metadata
from engine.loader import build_model, load_tokenizer, open_checkpoint
from engine.quantization import plan_quantization, quantize_model, summarize

MAX_INCREASE = {"auto": 0.01, "int8": 0.02, "int4": 0.02}


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int) -> float:
    """exp(mean negative log-likelihood) of every token but each window's first."""
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = token_ids[start: start + window]
        if len(ids) < 2:
            break
        meta = build_attn_metadata([len(ids)], [len(ids)], None, 1)
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), meta)
        logits = model.compute_logits(hidden[:-1]).float()
        nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def build(checkpoint, mode: str):
    """The model the engine runs for `mode`, and its quantization summary."""
    cpu = torch.device("cpu")
    plan = plan_quantization(mode, checkpoint, cpu)
    model = quantize_model(build_model(checkpoint, torch.float32, cpu, plan.gguf_kernels), plan)
    return model, summarize(model, plan)


def llamacpp_perplexity(path: str, token_ids: list[int], window: int) -> float:
    """The same score from llama.cpp (llama-cpp-python) on the same file, ids and windows."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=window, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for start in range(0, len(token_ids) - 1, window):
        ids = token_ids[start: start + window]
        if len(ids) < 2:
            break
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(ids) - 1], dtype=np.float32))
        nll += F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item()
        count += len(ids) - 1
    return math.exp(nll / count)


def compare(model_name: str, window: int, modes=("none", "auto", "int8", "int4"), llamacpp: bool = False) -> dict:
    """{mode: {perplexity, increase over "none", summary}} on the bundled text."""
    checkpoint = open_checkpoint(model_name)
    token_ids = load_tokenizer(checkpoint).encode("\n\n".join(prompt_texts()), add_special_tokens=False)
    results = {}
    for mode in ("none", *[m for m in modes if m != "none"]):
        model, summary = build(checkpoint, mode)
        results[mode] = {"perplexity": perplexity(model, token_ids, window), "summary": str(summary)}
        del model
    if llamacpp and checkpoint.is_gguf and _has_llamacpp():
        results["llama.cpp"] = {"perplexity": llamacpp_perplexity(str(checkpoint.path), token_ids, window),
                                "summary": "llama.cpp (llama-cpp-python) on the same GGUF file"}
    for result in results.values():
        result["increase"] = result["perplexity"] / results["none"]["perplexity"] - 1
    return {"model": model_name, "tokens": len(token_ids), "window": window, "modes": results}


def _has_llamacpp() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--modes", default="none,auto,int8,int4")
    args = parser.parse_args(argv)
    result = compare(args.model, args.window, tuple(args.modes.split(",")), llamacpp=True)
    print(f"machine: {machine()}")
    print(f"{result['model']}: {result['tokens']} tokens in windows of {result['window']}")
    failed = False
    for mode, r in result["modes"].items():
        limit = MAX_INCREASE.get(mode)
        failed |= limit is not None and abs(r["increase"]) > limit
        bound = f" (limit ±{limit:.0%})" if limit is not None else ""
        print(f"  {mode:9} perplexity {r['perplexity']:8.4f}  {r['increase']:+7.2%}{bound}  {r['summary']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
