"""MoE step time against a dense model with the same active parameters: grouped-expert efficiency.

    python -m benchmarks.moe_step [--batches 1,32] [--repeats 5] [--threads 1] [--json out.json]

Two random-weight checkpoints of one shape are written to a temp dir (config.json, safetensors,
a word-level tokenizer):
  moe     Mixtral-shaped: --experts experts of width --expert-size, each token routed to --top-k
  dense   LLaMA whose MLP is top_k * expert_size wide: the same parameters active per token
          (attention, norms, embeddings identical)
(a) engine: each model served by the engine (float32 on the CPU); B requests decode together
    and the steps in which every sequence decodes and nothing prefills are timed, median per
    run. Runs alternate moe / dense --repeats times; the table gives the median of the runs'
    medians and their spread (min-max).
(b) the FFN alone, on B rows of random hidden states: the MoE block as the engine runs it
    (grouped GEMMs), the same block with its per-expert Python loop (grouped_matmul_loop), its
    dense reference (every expert on every token), and the dense model's MLP. Median of
    --ffn-iters calls per repeat, median over repeats; and the weight bytes each reads per call
    (the experts the batch's tokens were routed to, or all of them for the reference) over that
    time, GB/s.
Both clocks are reported: wall-clock, and the process's CPU time, which time-slicing on a
shared machine does not inflate (with one thread, --threads 1, it is the work itself).
efficiency = dense / moe time: 1.0 means routing costs nothing beyond the active parameters. At
batch 1 a token reads top_k experts, as many weights as the dense MLP; at batch 32 nearly every
expert is active, so a step reads num_experts / top_k times the dense MLP's weights for the same
FLOPs, and on a CPU, where decode is bound by reading weights, the best a MoE can do there is
about top_k / num_experts. The GB/s columns say how close the grouped GEMMs come to the dense
GEMM's rate of reading weights, which is the grouping's own efficiency.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import machine

ATTENTION = dict(hidden_size=768, num_attention_heads=12, num_key_value_heads=4, head_dim=64)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,32", help="decode batch sizes")
    parser.add_argument("--repeats", type=int, default=5, help="alternating runs of each model")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1536, help="each expert's intermediate width")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--decode-steps", type=int, default=24, help="tokens generated per request")
    parser.add_argument("--ffn-iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def hf_configs(args) -> dict[str, dict]:
    common = dict(vocab_size=args.vocab, num_hidden_layers=args.layers, max_position_embeddings=4096,
                  rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1,
                  eos_token_id=2, torch_dtype="float32", **ATTENTION)
    return {
        "moe": dict(common, model_type="mixtral", architectures=["MixtralForCausalLM"],
                    intermediate_size=args.expert_size, num_local_experts=args.experts,
                    num_experts_per_tok=args.top_k),
        "dense": dict(common, model_type="llama", architectures=["LlamaForCausalLM"],
                      intermediate_size=args.top_k * args.expert_size),
    }


def write_checkpoint(config: dict, directory: Path) -> Path:
    """Random weights under transformers' names (experts as its fused pair), std 0.02."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    layer = {"self_attn.q_proj.weight": (q, hidden), "self_attn.k_proj.weight": (kv, hidden),
             "self_attn.v_proj.weight": (kv, hidden), "self_attn.o_proj.weight": (hidden, q),
             "input_layernorm.weight": (hidden,), "post_attention_layernorm.weight": (hidden,)}
    if config["model_type"] == "mixtral":
        experts = config["num_local_experts"]
        layer |= {"mlp.gate.weight": (experts, hidden), "mlp.experts.gate_up_proj": (experts, 2 * inter, hidden),
                  "mlp.experts.down_proj": (experts, hidden, inter)}
    else:
        layer |= {"mlp.gate_proj.weight": (inter, hidden), "mlp.up_proj.weight": (inter, hidden),
                  "mlp.down_proj.weight": (hidden, inter)}
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (config["vocab_size"], hidden)}
    shapes |= {f"model.layers.{i}.{name}": shape for i in range(config["num_hidden_layers"])
               for name, shape in layer.items()}
    generator = torch.Generator().manual_seed(0)
    tensors = {name: torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
               for name, shape in shapes.items()}
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(config["vocab_size"])}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


# -- (a) the engine ---------------------------------------------------------------------------

Runs = dict[str, dict[str, dict[int, list[float]]]]      # clock ("wall" | "cpu") -> row -> batch -> ms


def decode_step_ms(llm, batch: int, args, seed: int) -> tuple[float, float]:
    """(wall, cpu) median ms of the steps in which all `batch` sequences decode, nothing prefills."""
    from engine import SamplingParams
    engine = llm.engine
    generator = torch.Generator().manual_seed(seed)       # distinct prompts: no prefix-cache hits
    prompts = torch.randint(3, engine.model_config.vocab_size, (batch, args.prompt_len), generator=generator)
    params = SamplingParams(max_tokens=args.decode_steps, temperature=0, ignore_eos=True)
    for i, prompt in enumerate(prompts.tolist()):
        engine.add_request(f"{seed}-{i}", prompt, params)
    stats, times = [], []
    engine.step_listeners.append(stats.append)
    while engine.has_unfinished_requests():
        wall, cpu = time.perf_counter(), time.process_time()
        engine.step()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    engine.step_listeners.remove(stats.append)
    decode = [t for s, t in zip(stats, times) if s.num_prefill_tokens == 0 and s.num_seqs == batch]
    return tuple(statistics.median(t[i] for t in decode) * 1e3 for i in (0, 1))


def engine_bench(paths: dict[str, Path], batches: list[int], args) -> Runs:
    from engine import LLM
    llms = {name: LLM(str(path), dtype="float32", max_num_seqs=max(batches), kv_cache_memory="256MiB",
                      num_threads=args.threads)
            for name, path in paths.items()}
    for llm in llms.values():                               # warm up
        decode_step_ms(llm, 2, args, seed=99)
    runs: Runs = {clock: {name: {b: [] for b in batches} for name in llms} for clock in ("wall", "cpu")}
    for repeat in range(args.repeats):
        for batch in batches:
            for name, llm in llms.items():                  # alternate, so drift hits both alike
                wall, cpu = decode_step_ms(llm, batch, args, seed=repeat)
                runs["wall"][name][batch].append(wall)
                runs["cpu"][name][batch].append(cpu)
    return runs


# -- (b) the FFN alone ----------------------------------------------------------------------

def ffn_bench(configs: dict[str, dict], batches: list[int], args) -> tuple[Runs, dict[str, dict[int, int]]]:
    """Times of each FFN variant and the weight bytes each reads per call."""
    from engine.config import ModelConfig
    from engine.layers.moe import grouped_matmul, grouped_matmul_loop
    from engine.models.llama import LlamaMLP
    from engine.models.moe import SparseMoeBlock
    moe_config, dense_config = (ModelConfig.from_hf(configs[name]) for name in ("moe", "dense"))
    torch.manual_seed(0)
    block, mlp = SparseMoeBlock(moe_config), LlamaMLP(dense_config)
    for param in [*block.parameters(), *mlp.parameters()]:
        torch.nn.init.normal_(param, std=0.02)

    def looped(x):
        block.experts.matmul = grouped_matmul_loop
        try:
            return block(x)
        finally:
            block.experts.matmul = grouped_matmul

    def dense_reference(x):
        weights, expert_ids = block.gate(x)
        return block.experts.forward_dense(x, expert_ids, weights)

    variants = {"moe grouped": block, "moe per-expert loop": looped, "moe dense reference": dense_reference,
                "dense mlp": mlp}
    runs: Runs = {clock: {name: {b: [] for b in batches} for name in variants} for clock in ("wall", "cpu")}
    bytes_read: dict[str, dict[int, int]] = {name: {} for name in variants}
    expert_bytes = block.experts.gate_up_proj[0].nbytes + block.experts.down_proj[0].nbytes
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, moe_config.hidden_size)
            active = block.gate(x)[1].unique().numel()
            for name in variants:
                num_experts = {"dense mlp": 0, "moe dense reference": moe_config.num_experts}.get(name, active)
                bytes_read[name][batch] = (num_experts * expert_bytes + block.gate.weight.nbytes if num_experts
                                           else sum(p.nbytes for p in mlp.parameters()))
            for _ in range(args.repeats):
                for name, fn in variants.items():
                    wall, cpu = median_ms(fn, x, args.ffn_iters)
                    runs["wall"][name][batch].append(wall)
                    runs["cpu"][name][batch].append(cpu)
    return runs, bytes_read


def median_ms(fn, x: torch.Tensor, iters: int) -> tuple[float, float]:
    """(wall, cpu) median ms per call."""
    fn(x)
    times = []
    for _ in range(iters):
        wall, cpu = time.perf_counter(), time.process_time()
        fn(x)
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return tuple(statistics.median(t[i] for t in times) * 1e3 for i in (0, 1))


# -- report ---------------------------------------------------------------------------------

def summary(samples: list[float]) -> str:
    return f"{statistics.median(samples):7.2f} ({min(samples):.2f}-{max(samples):.2f})"


def print_table(title: str, runs: dict[str, dict[int, list[float]]], batches: list[int],
                ratio: tuple[str, str]) -> None:
    print(f"\n{title}")
    print(f"  {'':24}" + "".join(f"{f'batch {b}: ms (min-max)':>28}" for b in batches))
    for name, by_batch in runs.items():
        print(f"  {name:24}" + "".join(f"{summary(by_batch[b]):>28}" for b in batches))
    dense, moe = ratio
    cells = [statistics.median(runs[dense][b]) / statistics.median(runs[moe][b]) for b in batches]
    print(f"  {'efficiency dense/moe':24}" + "".join(f"{c:>28.2f}" for c in cells))


def print_bandwidth(runs: dict[str, dict[int, list[float]]], bytes_read: dict[str, dict[int, int]],
                    batches: list[int]) -> None:
    print(f"  {'weights read, GB/s':24}" + "".join(f"{f'batch {b}: MB, GB/s':>28}" for b in batches))
    for name, by_batch in bytes_read.items():
        cells = [f"{by_batch[b] / 1e6:7.1f}, {by_batch[b] / statistics.median(runs[name][b]) / 1e6:5.2f}"
                 for b in batches]
        print(f"  {name:24}" + "".join(f"{c:>28}" for c in cells))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    configs = hf_configs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="moe-step-") as tmp:
        paths = {name: write_checkpoint(config, Path(tmp) / name) for name, config in configs.items()}
        engine = engine_bench(paths, batches, args)
    ffn, bytes_read = ffn_bench(configs, batches, args)
    print(f"machine: {machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after")
    print(f"moe: {args.layers} layers, hidden {ATTENTION['hidden_size']}, {args.experts} experts of "
          f"{args.expert_size}, top-{args.top_k}; dense: MLP of {args.top_k * args.expert_size}; "
          f"float32, {args.repeats} alternating runs")
    for clock, meaning in (("wall", "wall-clock"), ("cpu", "CPU time of the process (all its threads)")):
        print(f"\n== {meaning} ==")
        print_table(f"(a) engine decode step (prompt {args.prompt_len} tokens, {args.decode_steps} steps)",
                    engine[clock], batches, ("dense", "moe"))
        print_table("(b) FFN alone, one layer", ffn[clock], batches, ("dense mlp", "moe grouped"))
        print_bandwidth(ffn[clock], bytes_read, batches)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
                                         "load_average": [load_before[0], os.getloadavg()[0]],
                                         "engine": engine, "ffn": ffn, "ffn_bytes": bytes_read}, indent=1))


if __name__ == "__main__":
    main()
