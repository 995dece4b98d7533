"""Where a decode step's time goes: ms per step at a fixed batch, by phase, and the top operators.

    python -m benchmarks.decode_step --batch 1 [--dtype float32] [--quantization auto|none|int8|int4]
                                     [--prompt-len 256] [--threads N] [--python-layers]

B requests of the same prompt (--prompt-len tokens of the bundled text; default a short sentence)
decode together (greedy, EOS ignored); after a warm-up, --steps engine steps are timed with
each phase of the step timed on its own (schedule, inputs and metadata, model forward, LM head,
sampler, postprocess: tokens, detokenizer, stop checks), then 10 more run under torch's
profiler, whose table of operators by self CPU time is printed. This is the profile behind
BENCHMARKS.md's analysis.
"""
from __future__ import annotations

import argparse
import functools
import time
from collections import defaultdict

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
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--python-layers", action="store_true",
                        help="run the decoder layers as Python modules, not the C++ stack (A/B)")
    args = parser.parse_args(argv)
    engine = LLM(args.model, dtype=args.dtype, quantization=args.quantization, kv_cache_memory="512MiB",
                 max_num_seqs=max(args.batch, 1), num_threads=args.threads).engine
    decoder = getattr(engine.runner.model, "model", None)
    if args.python_layers and getattr(decoder, "fused_layers", None) is not None:
        decoder.fused_layers = None
    prompt = (engine.tokenizer.encode(PROMPT) if args.prompt_len is None
              else prompts_of_lengths(engine.tokenizer, [args.prompt_len])[0])
    for i in range(args.batch):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=args.steps + 30, temperature=0, ignore_eos=True))
    for _ in range(5):                        # prefill, then warm decode steps
        engine.step()
    phases = time_phases(engine)
    started = time.perf_counter()
    for _ in range(args.steps):
        engine.step()
    step_s = (time.perf_counter() - started) / args.steps
    print(f"machine: {machine()}")
    print(f"{args.model} {str(engine.dtype).removeprefix('torch.')} "
          f"({engine.quantization_summary}), batch {args.batch}: "
          f"{step_s * 1e3:.1f} ms/step, {args.batch / step_s:.1f} tok/s")
    accounted = 0.0
    for name, seconds in phases.items():
        per_step = seconds / args.steps
        accounted += per_step
        print(f"  {name:<22} {per_step * 1e3:8.2f} ms  {100 * per_step / step_s:5.1f}%")
    print(f"  {'the rest':<22} {(step_s - accounted) * 1e3:8.2f} ms  {100 * (1 - accounted / step_s):5.1f}%")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            engine.step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))


def time_phases(engine) -> dict[str, float]:
    """Wraps each phase of engine.step() with a timer; returns the running totals (seconds)."""
    totals: dict[str, float] = defaultdict(float)

    def timed(owner, attribute: str, name: str) -> None:
        inner = getattr(owner, attribute)

        @functools.wraps(inner)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                totals[name] += time.perf_counter() - started
        setattr(owner, attribute, wrapper)

    runner, model = engine.runner, engine.runner.model
    timed(engine.scheduler, "schedule", "schedule")
    timed(runner, "prepare_inputs", "inputs + metadata")
    timed(model, "forward", "model forward")
    timed(model, "compute_logits", "LM head")
    timed(engine, "sampler", "sampler")
    timed(engine, "_process", "postprocess")
    timed(engine.scheduler, "after_step", "after step")
    timed(engine, "_collect_outputs", "outputs")
    return totals


if __name__ == "__main__":
    main()
