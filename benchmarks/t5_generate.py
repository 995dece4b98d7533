"""T5 generation: attnserve against transformers' generate(), one at a time and in a batch.

    python -m benchmarks.t5_generate [--requests 16] [--new-tokens 64] [--repeats 3]
                                     [--threads 1] [--preset flan-t5-small] [--json out.json]

A random-weight checkpoint of a real T5's shape (--preset: flan-t5-small, gated-GELU with its
own head; or t5-small, ReLU with the tied head) is written to a temp dir with a spiece.model
trained on the bundled prompts (loadtests/prompts.txt); the --requests inputs are cut from
that text, 32 to --max-input tokens long (seeded), each ending in </s>. Every system generates --new-tokens
greedy tokens per input, EOS ignored, float32 on the CPU:

    attnserve batched       LLM.generate(all inputs): continuous batching, the encoder run once
                            per request, batched with the others'
    attnserve one at a time LLM.generate(one input) per input
    transformers batched    generate() on all inputs at once, right-padded, attention-masked
    transformers one by one generate() per input

Systems alternate within each of --repeats runs; tokens/s is generated tokens over the time,
median of the runs with its spread (min-max). Both clocks are reported: wall-clock, and the
process's CPU time, which time-slicing on a shared machine does not inflate (with one thread,
--threads 1, it is the work itself). The greedy tokens of attnserve's batched run are compared
with transformers' one-at-a-time generate() (the oracle), request by request.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine, prompt_texts, prompts_of_lengths

PRESETS = {   # the shapes of google/flan-t5-small and google-t5/t5-small
    "flan-t5-small": dict(d_model=512, d_kv=64, d_ff=1024, num_layers=8, num_heads=6,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False),
    "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8,
                     feed_forward_proj="relu", tie_word_embeddings=True),
}
SYSTEMS = ("attnserve batched", "attnserve one at a time", "transformers batched", "transformers one at a time")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="flan-t5-small")
    parser.add_argument("--requests", type=int, default=16, help="inputs (the batch size of the batched runs)")
    parser.add_argument("--new-tokens", type=int, default=64, help="greedy tokens generated per input")
    parser.add_argument("--max-input", type=int, default=128, help="input tokens at most")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def write_checkpoint(preset: str, directory: Path) -> Path:
    """transformers' own T5 with random weights, saved with a trained spiece.model."""
    import sentencepiece
    import transformers
    config = transformers.T5Config(vocab_size=32128, decoder_start_token_id=0, **PRESETS[preset])
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config)
    if not PRESETS[preset]["tie_word_embeddings"]:     # transformers 5 ties it regardless: untie
        model.lm_head.weight = torch.nn.Parameter(0.05 * torch.randn_like(model.shared.weight))
    model.save_pretrained(directory)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(prompt_texts()), model_prefix=str(directory / "spiece"), model_type="unigram",
        vocab_size=2000, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    (directory / "tokenizer_config.json").write_text(json.dumps({"extra_ids": 100}))
    return directory


def inputs(tokenizer, count: int, max_len: int) -> list[list[int]]:
    """count inputs of 32 to max_len tokens (seeded), cut from the bundled text, each ending
    in </s> as T5's tokenizer ends them."""
    rng = random.Random(0)
    lengths = [rng.randrange(min(32, max_len), max_len) for _ in range(count)]
    return [ids + [tokenizer.eos_token_id] for ids in prompts_of_lengths(tokenizer, lengths)]


def timed(fn) -> tuple[object, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def run_systems(llm, hf_model, prompts, new_tokens: int) -> dict[str, tuple[list[list[int]], float, float]]:
    from engine import SamplingParams
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    hf_kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                     eos_token_id=None, pad_token_id=0)

    def ours_batched():
        return [out.token_ids for out in llm.generate(prompts, params)]

    def ours_alone():
        return [llm.generate([p], params)[0].token_ids for p in prompts]

    def hf_batched():
        longest = max(len(p) for p in prompts)
        ids = torch.tensor([p + [0] * (longest - len(p)) for p in prompts])
        mask = torch.tensor([[1] * len(p) + [0] * (longest - len(p)) for p in prompts])
        with torch.no_grad():
            return hf_model.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)[:, 1:].tolist()

    def hf_alone():
        with torch.no_grad():
            return [hf_model.generate(torch.tensor([p]), **hf_kwargs)[0, 1:].tolist() for p in prompts]

    fns = dict(zip(SYSTEMS, (ours_batched, ours_alone, hf_batched, hf_alone)))
    return {name: timed(fn) for name, fn in fns.items()}


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} ({min(values):.1f}-{max(values):.1f})"


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from engine.llm_engine import LLM
    with tempfile.TemporaryDirectory() as tmp:
        path = write_checkpoint(args.preset, Path(tmp))
        llm = LLM(str(path), max_num_seqs=max(args.requests, 1), kv_cache_memory="1GiB",
                  num_threads=args.threads)
        hf_model = transformers.T5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        prompts = inputs(llm.tokenizer, args.requests, args.max_input)
        generated = args.requests * args.new_tokens
        runs: dict[str, dict[str, list[float]]] = {s: {"wall": [], "cpu": []} for s in SYSTEMS}
        agree = None
        run_systems(llm, hf_model, prompts[:2], 4)                   # warm both up
        for repeat in range(args.repeats):
            results = run_systems(llm, hf_model, prompts, args.new_tokens)
            for name, (_, wall, cpu) in results.items():
                runs[name]["wall"].append(generated / wall)
                runs[name]["cpu"].append(generated / cpu)
            ours, oracle = results["attnserve batched"][0], results["transformers one at a time"][0]
            agree = sum(a == b for a, b in zip(ours, oracle))
            print(f"run {repeat + 1}: " + ", ".join(f"{n} {generated / r[1]:.1f} tok/s" for n, r in results.items()),
                  flush=True)
    lengths = [len(p) for p in prompts]
    report = {
        "machine": machine(), "preset": args.preset, "threads": args.threads or torch.get_num_threads(),
        "requests": args.requests, "new_tokens": args.new_tokens,
        "input_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)},
        "tokens_per_s": runs, "greedy_equal_to_transformers": f"{agree}/{args.requests}",
    }
    print(f"\n{report['machine']}; {args.preset} shape, random weights, float32, "
          f"{report['threads']} thread(s); {args.requests} inputs of {min(lengths)}-{max(lengths)} tokens "
          f"(median {statistics.median(lengths):g}), {args.new_tokens} new tokens each; {args.repeats} runs\n")
    print("| system | tok/s, wall-clock | tok/s, CPU time |\n|---|---:|---:|")
    for name in SYSTEMS:
        print(f"| {name} | {spread(runs[name]['wall'])} | {spread(runs[name]['cpu'])} |")
    for clock in ("wall", "cpu"):
        ours = statistics.median(runs["attnserve batched"][clock])
        print(f"ratio ({clock}): attnserve batched / transformers one at a time "
              f"{ours / statistics.median(runs['transformers one at a time'][clock]):.2f}x, "
              f"/ transformers batched {ours / statistics.median(runs['transformers batched'][clock]):.2f}x")
    print(f"greedy tokens equal to transformers' (one at a time): {report['greedy_equal_to_transformers']}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
