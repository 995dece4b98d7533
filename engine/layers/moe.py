"""Sparse Mixture-of-Experts pieces shared by the MoE families: the top-k router and the
experts, held stacked and computed grouped by expert.

A step's tokens each pick top_k experts. Rather than loop over tokens (or run every expert
on every token), the (token, expert) assignments are sorted by expert, so each expert's rows
are contiguous, and each projection is one grouped matmul: one GEMM per expert over its rows,
no Python loop (`torch.nn.functional.grouped_mm`: a loop of GEMMs in C++ on the CPU; on a GPU,
for bf16, CUTLASS's grouped kernel, with no host sync, so decode steps can be graph-captured):

    assignments (token, slot):  (0,0)->e2 (0,1)->e0 (1,0)->e2 (1,1)->e1 (2,0)->e0 (2,1)->e2
    sorted by expert:           | e0: t0 t2 | e1: t1 | e2: t0 t1 t2 |      ends = [2, 3, 6]
    gate_up, act, down:         one GEMM per group, rows in this order
    back to (token, slot):      un-permute, then sum each token's top_k rows, router-weighted

`forward_dense` (every expert on every token, weighted by the router with zeros for experts not
chosen) is the reference the grouped path is tested against.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# The grouped GEMM needs each row's byte stride to be a multiple of 16 bytes: widths that are
# multiples of 8 elements satisfy it for every dtype; other widths take the per-expert loop.
_GROUPED_MM_ALIGNMENT = 8

# parameter -> the checkpoint projections stacked in it
_PROJECTIONS = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


class TopKRouter(nn.Module):
    """Softmax over the experts' logits, keep the top_k, optionally renormalized to sum to 1.

    Not an nn.Linear, so module swaps that quantize linears (int8) leave routing exact.
    Its weight is the checkpoint's `gate.weight`, (num_experts, hidden).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, renormalize: bool):
        super().__init__()
        self.top_k, self.renormalize = top_k, renormalize
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (num_tokens, hidden) -> weights (num_tokens, top_k) in x's dtype, expert ids (num_tokens, top_k)."""
        logits = F.linear(x, self.weight)                               # (num_tokens, num_experts)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)      # fp32 like the reference
        weights, expert_ids = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(x.dtype), expert_ids


class GroupedExperts(nn.Module):
    """num_experts gated MLPs, down(act(gate(x)) * up(x)), stacked as transformers 5 holds them:

        gate_up_proj  (num_experts, 2 * intermediate, hidden)   gate rows, then up rows
        down_proj     (num_experts, hidden, intermediate)

    Checkpoints store experts three ways, all read by `load_checkpoint_tensor`: one tensor per
    expert and projection (`{e}.gate_proj.weight`, what transformers writes by default), one
    stacked tensor per projection (`gate_proj.weight`, (num_experts, out, in), llama.cpp's
    merged name for GGUF's `ffn_*_exps`), or the two fused parameters above.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 act: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.num_experts, self.intermediate_size, self.act = num_experts, intermediate_size, act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        aligned = hidden_size % _GROUPED_MM_ALIGNMENT == 0 and intermediate_size % _GROUPED_MM_ALIGNMENT == 0
        self.matmul = grouped_matmul if aligned else grouped_matmul_loop

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (num_tokens, hidden); expert_ids, weights (num_tokens, top_k) -> (num_tokens, hidden)."""
        num_tokens, top_k = expert_ids.shape
        if num_tokens == 0:
            return torch.zeros_like(x)
        sorted_ids, order = expert_ids.reshape(-1).sort(stable=True)      # assignments by expert
        rows = x.index_select(0, order // top_k)                           # (num_tokens * top_k, hidden)
        experts = torch.arange(self.num_experts, device=x.device, dtype=sorted_ids.dtype)
        ends = torch.searchsorted(sorted_ids, experts, right=True).to(torch.int32)  # (num_experts,)
        gate, up = self.matmul(rows, self.gate_up_proj, ends).chunk(2, dim=-1)
        out = self.matmul(self.act(gate) * up, self.down_proj, ends)     # (num_tokens * top_k, hidden)
        by_slot = out.index_select(0, order.argsort())                    # back to (token, slot) order
        by_slot = by_slot.view(num_tokens, top_k, -1)                     # (num_tokens, top_k, hidden)
        return torch.bmm(weights[:, None, :], by_slot).squeeze(1)        # router-weighted sum

    def forward_dense(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The reference: every expert on every token, each weighted by its router weight
        (zero for the experts a token did not pick). Same arguments as forward."""
        combine = x.new_zeros(x.shape[0], self.num_experts).scatter_(1, expert_ids, weights)
        gate, up = torch.einsum("th,eoh->teo", x, self.gate_up_proj).chunk(2, dim=-1)
        out = torch.einsum("tei,ehi->teh", self.act(gate) * up, self.down_proj)  # (tokens, experts, hidden)
        return (out * combine[..., None]).sum(dim=1)

    # -- loading -------------------------------------------------------------------------

    def load_checkpoint_tensor(self, name: str, tensor: torch.Tensor) -> list[str]:
        """Copy one checkpoint tensor (`name` relative to this module) into the stacked
        parameters; returns the `param:projection:expert` pieces it filled."""
        parts = name.split(".")
        if len(parts) == 1 and parts[0] in ("gate_up_proj", "down_proj"):     # transformers 5 fused
            param_name, target = parts[0], getattr(self, parts[0])
            experts, projections = range(self.num_experts), _PROJECTIONS[parts[0]]
        elif len(parts) == 3 and parts[0].isdigit() and parts[2] == "weight":   # one expert
            expert = int(parts[0])
            if expert >= self.num_experts:
                raise KeyError(f"expert {expert} does not exist (the model has {self.num_experts})")
            experts, projections = range(expert, expert + 1), (parts[1],)
            param_name, target = self._projection(parts[1], experts)
            target = target[0]
        elif len(parts) == 2 and parts[1] == "weight":                           # stacked per projection
            experts, projections = range(self.num_experts), (parts[0],)
            param_name, target = self._projection(parts[0], experts)
        else:
            raise KeyError("the model has no such parameter")
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"shape {tuple(tensor.shape)}, expected {tuple(target.shape)}")
        with torch.no_grad():
            target.copy_(tensor)
        return [f"{param_name}:{p}:{e}" for p in projections for e in experts]

    def checkpoint_shards(self, param_name: str) -> list[str]:
        """The pieces of a parameter a checkpoint must provide: `projection:expert`."""
        return [f"{p}:{e}" for p in _PROJECTIONS[param_name] for e in range(self.num_experts)]

    def _projection(self, projection: str, experts: range) -> tuple[str, torch.Tensor]:
        """(parameter name, the view of it holding `projection` for `experts`)."""
        rows = self.intermediate_size
        if projection == "gate_proj":
            return "gate_up_proj", self.gate_up_proj[experts.start: experts.stop, :rows]
        if projection == "up_proj":
            return "gate_up_proj", self.gate_up_proj[experts.start: experts.stop, rows:]
        if projection == "down_proj":
            return "down_proj", self.down_proj[experts.start: experts.stop]
        raise KeyError("the model has no such parameter")

    def extra_repr(self) -> str:
        experts, hidden = self.down_proj.shape[:2]
        return f"num_experts={experts}, hidden={hidden}, intermediate={self.intermediate_size}"


def grouped_matmul(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """rows (num_rows, in) sorted by group, weight (num_groups, out, in), ends (num_groups,)
    int32 where each group's rows end -> (num_rows, out): rows of group g times weight[g]^T.

    One GEMM per group in torch's grouped_mm: CUTLASS's grouped kernel for bf16 on a recent
    GPU, a loop of GEMMs in C++ elsewhere."""
    return F.grouped_mm(rows, weight.transpose(1, 2), offs=ends)


def grouped_matmul_loop(rows: torch.Tensor, weight: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
    """grouped_matmul for widths grouped_mm cannot take: one matmul per non-empty group, in
    Python (reads the group ends back from the device once)."""
    out = rows.new_empty(rows.shape[0], weight.shape[1])
    start = 0
    for group, end in enumerate(ends.tolist()):
        if end > start:
            out[start:end] = rows[start:end] @ weight[group].T
        start = end
    return out
