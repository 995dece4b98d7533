"""Where a decode step's time goes: ms per step at a fixed batch, and the top operators.

    python -m benchmarks.decode_step --batch 1 [--dtype float32] [--quantization auto|none|int8|int4] [--prompt-len 256]

B requests of the same prompt (--prompt-len tokens of the bundled text; default a short sentence)
decode together (greedy, EOS ignored); after a warm-up,
--steps engine steps are timed, then 10 more run under torch's profiler, whose table of
operators by self CPU time is printed. This is the profile behind BENCHMARKS.md's analysis.
"""
from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

from benchmarks.common import machine, prompts_of_lengths
from engine import LLM, SamplingParams

PROMPT = "The history of the city begins in the early days of the republic, when"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--quantization", default="auto")
    parser.add_argument("--prompt-len", type=int, default=None, help="tokens of context per sequence")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    engine = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory="512MiB",
                 max_num_seqs=max(args.batch, 1)).engine
    prompt = (engine.tokenizer.encode(PROMPT) if args.prompt_len is None
              else prompts_of_lengths(engine.tokenizer, [args.prompt_len])[0])
    for i in range(args.batch):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=args.steps + 30, temperature=0, ignore_eos=True))
    for _ in range(5):                        # prefill, then warm decode steps
        engine.step()
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_s = (time.perf_counter() - started) / args.steps
    print(f"machine: {machine()}")
    print(f"{args.model} {str(engine.dtype).removeprefix('torch.')} "
          f"({engine.quantization_summary}), batch {args.batch}: "
          f"{step_s * 1e3:.1f} ms/step, {args.batch / step_s:.1f} tok/s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


if __name__ == "__main__":
    main()
