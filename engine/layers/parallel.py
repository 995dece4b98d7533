"""Tensor parallelism applied to a model from outside (Megatron-style, as gpt-fast applies it).

A rank builds the model with its own sizes (`TensorShard.local_config`: heads, KV heads, MLP
width and vocabulary divided by the number of ranks), so each split projection is a plain
linear layer of the shard's shape, and every checkpoint tensor is cut to the rank's part as it
is read (`TensorShard.tensors`): no rank ever holds the whole model. How each module splits is
declared next to the model (`tensor_parallel`, by module name; `partial_sums`):

    heads, columns   q_proj, gate/up (GPT-2 c_fc): output features split, whole heads per rank
    kv_heads         k_proj, v_proj: whole KV heads; with fewer KV heads than ranks each rank
                     holds the one its query heads read (rank r: head r * num_kv_heads // n)
    qkv              GPT-2's fused c_attn: each of q, k, v split by heads
    rows             o_proj, down_proj (GPT-2 c_proj): input features split; bias on rank 0 only
    vocab            embedding and LM head rows; the vocabulary padded to a multiple of n
    experts          MoE experts: whole experts per rank (expert parallelism)

One decoder layer on rank r of n:

    x ─┬─ qkv_r ── attention over heads_r ── o_proj_r ──▶ all-reduce (sum) ──▶ + x = h
       └──────────────────────────────────────────────────────────────────────┘
    h ─┬─ gate_up_r ── act ── down_proj_r ──▶ all-reduce (sum) ──▶ + h
       └───────────────────────────────────────────────────────┘

The modules `partial_sums` matches (attention, MLP, MoE block) return partial sums, each
all-reduced by a forward hook; the embedding looks up its own rows (the others read as zero)
and is all-reduced too. The LM head's logits stay split by vocabulary; the runner gathers them
on rank 0 (engine/parallel_runner.py). Quantized blocks (GGUF Q4_0 / Q4_1 / Q8_0) are cut by rows,
or by columns at multiples of 32; a cut inside a block dequantizes that tensor.
"""
from __future__ import annotations

import re
from dataclasses import replace
from typing import Iterable, Iterator, Protocol

import torch
from torch import nn

from engine.config import ModelConfig
from engine.kv_cache import ceil_div
from engine.layers.moe import GroupedExperts
from engine.layers.quant_blocks import BLOCK, BlockRows

Tensor = torch.Tensor | BlockRows


class Collective(Protocol):
    """What the shard's layers need of the ranks: a sum over them, in place."""

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...


def tensor_parallel_misfits(config: ModelConfig, size: int) -> list[str]:
    """What keeps `size` ranks from splitting this model (empty: it splits)."""
    misfits = []
    if config.num_heads % size:
        misfits.append(f"{config.num_heads} attention heads")
    if config.num_kv_heads % size and size % config.num_kv_heads:
        misfits.append(f"{config.num_kv_heads} KV heads")
    if _has_dense_mlp(config) and config.intermediate_size % size:
        misfits.append(f"MLP width {config.intermediate_size}")
    if config.shared_expert_intermediate_size % size:
        misfits.append(f"shared expert width {config.shared_expert_intermediate_size}")
    if config.num_experts % size:
        misfits.append(f"{config.num_experts} experts")
    return misfits


def check_tensor_parallel_size(config: ModelConfig, size: int) -> None:
    """Refuse a size the model does not split into, naming the sizes that do."""
    if config.is_encoder_decoder and size > 1:
        raise ValueError(f"tensor parallelism is not supported for encoder-decoder models "
                         f"({config.architecture}); serve it with tensor_parallel_size 1")
    misfits = tensor_parallel_misfits(config, size)
    if misfits:
        sizes = [n for n in range(1, config.num_heads + 1) if not tensor_parallel_misfits(config, n)]
        raise ValueError(f"tensor_parallel_size {size} does not divide {config.architecture}'s "
                         f"{', '.join(misfits)}; sizes that work: {', '.join(map(str, sizes))}")


def _has_dense_mlp(config: ModelConfig) -> bool:
    return config.family != "moe" or bool(config.dense_layers)


class TensorShard:
    """Rank `rank` of `size`: its sizes, its slice of each checkpoint tensor, and the hooks that
    sum partial outputs over the ranks through `collective`."""

    def __init__(self, config: ModelConfig, rank: int, size: int, collective: Collective):
        check_tensor_parallel_size(config, size)
        self.config, self.rank, self.size, self.collective = config, rank, size, collective
        kv = config.num_kv_heads
        self.local_config = replace(
            config, num_heads=config.num_heads // size, num_kv_heads=max(1, kv // size),
            vocab_size=ceil_div(config.vocab_size, size),
            intermediate_size=config.intermediate_size // size if _has_dense_mlp(config)
            else config.intermediate_size,
            shared_expert_intermediate_size=config.shared_expert_intermediate_size // size)
        first_kv = rank * (kv // size) if kv >= size else rank * kv // size
        self.kv_heads = range(first_kv, first_kv + self.local_config.num_kv_heads)

    # -- building (on the meta device, before any weight is read) ---------------------------

    def prepare(self, model: nn.Module) -> None:
        """Swap the modules that work across ranks: experts held per rank, QK-norms over all heads."""
        rules = model.tensor_parallel
        for name, module in list(model.named_modules()):
            rule = rules.get(name.rpartition(".")[2])
            if rule == "experts" and isinstance(module, GroupedExperts):
                _set_module(model, name, LocalExperts.part_of(module, self.rank, self.size))
            elif rule in ("heads", "kv_heads") and _is_norm(module):
                _set_module(model, name, ShardedRMSNorm(module.weight.shape[0], self.size, module.eps,
                                                        self.collective))

    # -- loading ---------------------------------------------------------------------------

    def tensors(self, model: nn.Module, tensors: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        """The checkpoint's (name, tensor) stream, each tensor cut to this rank's part."""
        experts = {name: m for name, m in model.named_modules() if isinstance(m, LocalExperts)}
        for checkpoint_name, tensor in tensors:
            name = model.checkpoint_name(checkpoint_name)
            if name is None:
                continue
            owner = _owner(experts, name)
            if owner is not None:
                piece = experts[owner].cut(checkpoint_name, name[len(owner) + 1:], tensor)
                if piece is not None:
                    yield piece
                continue
            module_name, _, param = name.rpartition(".")
            rule = model.tensor_parallel.get(module_name.rpartition(".")[2])
            yield checkpoint_name, self._cut(rule, param, tensor, name.endswith(model.transposed_weights))

    def _cut(self, rule: str | None, param: str, tensor: Tensor, transposed: bool) -> Tensor:
        if rule is None:
            return tensor                                   # replicated: norms, router, positions
        out_axis = 1 if transposed and tensor.dim() == 2 else 0
        if rule in ("heads", "columns"):
            return _part(tensor, out_axis, self.rank, self.size)
        if rule == "kv_heads":
            head_dim = self.config.head_dim
            return _narrow(tensor, out_axis, self.kv_heads.start * head_dim, len(self.kv_heads) * head_dim)
        if rule == "qkv":
            q, k, v = (_narrow(tensor, out_axis, i * tensor.shape[out_axis] // 3, tensor.shape[out_axis] // 3)
                       for i in range(3))
            return _cat([_part(t, out_axis, self.rank, self.size) for t in (q, k, v)], out_axis)
        if rule == "rows":
            if param == "bias":                             # added once, by rank 0's partial sum
                return tensor if self.rank == 0 else torch.zeros_like(tensor)
            return _part(tensor, 1 - out_axis, self.rank, self.size)
        if rule == "vocab":
            rows = self.local_config.vocab_size
            start = self.rank * rows
            piece = _narrow(tensor, 0, start, max(0, min(rows, self.config.vocab_size - start)))
            return _pad_rows(piece, rows)
        raise ValueError(f"unknown tensor-parallel rule {rule!r}")

    # -- running ---------------------------------------------------------------------------

    def attach(self, model: nn.Module) -> None:
        """Register the all-reduces: after each `partial_sums` module and the embedding. Call it
        once the model is final (after quantization swaps its modules)."""
        pattern = re.compile(model.partial_sums)
        for name, module in model.named_modules():
            if pattern.search(name):
                module.register_forward_hook(self._sum_outputs)
        rows = self.local_config.vocab_size
        start = self.rank * rows
        outside: list[torch.Tensor] = []             # the ids of the running lookup not ours

        def own_rows(module, args):
            ids = args[0] - start
            outside.append((ids < 0) | (ids >= rows))
            return (ids.masked_fill(outside[-1], 0), *args[1:])

        def sum_rows(module, args, out):
            return self.collective.all_reduce(out.masked_fill(outside.pop()[..., None], 0))

        embedding = model.get_input_embeddings()
        embedding.register_forward_pre_hook(own_rows)
        embedding.register_forward_hook(sum_rows)

    def _sum_outputs(self, module, args, out: torch.Tensor) -> torch.Tensor:
        return self.collective.all_reduce(out)


class LocalExperts(GroupedExperts):
    """This rank's experts, `first_expert` onwards, of a layer's `num_experts_total`: each token
    runs those of its top-k that live here, router-weighted; the rest add zero, and the ranks'
    outputs are summed by the MoE block's all-reduce."""

    def __init__(self, num_experts_total: int, first_expert: int, num_experts: int,
                 hidden_size: int, intermediate_size: int, act):
        super().__init__(num_experts, hidden_size, intermediate_size, act)
        self.num_experts_total, self.first_expert = num_experts_total, first_expert

    @classmethod
    def part_of(cls, experts: GroupedExperts, rank: int, size: int) -> "LocalExperts":
        count = experts.num_experts // size
        return cls(experts.num_experts, rank * count, count, experts.down_proj.shape[1],
                   experts.intermediate_size, experts.act)

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (num_tokens, hidden); expert_ids, weights (num_tokens, top_k) -> (num_tokens, hidden)."""
        local_ids = expert_ids - self.first_expert
        tokens, slots = ((local_ids >= 0) & (local_ids < self.num_experts)).nonzero(as_tuple=True)
        out = torch.zeros_like(x)
        if tokens.numel() == 0:
            return out
        sorted_ids, order = local_ids[tokens, slots].sort(stable=True)   # assignments by expert
        tokens, slots = tokens[order], slots[order]
        experts = torch.arange(self.num_experts, device=x.device, dtype=sorted_ids.dtype)
        ends = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)
        gate, up = self.matmul(x.index_select(0, tokens), self.gate_up_proj, ends).chunk(2, dim=-1)
        rows = self.matmul(self.act(gate) * up, self.down_proj, ends)   # (assignments, hidden)
        return out.index_add_(0, tokens, rows * weights[tokens, slots][:, None])

    def cut(self, checkpoint_name: str, name: str, tensor: Tensor) -> tuple[str, Tensor] | None:
        """This rank's part of an expert tensor (`name` relative to this module): one expert's
        own tensor renumbered, or None when another rank holds it; stacked and fused tensors,
        (num_experts, ...), cut to this rank's experts."""
        if isinstance(tensor, BlockRows):
            tensor = tensor.dequantize()
        head = name.split(".")[0]
        if head.isdigit():
            expert = int(head)
            if expert >= self.num_experts_total:
                return checkpoint_name, tensor                     # the loader names the bad index
            if not self.first_expert <= expert < self.first_expert + self.num_experts:
                return None
            local = expert - self.first_expert
            return re.sub(rf"\.experts\.{expert}\.", f".experts.{local}.", checkpoint_name, count=1), tensor
        return checkpoint_name, tensor.narrow(0, self.first_expert, self.num_experts).clone()

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}..{self.first_expert + self.num_experts - 1} of "
                f"{self.num_experts_total}, {super().extra_repr()}")


class ShardedRMSNorm(nn.Module):
    """RMSNorm over a vector split across ranks (OLMoE's QK-norm spans every head): each rank
    scales its part by the root mean square of the whole, whose sum of squares is all-reduced.
    The mean divides by size * num_ranks, which also holds when KV heads are replicated: each
    of the kv heads is then held by num_ranks / kv ranks, and its squares summed that often."""

    def __init__(self, size: int, num_ranks: int, eps: float, collective: Collective):
        super().__init__()
        self.num_values, self.eps, self.collective = size * num_ranks, eps, collective
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_squares = self.collective.all_reduce(xf.square().sum(-1, keepdim=True))
        return self.weight * (xf * torch.rsqrt(sum_squares / self.num_values + self.eps)).to(x.dtype)


# -- cutting tensors (float, or quantized blocks) ------------------------------------------

def _part(tensor: Tensor, axis: int, index: int, count: int) -> Tensor:
    length = tensor.shape[axis] // count
    return _narrow(tensor, axis, index * length, length)


def _narrow(tensor: Tensor, axis: int, start: int, length: int) -> Tensor:
    """A copy of [start, start + length) along axis, so the whole tensor can be freed."""
    if isinstance(tensor, BlockRows):
        if axis == 0:
            return BlockRows(tensor.format, *(None if t is None else t[start: start + length].clone()
                                              for t in (tensor.codes, tensor.scales, tensor.mins)))
        if start % BLOCK == 0 and length % BLOCK == 0:
            return BlockRows(tensor.format, tensor.codes[:, start: start + length].clone(),
                             *(None if t is None else t[:, start // BLOCK: (start + length) // BLOCK].clone()
                               for t in (tensor.scales, tensor.mins)))
        tensor = tensor.dequantize()                       # the cut falls inside a block
    return tensor.narrow(axis, start, length).clone()


def _cat(parts: list[Tensor], axis: int) -> Tensor:
    if isinstance(parts[0], BlockRows) and axis == 0:
        joined = BlockRows.cat(parts)
        if joined is not None:
            return joined
    return torch.cat([p.dequantize() if isinstance(p, BlockRows) else p for p in parts], dim=axis)


def _pad_rows(tensor: Tensor, rows: int) -> Tensor:
    """Zero rows up to `rows` (the padded vocabulary's last shard; zero blocks are zeros)."""
    missing = rows - tensor.shape[0]
    if missing == 0:
        return tensor
    if isinstance(tensor, BlockRows):
        return BlockRows(tensor.format, *(None if t is None else torch.cat([t, t.new_zeros(missing, *t.shape[1:])])
                                          for t in (tensor.codes, tensor.scales, tensor.mins)))
    return torch.cat([tensor, tensor.new_zeros(missing, *tensor.shape[1:])])


def _owner(experts: dict[str, nn.Module], name: str) -> str | None:
    prefix = name
    while "." in prefix:
        prefix = prefix.rpartition(".")[0]
        if prefix in experts:
            return prefix
    return None


def _is_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return hasattr(module, "eps") and isinstance(weight, nn.Parameter) and weight.dim() == 1


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)
