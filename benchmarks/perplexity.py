"""Perplexity of a generation model on the bundled text: fp32, bf16, and int8 weights.

    python -m benchmarks.perplexity [--model smollm2-135m-instruct] [--window 256]

The bundled text is loadtests/prompts.txt, read as one document; it is scored in windows of
--window tokens (each window's first token is context only). `--quantization int8` must stay
within 2% of fp32's perplexity (README, BENCHMARKS.md); tests/test_quantization.py runs this.
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
from engine.quantization import quantize_int8

MAX_INCREASE = 0.02


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


def compare(model_name: str, window: int) -> dict:
    """fp32 and int8 perplexity of one model on the bundled text."""
    checkpoint = open_checkpoint(model_name)
    token_ids = load_tokenizer(checkpoint).encode("\n\n".join(prompt_texts()), add_special_tokens=False)
    cpu = torch.device("cpu")
    fp32 = perplexity(build_model(checkpoint, torch.float32, cpu), token_ids, window)
    bf16 = perplexity(build_model(checkpoint, torch.bfloat16, cpu), token_ids, window)
    int8_model = quantize_int8(build_model(checkpoint, torch.bfloat16, cpu), cpu, torch.bfloat16)
    int8 = perplexity(int8_model, token_ids, window)
    return {"model": model_name, "tokens": len(token_ids), "window": window, "fp32": fp32, "bf16": bf16,
            "int8": int8, "increase": int8 / fp32 - 1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--window", type=int, default=256)
    args = parser.parse_args(argv)
    result = compare(args.model, args.window)
    print(f"machine: {machine()}")
    print(f"{result['model']}: {result['tokens']} tokens in windows of {result['window']}")
    print(f"perplexity fp32 {result['fp32']:.3f}, bf16 {result['bf16']:.3f} "
          f"({result['bf16'] / result['fp32'] - 1:+.2%}), int8 {result['int8']:.3f} "
          f"({result['increase']:+.2%}; limit +{MAX_INCREASE:.0%})")
    return 0 if result["increase"] <= MAX_INCREASE else 1


if __name__ == "__main__":
    sys.exit(main())
