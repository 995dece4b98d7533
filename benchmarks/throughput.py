"""Offline generation throughput: attnserve's LLM.generate against Hugging Face transformers
`generate()` on the same model, in the same run.

    python -m benchmarks.throughput --num-prompts 64 --output-len 128

Prompts are 64-256 tokens cut from the bundled text, greedy, every request generating exactly
output-len tokens (EOS ignored on both sides). transformers runs one request at a time on the
first --hf-single prompts, and statically batched (left-padded) --hf-batch at a time.
Prints output tokens/s for each and the ratios, and checks that the engine's batched greedy
output equals its own one-request-at-a-time output.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from benchmarks.common import machine, prompts_of_lengths
from engine import LLM, SamplingParams
from engine.loader import resolve_model_path


def run_ours(llm: LLM, prompts, output_len: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0))      # warm up
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.token_ids) == output_len for o in outputs)
    return len(prompts) * output_len / elapsed, [o.token_ids for o in outputs]


def load_reference(model: str):
    from transformers import AutoModelForCausalLM
    path = resolve_model_path(model)
    if path.is_file():
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                    dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.inference_mode()
def run_reference(model, prompts, output_len: int, batch_size: int) -> float:
    """transformers generate() on batches of `batch_size` left-padded prompts; output tokens/s."""
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    started = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i: i + batch_size]
        longest = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in batch])
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=output_len,
                       min_new_tokens=output_len, do_sample=False, pad_token_id=pad)
    return len(prompts) * output_len / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-single", type=int, default=4, help="prompts run one at a time by transformers")
    parser.add_argument("--hf-batch", type=int, default=32, help="static batch size for transformers")
    parser.add_argument("--check", type=int, default=8, help="prompts re-run alone to check identical output")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    llm = LLM(args.model, max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens)
    rng = random.Random(0)
    lengths = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_prompts)]
    prompts = prompts_of_lengths(llm.tokenizer, lengths)

    ours, batched_ids = run_ours(llm, prompts, args.output_len)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], params)[0].token_ids for p in prompts[: args.check]]
    identical = alone == batched_ids[: args.check]

    reference = load_reference(args.model)
    hf_single = run_reference(reference, prompts[: args.hf_single], args.output_len, 1)
    hf_batch = run_reference(reference, prompts[: args.hf_batch], args.output_len, args.hf_batch)

    results = {
        "machine": machine(), "model": args.model, "num_prompts": args.num_prompts,
        "prompt_lens": f"{args.min_len}-{args.max_len}", "output_len": args.output_len,
        "attnserve_tok_s": round(ours, 1), "hf_single_tok_s": round(hf_single, 1),
        f"hf_batch{args.hf_batch}_tok_s": round(hf_batch, 1),
        "ratio_vs_hf_single": round(ours / hf_single, 2),
        f"ratio_vs_hf_batch{args.hf_batch}": round(ours / hf_batch, 2),
        "greedy_identical_to_single_request_runs": identical,
    }
    print(f"machine: {results['machine']}")
    print(f"{'system':<36}{'output tok/s':>14}{'attnserve ratio':>18}")
    print(f"{'attnserve LLM.generate':<36}{ours:>14.1f}{'':>18}")
    print(f"{'transformers generate, 1 at a time':<36}{hf_single:>14.1f}{ours / hf_single:>17.2f}x")
    print(f"{f'transformers generate, batch {args.hf_batch}':<36}{hf_batch:>14.1f}{ours / hf_batch:>17.2f}x")
    print(f"greedy output identical to single-request runs ({args.check} checked): {identical}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
